"""The dashboard in headless Chromium: a separate writer process fills a run store round by round, the dashboard runs
as a real process, and the pages must show what the store holds and follow the run live, without reloading.

Needs Debian's chromium (``apt-get install -y chromium``); without it this test fails with that instruction, it never
skips. The screenshot lands in the test's tmp folder (printed; ``pytest -s`` shows the path).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright

from simulations.screenshot_dashboard import VIEWPORT, free_port, launch_chromium, start_dashboard, stop

ROUNDS = 6
ROUND_INTERVAL_S = 1.2
UPDATE_TIMEOUT_MS = 60_000

pytestmark = pytest.mark.slow


@dataclass
class LiveRun:
    """A run being written into ``db`` by another process; ``release()`` lets it go on past round 1."""

    db: Path
    run_id: str
    gate: Path
    process: subprocess.Popen[bytes]

    def release(self) -> None:
        self.gate.touch()


def _wait_for_round(db: Path, run_id: str, server_round: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if db.exists():
            with sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True) as conn:
                tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
                if (
                    "rounds" in tables
                    and conn.execute(
                        "SELECT 1 FROM rounds WHERE run_id = ? AND server_round = ?", (run_id, server_round)
                    ).fetchone()
                ):
                    return
        if process.poll() is not None:
            raise RuntimeError(f"the run writer exited with status {process.returncode}")
        time.sleep(0.1)
    raise TimeoutError(f"round {server_round} of {run_id} never reached {db}")


@pytest.fixture
def live_run(tmp_path: Path) -> Iterator[LiveRun]:
    """Rounds 0 and 1 of a run, written by a separate process that writes the rest, slowly, once released.

    The writer uses only the public RunStore API (``python -m server.dashboard.demo``). A real tiny simulation
    (``fedlora simulate --store PATH``) can take its place: start it here and make ``release`` a no-op.
    """
    db, run_id, gate = tmp_path / "runs" / "fedlora.db", "browser-run", tmp_path / "go"
    command = [sys.executable, "-m", "server.dashboard.demo", "--db", str(db), "--run-id", run_id]
    command += ["--rounds", str(ROUNDS), "--interval", str(ROUND_INTERVAL_S), "--wait-for", str(gate)]
    with (tmp_path / "writer.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for_round(db, run_id, 1, process)
            yield LiveRun(db, run_id, gate, process)
        finally:
            gate.touch()
            stop(process)


@dataclass(frozen=True)
class StoreFacts:
    """What the page must show, read straight from SQLite (independent of the dashboard's own queries)."""

    rounds_done: int
    rounds_planned: int
    labels: list[int]
    accuracy: list[float | None]
    best_accuracy: float
    bytes_down: list[int]
    nodes: dict[str, tuple[int, int]]  # node id -> (rank, rounds participated)


def store_facts(db: Path, run_id: str) -> StoreFacts:
    with sqlite3.connect(db) as conn:
        rounds = conn.execute(
            "SELECT server_round, metrics_json FROM rounds WHERE run_id = ? ORDER BY server_round", (run_id,)
        ).fetchall()
        metrics = [json.loads(m) for _, m in rounds]
        bytes_down = conn.execute(
            "SELECT r.server_round, COALESCE(SUM(t.bytes_down), 0) FROM rounds r LEFT JOIN round_nodes t "
            "ON t.run_id = r.run_id AND t.server_round = r.server_round WHERE r.run_id = ? "
            "GROUP BY r.server_round ORDER BY r.server_round",
            (run_id,),
        ).fetchall()
        nodes = conn.execute(
            "SELECT n.node_id, n.rank, (SELECT COUNT(*) FROM round_nodes t WHERE t.run_id = n.run_id "
            "AND t.node_id = n.node_id AND t.participated = 1 AND t.server_round >= 1) FROM nodes n WHERE n.run_id = ?",
            (run_id,),
        ).fetchall()
        (planned,) = conn.execute("SELECT rounds_planned FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    return StoreFacts(
        rounds_done=sum(1 for r, _ in rounds if r >= 1),
        rounds_planned=planned,
        labels=[r for r, _ in rounds],
        accuracy=[m.get("eval_accuracy") for m in metrics],
        best_accuracy=max(m["eval_accuracy"] for m in metrics),
        bytes_down=[b for _, b in bytes_down],
        nodes={node_id: (rank, participated) for node_id, rank, participated in nodes},
    )


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


def test_dashboard_shows_the_store_and_follows_a_live_run(live_run: LiveRun, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with (tmp_path / "dashboard.log").open("wb") as log, sync_playwright() as playwright:
        dashboard = start_dashboard(live_run.db, port, log)
        try:
            browser = launch_chromium(playwright)
            page = browser.new_page(viewport=VIEWPORT)  # type: ignore[arg-type]
            page_errors: list[str] = []
            page.on("pageerror", lambda error: page_errors.append(str(error)))

            # The runs page lists the run in progress, and links to it.
            page.goto(base + "/")
            row = page.locator(f'#runs-table tr[data-run-id="{live_run.run_id}"]')
            row.wait_for()
            assert row.locator(".status-cell").inner_text() == "running"
            assert row.locator(".rounds").inner_text() == f"1 / {ROUNDS}"
            row.locator("a").click()
            page.wait_for_url(f"{base}/runs/{live_run.run_id}")
            page.wait_for_function("Number(document.body.dataset.renders || 0) >= 1")
            assert page.locator("#rounds-done").inner_text() == "1"
            assert page.locator("#run-status").inner_text() == "running"

            # The page follows the run while the writer adds rounds, without a reload.
            page.evaluate("window.__sameDocument = true")
            live_run.release()
            seen_while_running: set[str] = set()
            deadline = time.monotonic() + UPDATE_TIMEOUT_MS / 1000
            while page.locator("#run-status").inner_text() != "completed" and time.monotonic() < deadline:
                if page.locator("#run-status").inner_text() == "running":
                    seen_while_running.add(page.locator("#rounds-done").inner_text())
                page.wait_for_timeout(150)
            assert page.locator("#run-status").inner_text() == "completed"
            assert seen_while_running - {"1"}, f"no update shown while the run was writing: {seen_while_running}"
            assert page.evaluate("window.__sameDocument") is True
            assert live_run.process.wait(timeout=30) == 0, (tmp_path / "writer.log").read_text()

            # Every number shown equals the store.
            page.wait_for_function(f"document.body.dataset.lastRound === '{ROUNDS}'")
            facts = store_facts(live_run.db, live_run.run_id)
            assert page.locator("#rounds-done").inner_text() == str(facts.rounds_done) == str(ROUNDS)
            assert page.locator("#rounds-planned").inner_text() == str(facts.rounds_planned)
            best = page.locator("#best-accuracy")
            assert float(best.get_attribute("data-value") or "nan") == facts.best_accuracy
            assert best.inner_text() == f"{100 * facts.best_accuracy:.2f}%"
            node_rows = page.locator("#nodes-table tbody tr")
            assert node_rows.count() == len(facts.nodes)
            for node_id, (rank, participated) in facts.nodes.items():
                node_row = page.locator(f'#nodes-table tr[data-node-id="{node_id}"]')
                assert node_row.locator(".rank").inner_text() == str(rank)
                assert node_row.locator(".rounds-participated").inner_text() == str(participated)
            assert page.evaluate("Chart.getChart('chart-eval').data.labels") == facts.labels
            assert chart_data(page, "chart-eval", 0) == facts.accuracy
            assert chart_data(page, "chart-bytes", 0) == facts.bytes_down
            for canvas in ("chart-eval", "chart-train", "chart-bytes", "chart-epsilon", "chart-energy"):
                assert painted_pixels(page, canvas) > 500, f"{canvas} was not drawn"
            assert page.locator("#adapter-link").is_visible()
            assert page.locator("#energy-table tbody tr").count() > 0

            screenshot = tmp_path / "dashboard-run.png"
            page.screenshot(path=str(screenshot), full_page=True)
            assert screenshot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
            print(f"screenshot: {screenshot}")

            # A missing run id is a clear message, not a stack trace.
            page.goto(base + "/runs/no-such-run")
            assert "no run with id 'no-such-run'" in page.locator("#error-message").inner_text()
            assert page_errors == []
            browser.close()
        finally:
            stop(dashboard)
