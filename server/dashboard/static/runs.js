/* The runs page: one row per run, refreshed while any run is in progress. */
"use strict";
(function () {
  const f = window.fedlora;
  const tbody = document.querySelector("#runs-table tbody");

  function row(run) {
    const tr = document.createElement("tr");
    tr.dataset.runId = run.run_id;
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

  async function tick() {
    const runs = await f.fetchJSON("/api/runs");
    tbody.replaceChildren(...runs.map(row));
    document.getElementById("no-runs").hidden = runs.length > 0;
    const running = runs.some((run) => run.status === "running");
    f.setLive((running ? "live · " : "") + "updated " + new Date().toLocaleTimeString(), running);
    return running ? 2000 : 10000;
  }

  f.poll(tick);
})();
