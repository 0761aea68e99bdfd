"""The dashboard web app: two HTML pages and the JSON API they read, over a run store opened read-only.

JSON API (all GET). Errors are ``{"error": "<message>"}`` with 401 (token), 404 (unknown run or route), 422 (bad
query parameter) or 503 (store missing, corrupt, or written by a newer fedlora). Node ids are decimal strings,
timestamps ISO 8601 UTC, non-finite numbers null. The machine-readable schema is at ``/api/openapi.json``.

=====================================  =====================================================================
``/api``                               this list of endpoints
``/api/health``                        ``{"status": "ok"}`` while the server runs (no store access, no token)
``/api/store``                         ``{"path", "schema_version", "runs"}``
``/api/runs``                          run summaries, newest first: status, rounds_done / rounds_planned,
                                       rounds_skipped, rejected_updates, best_accuracy (+ round), nodes,
                                       started_at, ended_at, duration_seconds, config_summary (model, task, rule, dp)
``/api/runs/{run_id}``                 one summary + ``config``, ``out_dir``, ``adapter_path``, ``latest_metrics``
``/api/runs/{run_id}/rounds?since=N``  rounds after N (default: all, round 0 included): metrics, bytes per node
                                       and totals, participants, skipped, aggregation_seconds, epsilon,
                                       rejected count
``/api/runs/{run_id}/nodes``           node_id, name, rank, device, first/last seen, rounds_participated,
                                       rejected_updates, byte totals
``/api/runs/{run_id}/rejected``        ``[{"server_round", "node_id", "reason"}]``
``/api/runs/{run_id}/diagnostics``     ``[{"server_round", "modules": {module: {"energy_kept_r8": 0.93, ...}}}]``
                                       (``?since=N`` as for rounds)
``/api/runs/{run_id}/adapter.zip``     the final PEFT adapter folder as a zip stream (404 until there is one)
=====================================  =====================================================================

Pages: ``/`` (runs) and ``/runs/{run_id}``; ``/static/*`` serves Chart.js, CSS and page scripts. The runs page is
served before the coordinator has created the store, and shows the runs once it appears.
With a token, every path but ``/static/*`` and ``/api/health`` (no data in either) needs
``Authorization: Bearer <token>`` or ``?token=<token>``; a page opened with ``?token=`` also sets an HttpOnly cookie
so that its own API calls and links work.
"""

from __future__ import annotations

import hmac
import html
import io
import logging
import os
import re
import zipfile
from collections.abc import Awaitable, Callable, Iterator
from os import PathLike
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from server.run_store import RunStoreError, UnknownRunError
from server.run_store_queries import JSON, RunStoreReader, StoreNotCreatedError

PACKAGE_DIR = Path(__file__).resolve().parent
STATIC_DIR = PACKAGE_DIR / "static"
PAGES_DIR = PACKAGE_DIR / "pages"
TOKEN_COOKIE = "fedlora_dashboard_token"
ZIP_BLOCK_BYTES = 1 << 20

ENDPOINTS = {
    "/api/health": "liveness",
    "/api/store": "store path, schema version, number of runs",
    "/api/runs": "run summaries, newest first",
    "/api/runs/{run_id}": "one run: summary, resolved config, output folder, adapter path, latest metrics",
    "/api/runs/{run_id}/rounds?since=N": "per-round metrics, bytes per node, participants, skipped, epsilon",
    "/api/runs/{run_id}/nodes": "nodes with rank, device, first/last seen, rounds participated, rejected updates",
    "/api/runs/{run_id}/rejected": "rejected updates with reasons",
    "/api/runs/{run_id}/diagnostics?since=N": "per-round, per-module aggregation diagnostics",
    "/api/runs/{run_id}/adapter.zip": "the final PEFT adapter folder, zipped",
}

log = logging.getLogger(__name__)


def _status_for(error: RunStoreError) -> int:
    return 404 if isinstance(error, UnknownRunError) else 503


def error_page(title: str, message: str, status_code: int) -> HTMLResponse:
    """A small HTML page that states what went wrong (never a stack trace)."""
    body = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>fedlora dashboard: '
        f'{html.escape(title)}</title><link rel="icon" href="data:,">'
        '<link rel="stylesheet" href="/static/dashboard.css">'
        "</head><body>"
        '<header><a href="/">fedlora dashboard</a></header><main>'
        f'<h1>{html.escape(title)}</h1><p class="error" id="error-message">{html.escape(message)}</p>'
        '<p><a href="/">Back to all runs</a></p></main></body></html>'
    )
    return HTMLResponse(body, status_code=status_code)


def _error(request: Request, status_code: int, message: str, title: str) -> Response:
    if request.url.path.startswith("/api"):
        return JSONResponse({"error": message}, status_code=status_code)
    return error_page(title, message, status_code)


class _ChunkSink(io.RawIOBase):
    """A write-only, unseekable file that collects what zipfile writes until it is drained."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._chunks.append(chunk)
        return len(chunk)

    def drain(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data


def zip_folder(folder: Path, root: str) -> Iterator[bytes]:
    """Stream ``folder`` as a zip whose entries sit under ``root/``, a block at a time."""
    sink = _ChunkSink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo.from_file(path, f"{root}/{path.relative_to(folder).as_posix()}")
            info.compress_type = zipfile.ZIP_DEFLATED
            with path.open("rb") as source, archive.open(info, "w") as target:
                for block in iter(lambda: source.read(ZIP_BLOCK_BYTES), b""):
                    target.write(block)
                    yield sink.drain()
            yield sink.drain()
    yield sink.drain()


class RevalidatedStaticFiles(StaticFiles):
    """Static files the browser must revalidate (ETag, 304) before each use.

    Without ``Cache-Control`` a browser may reuse a cached script by heuristic, and after an upgrade a page could run
    a new ``run.js`` against an old ``dashboard.js``.
    """

    def file_response(
        self, full_path: PathLike[str] | str, stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["Cache-Control"] = "no-cache"
        return response


def _presented_tokens(request: Request) -> list[str]:
    found = [request.query_params.get("token", ""), request.cookies.get(TOKEN_COOKIE, "")]
    authorization = request.headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        found.append(authorization[len("bearer ") :].strip())
    return [t for t in found if t]


def _install_token_check(app: FastAPI, token: str) -> None:
    @app.middleware("http")
    async def require_token(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.url.path.startswith("/static/") or request.url.path == "/api/health":
            return await call_next(request)
        presented = _presented_tokens(request)
        if not any(hmac.compare_digest(t.encode(), token.encode()) for t in presented):
            message = (
                "this dashboard needs a token: open it with ?token=<token> or send 'Authorization: Bearer <token>'"
            )
            return _error(request, 401, message, "Token required")
        response = await call_next(request)
        if request.query_params.get("token") and not request.url.path.startswith("/api"):
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RunStoreError)
    async def store_error(request: Request, error: RunStoreError) -> Response:
        title = "Run not found" if isinstance(error, UnknownRunError) else "Run store unavailable"
        return _error(request, _status_for(error), str(error), title)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        return _error(request, error.status_code, str(error.detail), str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> Response:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return _error(request, 400, f"bad request: {problems}", "Bad request")

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> Response:
        log.exception("dashboard request %s failed", request.url.path)
        return _error(request, 500, f"internal error: {type(error).__name__}: {error}", "Internal error")


def _page(name: str, **fields: str) -> HTMLResponse:
    text = (PAGES_DIR / name).read_text(encoding="utf-8")
    for key, value in fields.items():
        text = text.replace("{{" + key + "}}", html.escape(value, quote=True))
    return HTMLResponse(text)


SINCE = Query(-1, ge=-1, le=2**62, description="only rounds after this one (-1: all, round 0 included)")
"""``?since=N``: a round number SQLite can compare (it holds signed 64-bit integers)."""


def create_app(db_path: Path, token: str | None = None) -> FastAPI:
    """The dashboard over the run store at ``db_path`` (read-only); ``token`` guards all but /static and health."""
    reader = RunStoreReader(Path(db_path))
    app = FastAPI(
        title="fedlora dashboard",
        description=__doc__,
        docs_url=None,  # Swagger UI would load from a CDN; the page must work offline
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.mount("/static", RevalidatedStaticFiles(directory=STATIC_DIR), name="static")
    _install_error_handlers(app)
    if token:
        _install_token_check(app, token)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def runs_page() -> HTMLResponse:
        try:
            reader.schema_version()
        except StoreNotCreatedError:
            pass  # the page says so and polls until the coordinator creates the store
        return _page("runs.html")

    @app.get("/runs/{run_id}", response_class=HTMLResponse, include_in_schema=False)
    def run_page(run_id: str) -> HTMLResponse:
        reader.get_run(run_id)
        return _page("run.html", RUN_ID=run_id)

    @app.get("/api")
    def api_index() -> JSON:
        return {"endpoints": ENDPOINTS, "openapi": "/api/openapi.json"}

    @app.get("/api/health")
    def health() -> JSON:
        return {"status": "ok"}

    @app.get("/api/store")
    def store() -> JSON:
        return {"path": str(reader.path), "schema_version": reader.schema_version(), "runs": len(reader.list_runs())}

    @app.get("/api/runs")
    def runs() -> list[JSON]:
        return reader.list_runs()

    @app.get("/api/runs/{run_id}")
    def run(run_id: str) -> JSON:
        return reader.get_run(run_id)

    @app.get("/api/runs/{run_id}/rounds")
    def rounds(run_id: str, since: int = SINCE) -> list[JSON]:
        return reader.rounds(run_id, since)

    @app.get("/api/runs/{run_id}/nodes")
    def nodes(run_id: str) -> list[JSON]:
        return reader.nodes(run_id)

    @app.get("/api/runs/{run_id}/rejected")
    def rejected(run_id: str) -> list[JSON]:
        return reader.rejected(run_id)

    @app.get("/api/runs/{run_id}/diagnostics")
    def diagnostics(run_id: str, since: int = SINCE) -> list[JSON]:
        return reader.diagnostics(run_id, since)

    @app.get("/api/runs/{run_id}/adapter.zip", response_model=None)
    def adapter_zip(run_id: str) -> Response:
        folder = reader.adapter_dir(run_id)
        if folder is None:
            raise StarletteHTTPException(404, f"run {run_id!r} has no final adapter on disk (yet)")
        safe_id = re.sub(r"[^A-Za-z0-9._-]", "_", run_id)
        return StreamingResponse(
            zip_folder(folder, "adapter"),
            media_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="fedlora-{safe_id}-adapter.zip"'},
        )

    return app
