/* The run page: progress, charts, nodes, diagnostics and config of one run, polled while the run is in progress. */
"use strict";
(function () {
  const f = window.fedlora;
  const runId = document.body.dataset.runId;
  const api = "/api/runs/" + encodeURIComponent(runId);
  const POLL_RUNNING_MS = 2000;
  const POLL_IDLE_MS = 10000;
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];
  const ENERGY_KEY = /^energy_kept_r(\d+)$/;
  // Diagnostics drawn dashed next to the energy kept at each rank: the rank-collapse measure (the share of the
  // global update's energy in the smallest node rank, arXiv 2602.13486) and fedavg's aggregation error.
  const DASHED = { min_rank_energy: "rank collapse: global's energy in r_min", fedavg_error: "fedavg error" };
  const charts = {};
  let lastStamp = null;
  let renders = 0;

  function series(label, color, extra) {
    return Object.assign({ label, data: [], borderColor: color, backgroundColor: color, spanGaps: true }, extra);
  }

  function makeChart(id, type, datasets, scales) {
    return new Chart(document.getElementById(id), {
      type,
      data: { labels: [], datasets },
      options: {
        animation: false,
        responsive: true,
        maintainAspectRatio: false,
        interaction: { mode: "index", intersect: false },
        plugins: { legend: { position: "bottom" } },
        scales: Object.assign({ x: { title: { display: true, text: "round" } } }, scales),
      },
    });
  }

  function initCharts() {
    const title = (text) => ({ display: true, text });
    charts.eval = makeChart("chart-eval", "line",
      [series("global accuracy (exported adapter)", COLORS[0], { yAxisID: "y" }),
        series("nodes' accuracy (own rank, own share)", COLORS[2], { yAxisID: "y", borderDash: [6, 4] }),
        series("global loss", COLORS[1], { yAxisID: "y1" }),
        series("nodes' loss", COLORS[3], { yAxisID: "y1", borderDash: [6, 4] })],
      { y: { min: 0, max: 1, title: title("accuracy") },
        y1: { position: "right", grid: { drawOnChartArea: false }, title: title("loss") } });
    charts.train = makeChart("chart-train", "line", [series("train loss", COLORS[3])], { y: { title: title("loss") } });
    charts.bytes = makeChart("chart-bytes", "bar",
      [series("down (to nodes)", COLORS[0]), series("up (from nodes)", COLORS[2])],
      { y: { beginAtZero: true, ticks: { precision: 0, callback: (value) => f.formatBytes(value) } } });
    charts.epsilon = makeChart("chart-epsilon", "line", [series("ε", COLORS[4])], { y: { beginAtZero: true } });
    charts.energy = makeChart("chart-energy", "line", [], { y: { max: 1, title: title("fraction") } });
  }

  const metric = (round, key) => (f.isNumber(round.metrics[key]) ? round.metrics[key] : null);

  // What the run is measured by: accuracy (classification, higher is better) or held-out perplexity (a causal LM,
  // lower is better, drawn on a log axis).
  const ACCURACY = { name: "accuracy", format: (v) => f.formatPercent(v), better: (a, b) => a > b };
  const PERPLEXITY = { name: "perplexity", format: (v) => f.formatFixed(v, 2), better: (a, b) => a < b };
  const quality = (rounds) => (rounds.some((r) => metric(r, "global_perplexity") !== null
    || metric(r, "eval_perplexity") !== null) ? PERPLEXITY : ACCURACY);
  let shownQuality = ACCURACY;

  function useQuality(q) {
    if (q === shownQuality) return;
    shownQuality = q;
    const ds = charts.eval.data.datasets;
    ds[0].label = `global ${q.name} (exported adapter)`;
    ds[1].label = q === PERPLEXITY ? "nodes' perplexity (pooled, own rank, own share)" : "nodes' accuracy (own rank, own share)";
    charts.eval.options.scales.y = q === PERPLEXITY
      ? { type: "logarithmic", title: { display: true, text: "perplexity" } }
      : { min: 0, max: 1, title: { display: true, text: "accuracy" } };
    setText("best-title", `Best ${q.name}`);
    document.getElementById("best-title").title = `the global ${q.name} when the run has one, else the nodes'`;
    setText("eval-caption", `${q === PERPLEXITY ? "Perplexity" : "Accuracy"} and loss: global (the exported adapter `
      + "on the fixed set) and nodes'");
    setText("global-metric-head", `Global ${q.name}`);
    setText("nodes-metric-head", q === PERPLEXITY ? "Nodes' perplexity" : "Nodes' accuracy");
  }

  // The best round by the run's measure: the global one where the run has it, else the nodes'.
  function best(rounds, q) {
    const key = rounds.some((r) => metric(r, "global_" + q.name) !== null) ? "global_" + q.name : "eval_" + q.name;
    let found = null;
    rounds.forEach((r) => {
      const value = metric(r, key);
      if (value !== null && (found === null || q.better(value, found.value))) found = { value, round: r.server_round };
    });
    return found;
  }

  function lastValue(rounds, pick) {
    for (let i = rounds.length - 1; i >= 0; i -= 1) {
      const value = pick(rounds[i]);
      if (f.isNumber(value)) return value;
    }
    return null;
  }

  function setText(id, text, value) {
    const element = document.getElementById(id);
    element.textContent = text;
    if (value !== undefined) element.dataset.value = value === null ? "" : String(value);
  }

  function renderSetup(run) {
    const setup = run.config_summary || {};
    const parts = [["model", setup.model], ["task", setup.task], ["rule", setup.rule], ["DP", setup.dp]]
      .filter((part) => part[1] !== undefined && part[1] !== null && part[1] !== "")
      .map((part) => `${part[0]} ${part[1]}`);
    parts.push(`${run.nodes} node${run.nodes === 1 ? "" : "s"}`);
    setText("run-setup", parts.join(" · "));
  }

  function renderSummary(run) {
    f.statusBadge(document.getElementById("run-status"), run.status);
    renderSetup(run);
    setText("rejected-updates", String(run.rejected_updates), run.rejected_updates);
    setText("rounds-skipped", run.rounds_skipped === 1 ? "1 round skipped" : `${run.rounds_skipped} rounds skipped`,
      run.rounds_skipped);
    setText("rounds-done", String(run.rounds_done), run.rounds_done);
    setText("rounds-planned", String(run.rounds_planned), run.rounds_planned);
    const fraction = run.rounds_planned > 0 ? Math.min(1, run.rounds_done / run.rounds_planned) : 0;
    document.getElementById("progress-bar").style.width = (100 * fraction).toFixed(1) + "%";
    if (shownQuality === ACCURACY) {  // a causal run's best perplexity comes from its rounds (renderCharts)
      setText("best-accuracy", f.formatPercent(run.best_accuracy), run.best_accuracy);
      setText("best-accuracy-round", run.best_accuracy_round === null ? "" : `round ${run.best_accuracy_round}`);
    }
    setText("started-at", f.formatShortTime(run.started_at), run.started_at);
    document.getElementById("started-at").title = f.formatTime(run.started_at);
    setText("duration", f.formatDuration(run.duration_seconds), run.duration_seconds);
    const link = document.getElementById("adapter-link");
    link.hidden = !run.has_adapter;
    document.getElementById("adapter-none").hidden = run.has_adapter;
    if (run.has_adapter) link.href = api + "/adapter.zip";
    const running = run.status === "running";
    f.setLive((running ? "live · " : run.status + " · ") + "updated " + new Date().toLocaleTimeString(), running);
  }

  function setData(chart, labels, values) {
    chart.data.labels = labels;
    values.forEach((data, i) => { chart.data.datasets[i].data = data; });
    chart.update("none");
  }

  function energyDatasets(diagnostics) {
    const keys = new Map();
    diagnostics.forEach((d) => Object.values(d.modules).forEach((values) => Object.keys(values).forEach((key) => {
      const match = ENERGY_KEY.exec(key);
      if (match) keys.set(key, Number(match[1]));
      else if (key in DASHED) keys.set(key, Infinity);
    })));
    const sorted = [...keys.entries()].sort((a, b) => a[1] - b[1] || a[0].localeCompare(b[0])).map((e) => e[0]);
    return sorted.map((key, i) => {
      const mean = diagnostics.map((d) => {
        const values = Object.values(d.modules).map((m) => m[key]).filter(f.isNumber);
        return values.length ? values.reduce((a, b) => a + b, 0) / values.length : null;
      });
      const label = DASHED[key] || `r = ${keys.get(key)}`;
      const dash = key in DASHED ? { borderDash: [6, 4], borderWidth: 3 } : {};
      return Object.assign(series(label, COLORS[i % COLORS.length], dash), { data: mean });
    });
  }

  function renderCharts(rounds, diagnostics) {
    const labels = rounds.map((r) => r.server_round);
    const q = quality(rounds);
    useQuality(q);
    setData(charts.eval, labels, [`global_${q.name}`, `eval_${q.name}`, "global_loss", "eval_loss"].map(
      (key) => rounds.map((r) => metric(r, key))));
    if (q === PERPLEXITY) {
      const found = best(rounds, q);
      setText("best-accuracy", found ? q.format(found.value) : "–", found ? found.value : null);
      setText("best-accuracy-round", found ? `round ${found.round}` : "");
    }
    setData(charts.train, labels, [rounds.map((r) => metric(r, "train_loss"))]);
    setData(charts.bytes, labels, [rounds.map((r) => r.bytes_down_total), rounds.map((r) => r.bytes_up_total)]);
    const epsilon = rounds.map((r) => r.epsilon);
    setData(charts.epsilon, labels, [epsilon]);
    document.getElementById("epsilon-off").hidden = epsilon.some(f.isNumber);
    const aggregations = diagnostics.filter((d) => d.server_round >= 1);  // round 0 only evaluates
    charts.energy.data.labels = aggregations.map((d) => d.server_round);
    charts.energy.data.datasets = energyDatasets(aggregations);
    charts.energy.update("none");
    setText("latest-eval-loss", f.formatFixed(lastValue(rounds, (r) => metric(r, "eval_loss")), 4),
      lastValue(rounds, (r) => metric(r, "eval_loss")));
    const eps = lastValue(rounds, (r) => r.epsilon);
    setText("latest-epsilon", eps === null ? "off" : eps.toFixed(3), eps);
  }

  function renderNodes(nodes) {
    const rows = nodes.map((node) => {
      const tr = document.createElement("tr");
      tr.dataset.nodeId = node.node_id;
      f.cell(tr, node.node_id, "node-id mono");
      f.cell(tr, node.name, "name");
      f.cell(tr, String(node.rank), "num rank", node.rank);
      f.cell(tr, node.device, "device");
      f.cell(tr, String(node.last_seen_round), "num last-seen-round", node.last_seen_round);
      f.cell(tr, f.formatTime(node.last_seen_at), "last-seen-at", node.last_seen_at);
      f.cell(tr, String(node.rounds_participated), "num rounds-participated", node.rounds_participated);
      f.cell(tr, String(node.rejected_updates), "num rejected-updates", node.rejected_updates);
      return tr;
    });
    document.querySelector("#nodes-table tbody").replaceChildren(...rows);
  }

  // peft names modules by their full path (base_model.model.bert.encoder.layer.0.attention.self.query); the rows
  // show what differs between them, and keep the numbered block ("layer.0") together.
  function commonModulePrefix(modules) {
    if (modules.length < 2) {
      const match = /^base_model\.model\./.exec(modules[0] || "");
      return match ? match[0] : "";
    }
    const parts = modules.map((m) => m.split("."));
    const shortest = Math.min(...parts.map((p) => p.length));
    let shared = 0;
    while (shared < shortest - 1 && parts.every((p) => p[shared] === parts[0][shared])) shared += 1;
    if (shared > 0 && parts.some((p) => /^\d+$/.test(p[shared]))) shared -= 1;
    return shared > 0 ? parts[0].slice(0, shared).join(".") + "." : "";
  }

  function renderEnergyTable(diagnostics) {
    const latest = [...diagnostics].reverse().find((d) => Object.keys(d.modules).length > 0);
    document.getElementById("energy-none").hidden = Boolean(latest);
    document.getElementById("energy-table").hidden = !latest;
    if (!latest) return;
    setText("energy-round", `(round ${latest.server_round})`);
    const keys = new Set();
    Object.values(latest.modules).forEach((values) => Object.keys(values).forEach((key) => keys.add(key)));
    const order = (key) => (ENERGY_KEY.test(key) ? Number(ENERGY_KEY.exec(key)[1]) : Infinity);
    const columns = [...keys].sort((a, b) => order(a) - order(b) || a.localeCompare(b));
    const head = document.createElement("tr");
    f.cell(head, "Module");
    columns.forEach((key) => {
      const match = ENERGY_KEY.exec(key);
      f.cell(head, match ? `r = ${match[1]}` : key.replace(/_/g, " "), "num");
    });
    document.querySelector("#energy-table thead").replaceChildren(head);
    const modules = Object.keys(latest.modules).sort((a, b) => a.localeCompare(b, "en", { numeric: true }));
    const prefix = commonModulePrefix(modules);
    document.getElementById("energy-prefix").hidden = !prefix;
    setText("energy-prefix-text", prefix);
    const rows = modules.map((module) => {
      const tr = document.createElement("tr");
      tr.dataset.module = module;
      f.cell(tr, module.slice(prefix.length), "mono module").title = module;
      columns.forEach((key) => f.cell(tr, f.formatFixed(latest.modules[module][key], 4), "num " + key, latest.modules[module][key]));
      return tr;
    });
    document.querySelector("#energy-table tbody").replaceChildren(...rows);
  }

  function outcome(round) {
    if (round.server_round === 0) return ["evaluation only", "outcome-eval"];
    if (round.skipped) return ["skipped: global adapter kept", "outcome-skipped"];
    if (round.warning) return ["aggregated · rank warning", "outcome-warning"];
    return ["aggregated", "outcome-aggregated"];
  }

  // The latest round's rank warning (the stored global collapsed below the smallest node rank, or a node's served
  // copy keeps too little of it), shown above the charts; the rounds table marks every round that had one.
  function renderWarning(rounds) {
    const latest = [...rounds].reverse().find((r) => r.server_round >= 1 && !r.skipped);
    const warning = latest && latest.warning;
    document.getElementById("rank-warning").hidden = !warning;
    if (warning) setText("rank-warning-text", `round ${latest.server_round}: ${warning}`);
  }

  function renderRoundsTable(rounds) {
    const rows = [...rounds].reverse().map((round) => {
      const tr = document.createElement("tr");
      tr.dataset.round = String(round.server_round);
      const [text, className] = outcome(round);
      tr.className = className;
      f.cell(tr, String(round.server_round), "num round", round.server_round);
      const cell = f.cell(tr, text, "outcome");
      if (round.warning) cell.title = round.warning;
      f.cell(tr, String(round.participants.length), "num participants", round.participants.length);
      f.cell(tr, String(round.rejected), "num rejected", round.rejected);
      ["train_loss", "eval_loss"].forEach((key) => f.cell(tr, f.formatFixed(metric(round, key), 4), "num " + key, metric(round, key)));
      const q = shownQuality;
      [`global_${q.name}`, `eval_${q.name}`].forEach((key) => f.cell(tr, q.format(metric(round, key)), "num " + key, metric(round, key)));
      f.cell(tr, f.formatBytes(round.bytes_down_total), "num bytes_down", round.bytes_down_total);
      f.cell(tr, f.formatBytes(round.bytes_up_total), "num bytes_up", round.bytes_up_total);
      const seconds = round.server_round === 0 || round.skipped ? null : round.aggregation_seconds;
      f.cell(tr, f.isNumber(seconds) ? `${seconds.toFixed(3)} s` : "–", "num aggregation_seconds", seconds);
      f.cell(tr, f.isNumber(round.epsilon) ? round.epsilon.toFixed(3) : "–", "num epsilon", round.epsilon);
      return tr;
    });
    document.querySelector("#rounds-table tbody").replaceChildren(...rows);
  }

  // A node's error reply carries a whole remote traceback (with terminal colours); show its category and last line,
  // and the full text on demand.
  const ANSI = /\x1b\[[0-9;]*m/g;
  const SUMMARY_CHARS = 160;

  function reasonCell(row, reason) {
    const text = reason.replace(ANSI, "");
    const td = f.cell(row, "", "reason");
    td.dataset.reason = reason;
    const lines = text.split("\n").map((line) => line.trim()).filter(Boolean);
    if (lines.length <= 1 && text.length <= SUMMARY_CHARS) {
      td.textContent = text;
      return;
    }
    const category = /^[a-z][a-z-]*(?=:)/.exec(text);
    const last = lines[lines.length - 1].replace(/['">]+$/, "");
    const summary = (category ? category[0] + ": " : "") + last;
    const details = document.createElement("details");
    const head = document.createElement("summary");
    head.textContent = summary.length > SUMMARY_CHARS ? summary.slice(0, SUMMARY_CHARS - 1) + "…" : summary;
    const full = document.createElement("pre");
    full.textContent = text;
    details.append(head, full);
    td.appendChild(details);
  }

  function renderRejected(rejected, nodes) {
    const names = new Map(nodes.map((node) => [node.node_id, node.name]));
    const rows = rejected.map((item) => {
      const tr = document.createElement("tr");
      f.cell(tr, String(item.server_round), "num round", item.server_round);
      f.cell(tr, names.get(item.node_id) || "", "name");
      f.cell(tr, item.node_id, "mono node-id");
      reasonCell(tr, item.reason);
      return tr;
    });
    document.querySelector("#rejected-table tbody").replaceChildren(...rows);
    document.getElementById("rejected-table").hidden = rejected.length === 0;
    document.getElementById("rejected-none").hidden = rejected.length > 0;
  }

  async function tick() {
    const run = await f.fetchJSON(api);
    const stamp = [run.updated_at, run.status, run.last_round, run.rounds_done, run.has_adapter].join("|");
    if (stamp !== lastStamp) {
      const [rounds, nodes, rejected, diagnostics] = await Promise.all(
        ["/rounds", "/nodes", "/rejected", "/diagnostics"].map((part) => f.fetchJSON(api + part)));
      renderCharts(rounds, diagnostics);
      renderNodes(nodes);
      renderRoundsTable(rounds);
      renderWarning(rounds);
      renderEnergyTable(diagnostics);
      renderRejected(rejected, nodes);
      document.getElementById("config").textContent = JSON.stringify(run.config, null, 2);
      document.getElementById("out-dir").textContent = run.out_dir;
      lastStamp = stamp;
      renders += 1;
      document.body.dataset.renders = String(renders);
      document.body.dataset.lastRound = String(run.last_round);
    }
    renderSummary(run);
    return run.status === "running" ? POLL_RUNNING_MS : POLL_IDLE_MS;
  }

  initCharts();
  f.poll(tick);
})();
