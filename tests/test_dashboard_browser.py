"""The dashboard in headless Chromium over a real simulation: the dashboard and the browser are open before
``fedlora simulate --store`` starts; the pages must pick the run up, follow it round by round without reloading, and
show exactly what the store holds once it completes.

Needs Debian's chromium (``apt-get install -y chromium``); without it this test fails with that instruction, it never
skips. The screenshot lands in the test's tmp folder (printed; ``pytest -s`` shows the path).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_SETTINGS, fedlora_command, settings_flags
from playwright.sync_api import Page, sync_playwright

from simulations.screenshot_dashboard import VIEWPORT, free_port, launch_chromium, start_dashboard, stop

ROUNDS = 3
NODES = 3
FAULTS = "partition-1:raise@2,partition-0:raise@3,partition-1:raise@3"
"""Round 2 aggregates without partition-1 (one rejected update); round 3 has one valid reply, fewer than
min-nodes = 2, so it is skipped."""
RUN_TIMEOUT_S = 600  # the simulation alone takes 1-3 minutes on 2 cores, more on a loaded machine
POLL_MS = 200

pytestmark = pytest.mark.slow


@pytest.fixture
def simulation_command(tmp_path: Path) -> list[str]:
    """``fedlora simulate`` of the tiny task, 3 nodes at ranks 2/4/8, 3 rounds, writing ``tmp_path/fedlora.db``."""
    settings = {**TINY_SETTINGS, "num-rounds": ROUNDS, "inject-faults": FAULTS, "collapse-warning-share": 0.99}
    # 0.99: no rank-2 copy of a trained global keeps 99% of its energy, so every aggregated round has a rank warning
    return fedlora_command(
        "simulate", "--cpus-per-node", "2",
        "--nodes", str(NODES), "--out", str(tmp_path / "run"), "--store", str(tmp_path / "fedlora.db"),
        *settings_flags(settings),
    )  # fmt: skip


@dataclass(frozen=True)
class StoreFacts:
    """What the page must show, read straight from SQLite (independent of the dashboard's own queries)."""

    run_id: str
    status: str
    rounds_done: int
    rounds_planned: int
    metrics: dict[int, dict[str, float | None]]
    participants: dict[int, int]
    bytes_down: dict[int, int]
    nodes: dict[str, tuple[str, int, str, int, int]]  # node id -> (name, rank, device, participated, rejected)
    rejected: list[tuple[int, str, str]]
    modules: list[str]  # the latest round's diagnostics
    collapse: dict[int, float | None]  # per aggregated round: min_rank_energy, mean over modules (None if none)
    warnings: dict[int, str]  # per round: the coordinator's rank warning ("" for none)


def _query(conn: sqlite3.Connection, sql: str, run_id: str) -> list[Any]:
    return conn.execute(sql, (run_id,)).fetchall()


def store_facts(db: Path) -> StoreFacts:
    with sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True) as conn:
        ((run_id, status, planned),) = conn.execute("SELECT run_id, status, rounds_planned FROM runs").fetchall()
        rounds = _query(
            conn, "SELECT server_round, metrics_json, diagnostics_json FROM rounds WHERE run_id = ?", run_id
        )
        warnings = dict(_query(conn, "SELECT server_round, warning FROM rounds WHERE run_id = ?", run_id))
        traffic = _query(
            conn,
            "SELECT server_round, SUM(participated), SUM(bytes_down) FROM round_nodes WHERE run_id = ? "
            "GROUP BY server_round",
            run_id,
        )
        nodes = _query(
            conn,
            "SELECT n.node_id, n.name, n.rank, n.device, "
            "(SELECT COUNT(*) FROM round_nodes t WHERE t.run_id = n.run_id AND t.node_id = n.node_id "
            "AND t.participated = 1 AND t.server_round >= 1), "
            "(SELECT COUNT(*) FROM rejected j WHERE j.run_id = n.run_id AND j.node_id = n.node_id) "
            "FROM nodes n WHERE n.run_id = ?",
            run_id,
        )
        rejected = _query(
            conn, "SELECT server_round, node_id, reason FROM rejected WHERE run_id = ? ORDER BY server_round", run_id
        )
    diagnostics = [json.loads(d) for _, _, d in sorted(rounds) if json.loads(d)]
    return StoreFacts(
        run_id=run_id,
        status=status,
        rounds_done=sum(1 for r, _, _ in rounds if r >= 1),
        rounds_planned=planned,
        metrics={r: json.loads(m) for r, m, _ in rounds},
        participants={r: p for r, p, _ in traffic},
        bytes_down={r: b for r, _, b in traffic},
        nodes={node_id: (name, rank, device, p, j) for node_id, name, rank, device, p, j in nodes},
        rejected=[tuple(row) for row in rejected],
        modules=sorted(diagnostics[-1]) if diagnostics else [],
        collapse={r: mean_of(json.loads(d), "min_rank_energy") for r, _, d in sorted(rounds) if r >= 1},
        warnings=warnings,
    )


def mean_of(diagnostics: dict[str, dict[str, float]], key: str) -> float | None:
    """The mean over modules of one diagnostic (None when no module has it)."""
    values = [m[key] for m in diagnostics.values() if key in m]
    return sum(values) / len(values) if values else None


def painted_pixels(page: Page, canvas_id: str) -> int:
    """Non-transparent pixels drawn on a canvas: > 0 once Chart.js has rendered it."""
    script = """(id) => {
        const canvas = document.getElementById(id);
        const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        let painted = 0;
        for (let i = 3; i < data.length; i += 4) if (data[i] > 0) painted += 1;
        return painted;
    }"""
    return int(page.evaluate(script, canvas_id))


def chart_data(page: Page, canvas_id: str, dataset: int) -> list[object]:
    return list(page.evaluate(f"Chart.getChart('{canvas_id}').data.datasets[{dataset}].data"))


def shown_value(page: Page, selector: str) -> float | None:
    """A cell's exact number (``data-value``, written with JavaScript's shortest round-trip format)."""
    value = page.locator(selector).get_attribute("data-value")
    return None if value in (None, "") else float(value)


def follow_run(page: Page, simulation: subprocess.Popen[bytes]) -> list[int]:
    """The round counts the run page shows while the run is in progress, in the order they appeared."""
    seen: list[int] = []
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while page.locator("#run-status").inner_text() != "completed" and time.monotonic() < deadline:
        if page.locator("#run-status").inner_text() == "running":
            done = int(page.locator("#rounds-done").inner_text())
            if not seen or seen[-1] != done:
                seen.append(done)
        if simulation.poll() not in (None, 0):
            raise AssertionError(f"fedlora simulate exited with status {simulation.returncode}")
        page.wait_for_timeout(POLL_MS)
    return seen


def check_run_page_matches_the_store(page: Page, facts: StoreFacts) -> None:
    """Summary, nodes, rounds, rejections, diagnostics and charts equal the store."""
    assert page.locator("#run-status").inner_text() == facts.status == "completed"
    assert page.locator("#rounds-done").inner_text() == str(facts.rounds_done) == str(ROUNDS)
    assert page.locator("#rounds-planned").inner_text() == str(facts.rounds_planned)
    best = max(a for m in facts.metrics.values() if (a := m.get("global_accuracy")) is not None)
    assert shown_value(page, "#best-accuracy") == best
    assert page.locator("#best-accuracy").inner_text() == f"{100 * best:.2f}%"
    assert "model tiny" in page.locator("#run-setup").inner_text()

    assert page.locator("#nodes-table tbody tr").count() == len(facts.nodes) == NODES
    assert sorted(rank for _, rank, _, _, _ in facts.nodes.values()) == [2, 4, 8]
    for node_id, (name, rank, device, participated, rejected) in facts.nodes.items():
        row = page.locator(f'#nodes-table tr[data-node-id="{node_id}"]')
        assert [row.locator(c).inner_text() for c in (".name", ".rank", ".device")] == [name, str(rank), device]
        assert row.locator(".rounds-participated").inner_text() == str(participated)
        assert row.locator(".rejected-updates").inner_text() == str(rejected)

    for server_round, metrics in facts.metrics.items():
        round_row = f'#rounds-table tr[data-round="{server_round}"]'
        for key in ("train_loss", "eval_loss", "global_accuracy", "eval_accuracy"):
            assert shown_value(page, f"{round_row} .{key}") == metrics.get(key), (server_round, key)
        participants = facts.participants.get(server_round, 0)
        assert page.locator(f"{round_row} .participants").inner_text() == str(participants)
        skipped = server_round >= 1 and participants == 0
        assert page.locator(f"{round_row} .outcome").inner_text().startswith("skipped") is skipped
    rejected_rows = page.locator("#rejected-table tbody tr")
    assert rejected_rows.count() == len(facts.rejected) > 0
    for i, (server_round, node_id, reason) in enumerate(facts.rejected):
        row = rejected_rows.nth(i)
        assert [row.locator(c).inner_text() for c in (".round", ".node-id")] == [str(server_round), node_id]
        assert row.locator(".reason").get_attribute("data-reason") == reason
        # An error reply's remote traceback is folded away behind its last line.
        assert f"told to raise in round {server_round}" in row.locator(".reason").inner_text().splitlines()[0]
    assert page.locator("#latest-epsilon").inner_text() == "off" and page.locator("#epsilon-off").is_visible()

    modules = page.locator("#energy-table tbody tr")
    assert sorted(modules.nth(i).get_attribute("data-module") or "" for i in range(modules.count())) == facts.modules
    assert not modules.first.locator(".module").inner_text().startswith("base_model.model.")

    rounds = sorted(facts.metrics)
    assert page.evaluate("Chart.getChart('chart-eval').data.labels") == rounds
    assert chart_data(page, "chart-eval", 0) == [facts.metrics[r].get("global_accuracy") for r in rounds]
    assert chart_data(page, "chart-eval", 1) == [facts.metrics[r].get("eval_accuracy") for r in rounds]
    assert chart_data(page, "chart-bytes", 0) == [facts.bytes_down.get(r, 0) for r in rounds]
    aggregated = [r for r in sorted(facts.warnings) if r >= 1 and facts.participants.get(r, 0) > 0]
    assert aggregated and all(facts.warnings[r].startswith("thin: served at rank 2") for r in aggregated)
    assert page.locator("#rank-warning").is_visible()
    last = aggregated[-1]
    assert page.locator("#rank-warning-text").inner_text() == f"round {last}: {facts.warnings[last]}"
    for r in aggregated:
        cell = page.locator(f'#rounds-table tr[data-round="{r}"] .outcome')
        assert cell.inner_text() == "aggregated · rank warning" and cell.get_attribute("title") == facts.warnings[r]
    labels = page.evaluate("Chart.getChart('chart-energy').data.datasets.map((d) => d.label)")
    collapse = chart_data(page, "chart-energy", next(i for i, x in enumerate(labels) if x.startswith("rank collapse")))
    assert collapse == pytest.approx([facts.collapse[r] for r in sorted(facts.collapse)])
    assert any(v is not None and 0 < v <= 1 for v in collapse)
    for canvas in ("chart-eval", "chart-train", "chart-bytes", "chart-energy"):
        assert painted_pixels(page, canvas) > 500, f"{canvas} was not drawn"
    assert page.locator("#adapter-link").is_visible()


def open_the_new_run(page: Page, base: str) -> str:
    """Wait on the runs page until a running run appears (no reload), follow its link, and return its id."""
    row = page.locator("#runs-table tbody tr").first
    row.wait_for(timeout=RUN_TIMEOUT_S * 1000)
    run_id = row.get_attribute("data-run-id") or ""
    assert row.locator(".status-cell").inner_text() == "running"
    row.locator("a").click()
    page.wait_for_url(f"{base}/runs/{run_id}")
    page.wait_for_function("Number(document.body.dataset.renders || 0) >= 1")
    return run_id


def test_dashboard_follows_a_real_simulation_and_shows_the_store(simulation_command: list[str], tmp_path: Path) -> None:
    db, port = tmp_path / "fedlora.db", free_port()
    base = f"http://127.0.0.1:{port}"
    with (
        (tmp_path / "dashboard.log").open("wb") as dashboard_log,
        (tmp_path / "simulate.log").open("wb") as simulate_log,
        sync_playwright() as playwright,
    ):
        dashboard = start_dashboard(db, port, dashboard_log)
        simulation: subprocess.Popen[bytes] | None = None
        try:
            browser = launch_chromium(playwright)
            page = browser.new_page(viewport=VIEWPORT)  # type: ignore[arg-type]
            page_errors: list[str] = []
            page.on("pageerror", lambda error: page_errors.append(str(error)))

            # Before any run the runs page says there is no store yet, and keeps polling.
            page.goto(base + "/")
            page.locator("#error", has_text="no run store at").wait_for()
            simulation = subprocess.Popen(simulation_command, stdout=simulate_log, stderr=subprocess.STDOUT)

            run_id = open_the_new_run(page, base)

            # The round count climbs while the simulation writes rounds, in the same document.
            page.evaluate("window.__sameDocument = true")
            seen = follow_run(page, simulation)
            assert page.evaluate("window.__sameDocument") is True
            print(f"round counts shown while running: {seen}")
            assert len(seen) >= 2 and seen == sorted(seen), f"round counts shown while running: {seen}"
            assert simulation.wait(timeout=120) == 0, (tmp_path / "simulate.log").read_text()[-4000:]

            # Every number shown equals the store.
            page.wait_for_function(f"document.body.dataset.lastRound === '{ROUNDS}'")
            facts = store_facts(db)
            assert facts.run_id == run_id
            check_run_page_matches_the_store(page, facts)
            screenshot = tmp_path / "dashboard-run.png"
            page.screenshot(path=str(screenshot), full_page=True)
            assert screenshot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
            print(f"screenshot: {screenshot}")

            # The runs page shows the finished run; a missing run id is a message, not a stack trace.
            page.goto(base + "/")
            row = page.locator(f'#runs-table tr[data-run-id="{run_id}"]')
            assert row.locator(".rounds").inner_text() == f"{ROUNDS} / {ROUNDS}"
            assert row.locator(".status-cell").inner_text() == "completed"
            page.goto(base + "/runs/no-such-run")
            assert "no run with id 'no-such-run'" in page.locator("#error-message").inner_text()
            assert page_errors == []
            browser.close()
        finally:
            if simulation is not None:
                stop(simulation)
            stop(dashboard)


def test_the_runs_page_compares_the_ticked_runs_on_one_chart(tmp_path: Path) -> None:
    from server.dashboard.demo import write_demo_run

    # Arrange: three finished runs that differ in ranks and seed.
    db, port = tmp_path / "fedlora.db", free_port()
    write_demo_run(db, run_id="run-a", rounds=4, ranks=(4, 8), seed=0, dp=False)
    write_demo_run(db, run_id="run-b", rounds=4, ranks=(4, 8, 16), seed=1, dp=False)
    write_demo_run(db, run_id="run-c", rounds=3, ranks=(8,), seed=2, dp=False)
    with (tmp_path / "dashboard.log").open("wb") as log, sync_playwright() as playwright:
        dashboard = start_dashboard(db, port, log)
        try:
            browser = launch_chromium(playwright)
            page = browser.new_page(viewport=VIEWPORT)  # type: ignore[arg-type]
            page_errors: list[str] = []
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.on("console", lambda message: page_errors.append(message.text) if message.type == "error" else None)
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator('#runs-table tr[data-run-id="run-c"]').wait_for()
            assert page.locator("#compare-none").is_visible() and not page.locator("#compare-figure").is_visible()
            # Act: tick two runs.
            for run_id in ("run-a", "run-c"):
                page.locator(f'#runs-table tr[data-run-id="{run_id}"] .compare-box').check()
            table_order = page.evaluate(
                "[...document.querySelectorAll('#runs-table tbody tr')].map((tr) => tr.dataset.runId)"
            )
            ticked = [run_id for run_id in table_order if run_id in ("run-a", "run-c")]  # lines follow the table
            page.wait_for_function(f"document.body.dataset.compared === '{','.join(ticked)}'")
            # Assert: one line per ticked run, its global accuracy per round from the store, rule/ranks/seed named.
            datasets = page.evaluate(
                "Chart.getChart('chart-compare').data.datasets.map((d) => ({label: d.label, data: d.data}))"
            )
            with sqlite3.connect(db) as conn:
                for dataset, run_id in zip(datasets, ticked, strict=True):
                    sql = "SELECT server_round, metrics_json FROM rounds WHERE run_id = ? ORDER BY server_round"
                    rows = conn.execute(sql, (run_id,)).fetchall()
                    assert dataset["data"] == [{"x": r, "y": json.loads(m)["global_accuracy"]} for r, m in rows]
            labels = {"run-a": "run-a · svd · ranks 4,8 · seed 0", "run-c": "run-c · svd · ranks 8 · seed 2"}
            assert [d["label"] for d in datasets] == [labels[run_id] for run_id in ticked]
            assert painted_pixels(page, "chart-compare") > 500
            # The choice is in the address: reloading it shows the same comparison.
            assert page.url.endswith("#compare=run-a%2Crun-c")
            page.reload()
            page.wait_for_function(f"document.body.dataset.compared === '{','.join(ticked)}'")
            assert page.locator('#runs-table tr[data-run-id="run-b"] .compare-box').is_checked() is False
            assert page_errors == []
            browser.close()
        finally:
            stop(dashboard)
