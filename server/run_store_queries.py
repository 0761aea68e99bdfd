"""Read-only queries over the run store, shaped as the dashboard's JSON API.

Every method opens the file with a ``mode=ro`` URI, checks the schema version and reads inside one transaction, so
the answer is one consistent snapshot even while the coordinator writes. Values are JSON-safe: node ids are decimal
strings (Flower's uint64 ids exceed JavaScript's 2^53), timestamps are ISO 8601 UTC strings, non-finite numbers null.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.run_store import RunStoreError, UnknownRunError, connect, read_schema_version

JSON = dict[str, Any]
ACCURACY = "COALESCE(json_extract(metrics_json, '$.global_accuracy'), json_extract(metrics_json, '$.eval_accuracy'))"
"""A round's accuracy for the runs list: the global one (the exported adapter on the fixed set) when the run has it,
else the nodes' mean."""
SUMMARY_CONFIG_KEYS = ("model", "task", "rule", "dp", "node-ranks", "seed")
"""Run-config keys repeated in every run summary, so a list of runs says what each one trained."""

_SUMMARY_SQL = f"""
SELECT r.*,
    (SELECT COUNT(*) FROM rounds WHERE run_id = r.run_id AND server_round >= 1) AS rounds_done,
    (SELECT MAX(server_round) FROM rounds WHERE run_id = r.run_id) AS last_round,
    (SELECT COUNT(*) FROM rounds AS d WHERE d.run_id = r.run_id AND d.server_round >= 1 AND NOT EXISTS (
        SELECT 1 FROM round_nodes AS t WHERE t.run_id = d.run_id AND t.server_round = d.server_round
        AND t.participated = 1)) AS rounds_skipped,
    (SELECT COUNT(*) FROM rejected WHERE run_id = r.run_id) AS rejected_updates,
    (SELECT COUNT(*) FROM nodes WHERE run_id = r.run_id) AS node_count,
    (SELECT {ACCURACY} AS a FROM rounds
        WHERE run_id = r.run_id AND a IS NOT NULL ORDER BY a DESC, server_round LIMIT 1) AS best_accuracy,
    (SELECT server_round FROM rounds WHERE run_id = r.run_id AND {ACCURACY} IS NOT NULL
        ORDER BY {ACCURACY} DESC, server_round LIMIT 1) AS best_accuracy_round
FROM runs AS r
"""

_NODES_SQL = """
SELECT n.*,
    (SELECT COUNT(*) FROM round_nodes AS t WHERE t.run_id = n.run_id AND t.node_id = n.node_id
        AND t.participated = 1 AND t.server_round >= 1) AS rounds_participated,
    (SELECT COALESCE(SUM(bytes_down), 0) FROM round_nodes AS t
        WHERE t.run_id = n.run_id AND t.node_id = n.node_id) AS bytes_down_total,
    (SELECT COALESCE(SUM(bytes_up), 0) FROM round_nodes AS t
        WHERE t.run_id = n.run_id AND t.node_id = n.node_id) AS bytes_up_total,
    (SELECT COUNT(*) FROM rejected AS j WHERE j.run_id = n.run_id AND j.node_id = n.node_id) AS rejected_updates
FROM nodes AS n WHERE n.run_id = ? ORDER BY n.first_seen_round, n.name, n.node_id
"""


class StoreUnavailableError(RunStoreError):
    """The run store file is missing, unreadable or corrupt."""


class StoreNotCreatedError(StoreUnavailableError):
    """No run store yet (no file, or an empty one): the coordinator creates it when its first run starts."""


def iso_utc(timestamp: float | None) -> str | None:
    """Unix seconds as ISO 8601 UTC (``2025-01-31T12:00:00.000Z``), None stays None."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


class RunStoreReader:
    """Read-only view of a run store for the dashboard and other tools."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        """Remember the path; nothing is opened until a query runs (the store may not exist yet)."""
        self.path = Path(path)
        self._clock = clock

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        if not self.path.is_file():
            raise StoreNotCreatedError(
                f"no run store at {self.path} yet (the coordinator creates it when a run starts)"
            )
        try:
            conn = connect(self.path, readonly=True)
        except sqlite3.Error as error:
            raise StoreUnavailableError(f"cannot open the run store {self.path}: {error}") from error
        try:
            conn.execute("BEGIN")
            if read_schema_version(conn, self.path) is None:
                raise StoreNotCreatedError(f"{self.path} is an empty database, not a run store yet")
            yield conn
        except sqlite3.DatabaseError as error:
            raise StoreUnavailableError(self._explain(error)) from error
        finally:
            conn.close()

    def _explain(self, error: sqlite3.DatabaseError) -> str:
        if isinstance(error, sqlite3.OperationalError) and "readonly" in str(error):
            return (
                f"cannot read {self.path}: SQLite needs to create its WAL index ({self.path.name}-shm) in "
                f"{self.path.parent}; make that folder writable (the dashboard still opens the database read-only)"
            )
        if isinstance(error, sqlite3.OperationalError) and "locked" in str(error):
            return f"the run store {self.path} stayed locked too long ({error}); try again"
        return f"{self.path} cannot be read as a run store ({error}); is it corrupt?"

    @staticmethod
    def _run_row(conn: sqlite3.Connection, run_id: str) -> sqlite3.Row:
        row = conn.execute(f"{_SUMMARY_SQL} WHERE r.run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise UnknownRunError(run_id)
        return row

    def schema_version(self) -> int:
        """The store's schema version (raises if the store is unreadable or newer than this code)."""
        with self._snapshot() as conn:
            version = read_schema_version(conn, self.path)
        assert version is not None  # _snapshot refuses an empty store
        return version

    def _summary(self, row: sqlite3.Row) -> JSON:
        end = row["ended_at"] if row["ended_at"] is not None else self._clock()
        config = json.loads(row["config_json"])
        return {
            "run_id": row["run_id"],
            "status": row["status"],
            "rounds_planned": row["rounds_planned"],
            "rounds_done": row["rounds_done"],
            "rounds_skipped": row["rounds_skipped"],
            "rejected_updates": row["rejected_updates"],
            "last_round": row["last_round"],
            "best_accuracy": _finite(row["best_accuracy"]),
            "best_accuracy_round": row["best_accuracy_round"],
            "nodes": row["node_count"],
            "started_at": iso_utc(row["started_at"]),
            "ended_at": iso_utc(row["ended_at"]),
            "updated_at": iso_utc(row["updated_at"]),
            "duration_seconds": max(0.0, end - row["started_at"]),
            "has_adapter": self._adapter_dir(row["adapter_path"]) is not None,
            "config_summary": {k: config[k] for k in SUMMARY_CONFIG_KEYS if k in config},
        }

    def list_runs(self) -> list[JSON]:
        """Every run, newest first, as summaries."""
        with self._snapshot() as conn:
            rows = conn.execute(f"{_SUMMARY_SQL} ORDER BY r.started_at DESC, r.run_id").fetchall()
        return [self._summary(row) for row in rows]

    def get_run(self, run_id: str) -> JSON:
        """One run: its summary plus the resolved config, output folder, adapter path and latest metrics."""
        with self._snapshot() as conn:
            row = self._run_row(conn, run_id)
            latest = conn.execute(
                "SELECT metrics_json FROM rounds WHERE run_id = ? ORDER BY server_round DESC LIMIT 1", (run_id,)
            ).fetchone()
        return {
            **self._summary(row),
            "config": json.loads(row["config_json"]),
            "out_dir": row["out_dir"],
            "adapter_path": row["adapter_path"],
            "latest_metrics": json.loads(latest[0]) if latest is not None else {},
        }

    def rounds(self, run_id: str, since: int = -1) -> list[JSON]:
        """Rounds after ``since`` in order: metrics, per-node and total bytes, participants, ε, rejections.

        A round ≥ 1 without participants is ``skipped``: no update was aggregated and the global adapter stayed.
        """
        with self._snapshot() as conn:
            self._run_row(conn, run_id)
            rounds = conn.execute(
                "SELECT * FROM rounds WHERE run_id = ? AND server_round > ? ORDER BY server_round", (run_id, since)
            ).fetchall()
            traffic = conn.execute(
                "SELECT * FROM round_nodes WHERE run_id = ? AND server_round > ? ORDER BY node_id", (run_id, since)
            ).fetchall()
            rejected = conn.execute(
                "SELECT server_round, COUNT(*) FROM rejected WHERE run_id = ? AND server_round > ? "
                "GROUP BY server_round",
                (run_id, since),
            ).fetchall()
        by_round: dict[int, list[sqlite3.Row]] = {}
        for t in traffic:
            by_round.setdefault(t["server_round"], []).append(t)
        rejected_count = {row[0]: row[1] for row in rejected}
        out = []
        for row in rounds:
            nodes = by_round.get(row["server_round"], [])
            participants = [t["node_id"] for t in nodes if t["participated"]]
            out.append(
                {
                    "server_round": row["server_round"],
                    "recorded_at": iso_utc(row["recorded_at"]),
                    "metrics": json.loads(row["metrics_json"]),
                    "aggregation_seconds": row["aggregation_seconds"],
                    "epsilon": _finite(row["epsilon"]),
                    "checkpoint_path": row["checkpoint_path"],
                    "participants": participants,
                    "skipped": row["server_round"] >= 1 and not participants,
                    "bytes_down": {t["node_id"]: t["bytes_down"] for t in nodes},
                    "bytes_up": {t["node_id"]: t["bytes_up"] for t in nodes},
                    "bytes_down_total": sum(t["bytes_down"] for t in nodes),
                    "bytes_up_total": sum(t["bytes_up"] for t in nodes),
                    "rejected": rejected_count.get(row["server_round"], 0),
                    "warning": row["warning"] if "warning" in row.keys() else "",  # schema 1 had none
                }
            )
        return out

    def nodes(self, run_id: str) -> list[JSON]:
        """Every node of the run: rank, device, first/last seen, rounds participated (1..N), rejected updates."""
        with self._snapshot() as conn:
            self._run_row(conn, run_id)
            rows = conn.execute(_NODES_SQL, (run_id,)).fetchall()
        return [
            {
                "node_id": row["node_id"],
                "name": row["name"],
                "rank": row["rank"],
                "device": row["device"],
                "first_seen_round": row["first_seen_round"],
                "last_seen_round": row["last_seen_round"],
                "first_seen_at": iso_utc(row["first_seen_at"]),
                "last_seen_at": iso_utc(row["last_seen_at"]),
                "rounds_participated": row["rounds_participated"],
                "rejected_updates": row["rejected_updates"],
                "bytes_down_total": row["bytes_down_total"],
                "bytes_up_total": row["bytes_up_total"],
            }
            for row in rows
        ]

    def rejected(self, run_id: str) -> list[JSON]:
        """Every rejected update: round, node id and the validator's reason."""
        with self._snapshot() as conn:
            self._run_row(conn, run_id)
            rows = conn.execute(
                "SELECT server_round, node_id, reason FROM rejected WHERE run_id = ? ORDER BY server_round, rowid",
                (run_id,),
            ).fetchall()
        return [dict(row) for row in rows]

    def diagnostics(self, run_id: str, since: int = -1) -> list[JSON]:
        """Per-round, per-module aggregation diagnostics (energy kept at each rank, fedavg error)."""
        with self._snapshot() as conn:
            self._run_row(conn, run_id)
            rows = conn.execute(
                "SELECT server_round, diagnostics_json FROM rounds WHERE run_id = ? AND server_round > ? "
                "ORDER BY server_round",
                (run_id, since),
            ).fetchall()
        return [{"server_round": row[0], "modules": json.loads(row[1])} for row in rows]

    def adapter_dir(self, run_id: str) -> Path | None:
        """The final adapter folder if the run recorded one and it exists on disk."""
        with self._snapshot() as conn:
            row = self._run_row(conn, run_id)
        return self._adapter_dir(row["adapter_path"])

    def _adapter_dir(self, adapter_path: str | None) -> Path | None:
        if adapter_path is None:
            return None
        folder = Path(adapter_path)
        if not folder.is_absolute():
            folder = self.path.parent / folder
        return folder if folder.is_dir() else None
