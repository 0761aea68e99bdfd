/* The runs page: one row per run, refreshed while any run is in progress; ticked runs share one accuracy chart. */
"use strict";
(function () {
  const f = window.fedlora;
  const tbody = document.querySelector("#runs-table tbody");
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];
  // The ticked runs live in the address (#compare=a,b), so a comparison can be bookmarked and shared.
  const selected = new Set(decodeURIComponent((location.hash.match(/compare=([^&]*)/) || [])[1] || "")
    .split(",").filter(Boolean));
  const cache = new Map();  // run id -> {stamp, rounds}
  let chart = null;
  let known = [];

  function row(run) {
    const tr = document.createElement("tr");
    tr.dataset.runId = run.run_id;
    const box = document.createElement("input");
    box.type = "checkbox";
    box.className = "compare-box";
    box.checked = selected.has(run.run_id);
    box.setAttribute("aria-label", "compare " + run.run_id);
    box.addEventListener("change", () => {
      if (box.checked) selected.add(run.run_id); else selected.delete(run.run_id);
      history.replaceState(null, "", selected.size ? "#compare=" + encodeURIComponent([...selected].join(",")) : "#");
      renderCompare();
    });
    f.cell(tr, "", "compare").appendChild(box);
    const link = document.createElement("a");
    link.href = "/runs/" + encodeURIComponent(run.run_id);
    link.textContent = run.run_id;
    f.cell(tr, "", "run-id mono").appendChild(link);
    const badge = document.createElement("span");
    f.statusBadge(badge, run.status);
    f.cell(tr, "", "status-cell").appendChild(badge);
    const setup = run.config_summary || {};
    f.cell(tr, [setup.model, setup.task, setup.rule].filter(Boolean).join(" · "), "setup");
    f.cell(tr, `${run.rounds_done} / ${run.rounds_planned}`, "num rounds", run.rounds_done);
    f.cell(tr, f.formatPercent(run.best_accuracy), "num best-accuracy", run.best_accuracy);
    f.cell(tr, f.formatTime(run.started_at), "started", run.started_at);
    f.cell(tr, f.formatDuration(run.duration_seconds), "num duration", run.duration_seconds);
    f.cell(tr, String(run.nodes), "num nodes", run.nodes);
    return tr;
  }

  // "run-id · svd · ranks 2,4,8 · seed 0": what tells compared runs apart.
  function legend(run, global) {
    const setup = run.config_summary || {};
    const parts = [run.run_id, setup.rule];
    if (setup["node-ranks"]) parts.push("ranks " + setup["node-ranks"]);
    if (setup.seed !== undefined) parts.push("seed " + setup.seed);
    return parts.filter((p) => p !== undefined && p !== "").join(" · ") + (global ? "" : " (nodes' mean)");
  }

  async function roundsOf(run) {
    const stamp = [run.updated_at, run.status].join("|");
    const hit = cache.get(run.run_id);
    if (hit && hit.stamp === stamp) return hit.rounds;
    const rounds = await f.fetchJSON("/api/runs/" + encodeURIComponent(run.run_id) + "/rounds");
    cache.set(run.run_id, { stamp, rounds });
    return rounds;
  }

  async function renderCompare() {
    const runs = known.filter((run) => selected.has(run.run_id));
    document.getElementById("compare-none").hidden = runs.length >= 2;
    document.getElementById("compare-figure").hidden = runs.length < 2;
    if (runs.length < 2) return;
    const all = await Promise.all(runs.map(roundsOf));
    const datasets = runs.map((run, i) => {
      const rounds = all[i];
      const global = rounds.some((r) => f.isNumber(r.metrics.global_accuracy));
      const key = global ? "global_accuracy" : "eval_accuracy";
      const color = COLORS[i % COLORS.length];
      return {
        label: legend(run, global),
        runId: run.run_id,
        data: rounds.map((r) => ({ x: r.server_round, y: f.isNumber(r.metrics[key]) ? r.metrics[key] : null })),
        borderColor: color, backgroundColor: color, spanGaps: true, borderDash: global ? [] : [6, 4],
      };
    });
    if (chart === null) {
      chart = new Chart(document.getElementById("chart-compare"), {
        type: "line",
        data: { datasets },
        options: {
          animation: false, responsive: true, maintainAspectRatio: false, parsing: false,
          interaction: { mode: "nearest", intersect: false },
          plugins: { legend: { position: "bottom" } },
          scales: { x: { type: "linear", title: { display: true, text: "round" }, ticks: { precision: 0 } },
            y: { min: 0, max: 1, title: { display: true, text: "accuracy" } } },
        },
      });
    } else {
      chart.data.datasets = datasets;
      chart.update("none");
    }
    document.body.dataset.compared = runs.map((run) => run.run_id).join(",");
  }

  async function tick() {
    const runs = await f.fetchJSON("/api/runs");
    known = runs;
    tbody.replaceChildren(...runs.map(row));
    document.getElementById("no-runs").hidden = runs.length > 0;
    await renderCompare();
    const running = runs.some((run) => run.status === "running");
    f.setLive((running ? "live · " : "") + "updated " + new Date().toLocaleTimeString(), running);
    return running ? 2000 : 10000;
  }

  f.poll(tick);
})();
