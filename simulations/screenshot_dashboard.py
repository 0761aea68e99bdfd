"""Screenshot the dashboard's run page in headless Chromium (Debian's ``chromium``, driven by Playwright).

    python -m simulations.screenshot_dashboard --db runs/fedlora.db [--run-id <id>] [--out docs/dashboard.png]

``docs/dashboard.png`` shows a real run of the tiny task (4 nodes at ranks 2/4/8/16, 5 rounds, one node failing in
round 3 so that a rejected update shows); a few minutes on two cores::

    fedlora simulate --nodes 4 --out /tmp/shot/run --store /tmp/shot/fedlora.db \
        --set model='"tiny"' --set task='"tiny"' --set max-length=16 --set node-ranks='"2,4,8,16"' \
        --set local-steps=10 --set learning-rate=0.01 --set head-lr-ratio=1 --set num-rounds=5 \
        --set inject-faults='"partition-3:raise@3"'
    python -m simulations.screenshot_dashboard --db /tmp/shot/fedlora.db

``python -m server.dashboard.demo --db PATH`` writes a synthetic run instead, to preview the pages without training.

The dashboard runs as a real process (``python -m server.dashboard``) on a free loopback port. The helpers here
(start the dashboard, launch Chromium) are shared with ``tests/test_dashboard_browser.py``.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Browser, FloatRect, Playwright

CHROMIUM = Path(os.environ.get("FEDLORA_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 900}
DOCS_UNTIL = "#config-heading"
"""The README's picture ends above the resolved config (a long JSON listing)."""


class ChromiumMissingError(RuntimeError):
    """Debian's chromium is not installed where the browser checks expect it."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_dashboard(db: Path, port: int, log: IO[bytes], token: str | None = None) -> subprocess.Popen[bytes]:
    """Start ``python -m server.dashboard`` as a separate process and wait until it answers."""
    command = [sys.executable, "-m", "server.dashboard", "--db", str(db), "--port", str(port)]
    if token is not None:
        command += ["--token", token]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/api/health", process)
    except BaseException:
        stop(process)
        raise
    return process


def wait_until_serving(url: str, process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """Poll ``url`` until it answers 200; fail early if the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the dashboard exited with status {process.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the dashboard did not answer {url} within {timeout_s:.0f} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate a process this module started, then kill it if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def launch_chromium(playwright: Playwright) -> Browser:
    """Headless Debian chromium through Playwright; a clear error (never a skip) when it is missing."""
    if not CHROMIUM.is_file():
        raise ChromiumMissingError(
            f"{CHROMIUM} not found: install it with `apt-get update && apt-get install -y chromium` "
            "(or point FEDLORA_CHROMIUM at a Chromium binary)"
        )
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def screenshot_run_page(db: Path, run_id: str, out: Path, log: IO[bytes], until: str | None = None) -> Path:
    """Serve ``db``, open ``/runs/<run_id>`` once its charts have drawn, and save a PNG at ``out``.

    The PNG holds the whole page, or the page down to the element ``until`` (a CSS selector) when one is given.
    """
    from urllib.parse import quote

    from playwright.sync_api import sync_playwright

    port = free_port()
    process = start_dashboard(db, port, log)
    try:
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            page = browser.new_page(viewport=VIEWPORT)  # type: ignore[arg-type]
            page.goto(f"http://127.0.0.1:{port}/runs/{quote(run_id, safe='')}")
            page.wait_for_selector("#nodes-table tbody tr")
            page.wait_for_function("Number(document.body.dataset.renders || 0) >= 1")
            out.parent.mkdir(parents=True, exist_ok=True)
            box = page.locator(until).bounding_box() if until else None
            clip: FloatRect | None = None
            if box is not None:
                clip = {"x": 0, "y": 0, "width": VIEWPORT["width"], "height": box["y"]}
            page.screenshot(path=str(out), full_page=True, clip=clip)
            browser.close()
    finally:
        stop(process)
    return out


def main(argv: list[str] | None = None) -> int:
    """Screenshot the run page of one run in a run store."""
    from server.run_store import RunStoreError
    from server.run_store_queries import RunStoreReader

    parser = argparse.ArgumentParser(
        prog="python -m simulations.screenshot_dashboard",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--db", type=Path, required=True, help="run store to show")
    parser.add_argument("--run-id", default=None, help="run to show (default: the newest run)")
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    parser.add_argument(
        "--until",
        default=DOCS_UNTIL,
        help=f"CSS selector where the picture ends (default: {DOCS_UNTIL!r}, above the config); '' for the whole page",
    )
    args = parser.parse_args(argv)
    try:
        runs = RunStoreReader(args.db).list_runs()
    except RunStoreError as error:
        print(f"screenshot_dashboard: {error}", file=sys.stderr)
        return 1
    run_id = args.run_id if args.run_id is not None else (runs[0]["run_id"] if runs else None)
    if run_id is None:
        print(f"screenshot_dashboard: no runs in {args.db}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp, (Path(tmp) / "dashboard.log").open("wb") as log:
        out = screenshot_run_page(args.db, run_id, args.out, log, until=args.until or None)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
