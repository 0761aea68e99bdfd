"""SQLite run store: what the coordinator records as a run progresses, and what the dashboard reads.

One file per coordinator (``runs/fedlora.db`` by default), many runs per file. The coordinator writes::

    from server.run_store import RoundRecord, RunStore

    store = RunStore(Path("runs/fedlora.db"))  # creates the schema, or checks its version
    store.start_run(run_id, config, rounds_planned=20, out_dir="runs/2025-...")  # status "running"
    store.upsert_node(run_id, node_id, rank=8, device="cpu, 2 cores", name="node-3", server_round=1)
    store.record_round(run_id, RoundRecord(server_round=0, metrics={"eval_loss": 3.0, "eval_accuracy": 0.05}))
    store.record_round(
        run_id,
        RoundRecord(
            server_round=1,
            metrics={"train_loss": 2.1, "eval_loss": 1.9, "eval_accuracy": 0.41},
            bytes_down={node_id: 73_728}, bytes_up={node_id: 73_728}, participants=[node_id],
            aggregation_seconds=0.02, diagnostics={"layer.0.query": {"energy_kept_r8": 0.93}},
            epsilon=None, rejected=[(other_id, "lora_B is not finite")], checkpoint_path="runs/.../round-1.ckpt",
        ),
    )
    store.finish_run(run_id, "completed", adapter_path="runs/.../adapter")  # or ("failed", None)

Semantics
- Every call is one transaction on its own short-lived connection (safe from any thread or process); a reader never
  sees half a round. Round 0 is the untrained model (evaluation only); ``rounds_planned`` counts rounds 1..N.
- ``start_run`` refuses an existing ``run_id`` unless ``resume=True`` (a restarted coordinator): then the status goes
  back to "running" and the rounds already recorded stay. ``record_round`` replaces a round recorded before.
- A round >= 1 recorded without participants is a skipped round: nothing was aggregated (e.g. fewer valid replies
  than ``min-nodes``) and the global adapter stayed; its ``rejected`` rows say why. Readers report it as skipped.
- ``record_round`` also marks every node that replied (participants and rejected senders) and that ``upsert_node``
  introduced as seen in that round.
- A run id is any printable string without "/" (it is part of the dashboard's URLs).
- Node ids are Flower's uint64 ids; they are stored as decimal TEXT (SQLite integers are signed 64-bit).
- Non-finite metric and diagnostic values are stored as null. Store absolute paths; a relative path is read relative
  to the directory that holds the database file.
- Errors: ``SchemaVersionError`` (a file written by a newer fedlora, or not a run store), ``UnknownRunError``,
  ``RunStoreError`` (their base), ``ValueError`` for bad arguments.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: ("ALTER TABLE rounds ADD COLUMN warning TEXT NOT NULL DEFAULT ''",),
}
"""Statements that bring a store from version v to v + 1 (a writer applies them when it opens an older store;
readers accept the older layout as it is)."""
FINAL_STATUSES = ("completed", "failed")
BUSY_TIMEOUT_S = 10.0

_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY,
    config_json TEXT NOT NULL,
    status TEXT NOT NULL,
    rounds_planned INTEGER NOT NULL,
    out_dir TEXT NOT NULL,
    adapter_path TEXT,
    started_at REAL NOT NULL,
    ended_at REAL,
    updated_at REAL NOT NULL
);
CREATE TABLE nodes (
    run_id TEXT NOT NULL REFERENCES runs (run_id),
    node_id TEXT NOT NULL,
    rank INTEGER NOT NULL,
    device TEXT NOT NULL,
    name TEXT NOT NULL,
    first_seen_round INTEGER NOT NULL,
    last_seen_round INTEGER NOT NULL,
    first_seen_at REAL NOT NULL,
    last_seen_at REAL NOT NULL,
    PRIMARY KEY (run_id, node_id)
);
CREATE TABLE rounds (
    run_id TEXT NOT NULL REFERENCES runs (run_id),
    server_round INTEGER NOT NULL,
    recorded_at REAL NOT NULL,
    metrics_json TEXT NOT NULL,
    aggregation_seconds REAL NOT NULL,
    diagnostics_json TEXT NOT NULL,
    epsilon REAL,
    checkpoint_path TEXT,
    warning TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (run_id, server_round)
);
CREATE TABLE round_nodes (
    run_id TEXT NOT NULL,
    server_round INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    bytes_down INTEGER NOT NULL,
    bytes_up INTEGER NOT NULL,
    participated INTEGER NOT NULL,
    PRIMARY KEY (run_id, server_round, node_id),
    FOREIGN KEY (run_id, server_round) REFERENCES rounds (run_id, server_round)
);
CREATE TABLE rejected (
    run_id TEXT NOT NULL,
    server_round INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    FOREIGN KEY (run_id, server_round) REFERENCES rounds (run_id, server_round)
);
CREATE INDEX rejected_by_round ON rejected (run_id, server_round);
"""


class RunStoreError(Exception):
    """A run store cannot do what was asked."""


class SchemaVersionError(RunStoreError):
    """The file is not a run store this version of fedlora can read (newer schema, or not a run store at all)."""


class UnknownRunError(RunStoreError):
    """No run with this id is recorded in the store."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"no run with id {run_id!r} in the run store")
        self.run_id = run_id


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _check_node_id(node_id: int, what: str) -> str:
    if isinstance(node_id, bool) or not isinstance(node_id, int) or node_id < 0:
        raise ValueError(f"{what} must be a non-negative integer node id, got {node_id!r}")
    return str(node_id)


@dataclass(frozen=True)
class RoundRecord:
    """Everything the coordinator knows about one finished round, written in one transaction."""

    server_round: int
    """Flower's round number; 0 is the untrained model (evaluation only)."""
    metrics: Mapping[str, float] = field(default_factory=dict)
    """Aggregated metrics, conventionally ``train_loss``, ``eval_loss``, ``eval_accuracy``."""
    bytes_down: Mapping[int, int] = field(default_factory=dict)
    """Bytes sent to each node id this round."""
    bytes_up: Mapping[int, int] = field(default_factory=dict)
    """Bytes received from each node id this round."""
    participants: Sequence[int] = ()
    """Node ids whose replies were used (aggregated, or evaluated in round 0)."""
    aggregation_seconds: float = 0.0
    """Wall time of validation, clipping, noise and aggregation."""
    diagnostics: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    """Per target module: ``{"energy_kept_r8": 0.93, ..., "fedavg_error": 0.1}``."""
    epsilon: float | None = None
    """Cumulative ε after this round; None when differential privacy is off."""
    rejected: Sequence[tuple[int, str]] = ()
    """(node id, reason) for every update refused by validation."""
    checkpoint_path: str | None = None
    """The checkpoint written for this round, if any."""
    warning: str = ""
    """What the coordinator warned about the round's global (:func:`common.diagnostics.rank_warning`), or ""."""

    def __post_init__(self) -> None:
        if isinstance(self.server_round, bool) or not isinstance(self.server_round, int) or self.server_round < 0:
            raise ValueError(f"server_round must be a non-negative integer, got {self.server_round!r}")
        for name, table in (("bytes_down", self.bytes_down), ("bytes_up", self.bytes_up)):
            for node_id, count in table.items():
                _check_node_id(node_id, f"{name} key")
                if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                    raise ValueError(f"{name}[{node_id}] must be a non-negative integer, got {count!r}")
        for node_id in self.participants:
            _check_node_id(node_id, "participants entry")
        for node_id, reason in self.rejected:
            _check_node_id(node_id, "rejected node id")
            if not isinstance(reason, str):
                raise ValueError(f"rejected reason for node {node_id} must be a string, got {reason!r}")
        if not math.isfinite(self.aggregation_seconds) or self.aggregation_seconds < 0:
            raise ValueError(f"aggregation_seconds must be finite and >= 0, got {self.aggregation_seconds!r}")
        if self.epsilon is not None and not self.epsilon >= 0:
            raise ValueError(f"epsilon must be None or >= 0, got {self.epsilon!r}")

    def metrics_json(self) -> str:
        """The metrics as a JSON object, non-finite values as null."""
        return json.dumps({str(k): _finite_or_none(float(v)) for k, v in self.metrics.items()}, sort_keys=True)

    def diagnostics_json(self) -> str:
        """The diagnostics as a JSON object of objects, non-finite values as null."""
        table = {
            str(module): {str(k): _finite_or_none(float(v)) for k, v in values.items()}
            for module, values in self.diagnostics.items()
        }
        return json.dumps(table, sort_keys=True)

    def seen_nodes(self) -> list[str]:
        """Node ids that replied this round: participants and rejected senders."""
        return sorted({str(n) for n in self.participants} | {str(n) for n, _ in self.rejected})

    def node_rows(self) -> list[tuple[str, int, int, int]]:
        """(node id, bytes down, bytes up, participated) for every node this round touched."""
        participants = set(self.participants)
        ids = set(self.bytes_down) | set(self.bytes_up) | participants
        return [
            (str(n), self.bytes_down.get(n, 0), self.bytes_up.get(n, 0), int(n in participants)) for n in sorted(ids)
        ]


def connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    """Open the store in autocommit mode (transactions are explicit); ``readonly`` uses a ``mode=ro`` URI."""
    if readonly:
        conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None
        )
    else:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        # WAL + NORMAL: commits stay atomic and consistent; only a power cut can lose the last ones.
        conn.execute("PRAGMA synchronous = NORMAL")
    conn.row_factory = sqlite3.Row
    return conn


def read_schema_version(conn: sqlite3.Connection, path: Path) -> int | None:
    """The store's schema version; None for an empty file; raise if it is newer or not a run store."""
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables:
        return None
    if "schema_version" not in tables:
        raise SchemaVersionError(f"{path} is an SQLite database but not a fedlora run store (no schema_version table)")
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    version = row[0] if row is not None else None
    if not isinstance(version, int):
        raise SchemaVersionError(f"{path} has an empty or invalid schema_version table")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{path} uses run store schema version {version}, newer than this fedlora supports ({SCHEMA_VERSION}); "
            "upgrade fedlora to read it"
        )
    if any(v not in MIGRATIONS for v in range(version, SCHEMA_VERSION)):
        raise SchemaVersionError(f"{path} uses run store schema version {version}; no migration to {SCHEMA_VERSION}")
    return version


class RunStore:
    """The coordinator's writer: one short transaction per call, WAL mode so the dashboard reads concurrently."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        """Create the store (and its parent folder) or check the schema version of an existing one."""
        self.path = Path(path)
        self._clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = connect(self.path, readonly=False)
            try:
                conn.execute("PRAGMA journal_mode = WAL")  # persistent: readers never block the writer
            finally:
                conn.close()
            with self._transaction() as conn:
                version = read_schema_version(conn, self.path)
                if version is None:
                    for statement in filter(str.strip, _SCHEMA.split(";")):
                        conn.execute(statement)
                    conn.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
                for old in range(version or SCHEMA_VERSION, SCHEMA_VERSION):
                    for statement in MIGRATIONS[old]:
                        conn.execute(statement)
                    conn.execute("INSERT INTO schema_version VALUES (?)", (old + 1,))
        except sqlite3.OperationalError as error:  # locked past the timeout, unwritable folder, ...
            raise RunStoreError(f"cannot open the run store {self.path}: {error}") from error
        except sqlite3.DatabaseError as error:
            raise SchemaVersionError(f"{self.path} is not a fedlora run store: {error}") from error

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = connect(self.path, readonly=False)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    @staticmethod
    def _require_run(conn: sqlite3.Connection, run_id: str) -> None:
        if conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
            raise UnknownRunError(run_id)

    def start_run(
        self, run_id: str, config: Mapping[str, Any], rounds_planned: int, out_dir: str, *, resume: bool = False
    ) -> None:
        """Record a new run with status "running"; ``resume=True`` reopens an existing one instead of refusing."""
        if not isinstance(run_id, str) or not run_id or "/" in run_id or not run_id.isprintable():
            raise ValueError(f"run_id must be a non-empty printable string without '/', got {run_id!r}")
        if isinstance(rounds_planned, bool) or not isinstance(rounds_planned, int) or rounds_planned < 0:
            raise ValueError(f"rounds_planned must be a non-negative integer, got {rounds_planned!r}")
        config_json = json.dumps(dict(config), sort_keys=True, default=str, allow_nan=False)
        now = self._clock()
        with self._transaction() as conn:
            exists = conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is not None
            if exists and not resume:
                raise RunStoreError(f"run {run_id!r} is already in {self.path}; pass resume=True to continue it")
            if exists:
                conn.execute(
                    "UPDATE runs SET config_json = ?, status = 'running', rounds_planned = ?, out_dir = ?, "
                    "ended_at = NULL, updated_at = ? WHERE run_id = ?",
                    (config_json, rounds_planned, str(out_dir), now, run_id),
                )
            else:
                conn.execute(
                    "INSERT INTO runs (run_id, config_json, status, rounds_planned, out_dir, started_at, updated_at) "
                    "VALUES (?, ?, 'running', ?, ?, ?, ?)",
                    (run_id, config_json, rounds_planned, str(out_dir), now, now),
                )

    def upsert_node(self, run_id: str, node_id: int, rank: int, device: str, name: str, server_round: int) -> None:
        """Record a node's rank and device; the first call sets first seen, every call moves last seen forward."""
        node = _check_node_id(node_id, "node_id")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
            raise ValueError(f"server_round must be a non-negative integer, got {server_round!r}")
        now = self._clock()
        with self._transaction() as conn:
            self._require_run(conn, run_id)
            conn.execute(
                "INSERT INTO nodes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, node_id) DO UPDATE SET "
                "rank = excluded.rank, device = excluded.device, name = excluded.name, "
                "last_seen_round = MAX(last_seen_round, excluded.last_seen_round), "
                "last_seen_at = excluded.last_seen_at",
                (run_id, node, rank, str(device), str(name), server_round, server_round, now, now),
            )
            conn.execute("UPDATE runs SET updated_at = ? WHERE run_id = ?", (now, run_id))

    def record_round(self, run_id: str, record: RoundRecord) -> None:
        """Write one round (metrics, traffic, diagnostics, ε, rejections, checkpoint) atomically."""
        now = self._clock()
        key = (run_id, record.server_round)
        with self._transaction() as conn:
            self._require_run(conn, run_id)
            for table in ("round_nodes", "rejected", "rounds"):
                conn.execute(f"DELETE FROM {table} WHERE run_id = ? AND server_round = ?", key)
            conn.execute(
                "INSERT INTO rounds (run_id, server_round, recorded_at, metrics_json, aggregation_seconds, "
                "diagnostics_json, epsilon, checkpoint_path, warning) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    *key,
                    now,
                    record.metrics_json(),
                    float(record.aggregation_seconds),
                    record.diagnostics_json(),
                    None if record.epsilon is None else float(record.epsilon),
                    record.checkpoint_path,
                    str(record.warning),
                ),
            )
            conn.executemany(
                "INSERT INTO round_nodes VALUES (?, ?, ?, ?, ?, ?)", [(*key, *r) for r in record.node_rows()]
            )
            conn.executemany(
                "INSERT INTO rejected VALUES (?, ?, ?, ?)", [(*key, str(n), reason) for n, reason in record.rejected]
            )
            conn.executemany(
                "UPDATE nodes SET last_seen_round = MAX(last_seen_round, ?), last_seen_at = ? "
                "WHERE run_id = ? AND node_id = ?",
                [(record.server_round, now, run_id, n) for n in record.seen_nodes()],
            )
            conn.execute("UPDATE runs SET updated_at = ? WHERE run_id = ?", (now, run_id))

    def finish_run(self, run_id: str, status: str, adapter_path: str | None) -> None:
        """Mark the run "completed" or "failed" and record the final adapter folder (a PEFT folder) if any."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"status must be one of {FINAL_STATUSES}, got {status!r}")
        now = self._clock()
        with self._transaction() as conn:
            self._require_run(conn, run_id)
            conn.execute(
                "UPDATE runs SET status = ?, adapter_path = ?, ended_at = ?, updated_at = ? WHERE run_id = ?",
                (status, None if adapter_path is None else str(adapter_path), now, now, run_id),
            )
