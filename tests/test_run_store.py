"""The run store: schema and version checks, atomic rounds, node bookkeeping, and the read queries over them."""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.run_store import (
    _SCHEMA,
    SCHEMA_VERSION,
    RoundRecord,
    RunStore,
    RunStoreError,
    SchemaVersionError,
    UnknownRunError,
    connect,
)
from server.run_store_queries import RunStoreReader, StoreUnavailableError

BIG_NODE = 2**64 - 3  # Flower node ids are uint64: beyond SQLite's signed INTEGER


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "runs" / "fedlora.db"


@pytest.fixture
def store(db: Path) -> RunStore:
    store = RunStore(db)
    store.start_run("r1", {"aggregation": "svd", "num-server-rounds": 3}, rounds_planned=3, out_dir="/out/r1")
    store.upsert_node("r1", 11, rank=4, device="cpu", name="node-a", server_round=0)
    store.upsert_node("r1", BIG_NODE, rank=16, device="cuda:0", name="node-b", server_round=0)
    return store


def round_one(**overrides: object) -> RoundRecord:
    fields: dict[str, object] = {
        "server_round": 1,
        "metrics": {"train_loss": 2.0, "eval_loss": 1.5, "eval_accuracy": 0.4},
        "bytes_down": {11: 100, BIG_NODE: 400},
        "bytes_up": {11: 90, BIG_NODE: 380},
        "participants": [11, BIG_NODE],
        "aggregation_seconds": 0.25,
        "diagnostics": {"q": {"energy_kept_r4": 0.7, "energy_kept_r16": 0.99}},
        "epsilon": 0.5,
        "rejected": [],
        "checkpoint_path": "/out/r1/round-1.ckpt",
    }
    fields.update(overrides)
    return RoundRecord(**fields)  # type: ignore[arg-type]


def test_new_store_records_schema_version_and_uses_wal(db: Path) -> None:
    RunStore(db)

    conn = sqlite3.connect(db)
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert RunStoreReader(db).schema_version() == SCHEMA_VERSION


def test_reopening_an_existing_store_keeps_its_runs(store: RunStore, db: Path) -> None:
    RunStore(db)

    assert [run["run_id"] for run in RunStoreReader(db).list_runs()] == ["r1"]


def test_newer_schema_version_is_refused_with_a_clear_message(db: Path) -> None:
    RunStore(db)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))

    with pytest.raises(SchemaVersionError, match="newer than this fedlora supports"):
        RunStore(db)
    with pytest.raises(SchemaVersionError, match="upgrade fedlora"):
        RunStoreReader(db).list_runs()


def test_a_version_1_store_is_read_as_it_is_and_migrated_by_the_next_writer(db: Path) -> None:
    # Arrange: a store as version 1 wrote it (no rounds.warning column), with one round.
    schema = _SCHEMA.replace("    warning TEXT NOT NULL DEFAULT '',\n", "")
    assert schema != _SCHEMA
    db.parent.mkdir(parents=True)
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode = WAL")  # as every store is
        conn.executescript(schema)
        conn.execute("INSERT INTO schema_version VALUES (1)")
        conn.execute("INSERT INTO runs (run_id, config_json, status, rounds_planned, out_dir, started_at, updated_at) "
                     "VALUES ('old', '{}', 'completed', 1, '/out', 0, 0)")  # fmt: skip
        conn.execute("INSERT INTO rounds VALUES ('old', 1, 0, '{}', 0.1, '{}', NULL, NULL)")
    # Act / Assert: a reader takes it as it is; a writer migrates it, keeping the round.
    assert RunStoreReader(db).rounds("old")[0]["warning"] == ""
    RunStore(db)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("SELECT server_round, warning FROM rounds").fetchall() == [(1, "")]
    assert RunStoreReader(db).rounds("old")[0]["warning"] == ""


def test_foreign_sqlite_file_and_garbage_file_are_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "other.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE t (x)")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not an SQLite database at all" * 100)

    with pytest.raises(SchemaVersionError, match="not a fedlora run store"):
        RunStore(foreign)
    with pytest.raises(SchemaVersionError, match="not a fedlora run store"):
        RunStore(garbage)
    with pytest.raises(StoreUnavailableError, match="corrupt"):
        RunStoreReader(garbage).list_runs()
    with pytest.raises(StoreUnavailableError, match="no run store"):
        RunStoreReader(tmp_path / "missing.db").list_runs()


def test_reader_connection_is_read_only(store: RunStore, db: Path) -> None:
    conn = connect(db, readonly=True)

    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        conn.execute("DELETE FROM runs")


def test_full_run_round_trips_through_the_reader(db: Path) -> None:
    clock = FakeClock()
    store = RunStore(db, clock=clock)
    store.start_run("r1", {"lr": 1e-3, "out": Path("/x")}, rounds_planned=2, out_dir="/out")
    store.upsert_node("r1", 11, rank=4, device="cpu", name="a", server_round=0)
    store.record_round("r1", RoundRecord(server_round=0, metrics={"eval_accuracy": 0.05}, participants=[11]))
    clock.now += 30
    store.record_round("r1", round_one(bytes_down={11: 100}, bytes_up={11: 90}, participants=[11]))
    clock.now += 30
    store.record_round("r1", round_one(server_round=2, metrics={"eval_accuracy": 0.3}, participants=[11]))
    clock.now += 5
    store.finish_run("r1", "completed", adapter_path=None)

    reader = RunStoreReader(db)
    run = reader.get_run("r1")
    assert run["status"] == "completed"
    assert (run["rounds_done"], run["rounds_planned"], run["last_round"]) == (2, 2, 2)
    assert (run["best_accuracy"], run["best_accuracy_round"]) == (0.4, 1)
    assert run["duration_seconds"] == 65
    assert run["config"] == {"lr": 1e-3, "out": "/x"}
    assert run["latest_metrics"] == {"eval_accuracy": 0.3}
    rounds = reader.rounds("r1")
    assert [r["server_round"] for r in rounds] == [0, 1, 2]
    assert rounds[1]["bytes_down"] == {"11": 100} and rounds[1]["bytes_up_total"] == 90
    assert rounds[1]["epsilon"] == 0.5 and rounds[1]["checkpoint_path"] == "/out/r1/round-1.ckpt"
    assert reader.diagnostics("r1", since=0)[0]["modules"] == {"q": {"energy_kept_r4": 0.7, "energy_kept_r16": 0.99}}
    (node,) = reader.nodes("r1")
    assert (node["rank"], node["rounds_participated"], node["last_seen_round"]) == (4, 2, 2)


def test_node_ids_beyond_int64_round_trip_as_decimal_strings(store: RunStore, db: Path) -> None:
    store.record_round("r1", round_one())

    reader = RunStoreReader(db)
    assert {n["node_id"] for n in reader.nodes("r1")} == {"11", str(BIG_NODE)}
    assert reader.rounds("r1")[0]["bytes_down"][str(BIG_NODE)] == 400


def test_upsert_node_keeps_first_seen_and_moves_last_seen_forward(store: RunStore, db: Path) -> None:
    store.upsert_node("r1", 11, rank=8, device="cpu, 4 cores", name="node-a", server_round=5)
    store.upsert_node("r1", 11, rank=8, device="cpu, 4 cores", name="node-a", server_round=3)

    node = next(n for n in RunStoreReader(db).nodes("r1") if n["node_id"] == "11")
    assert (node["first_seen_round"], node["last_seen_round"]) == (0, 5)
    assert (node["rank"], node["device"]) == (8, "cpu, 4 cores")


def test_record_round_marks_participants_and_rejected_senders_as_seen(store: RunStore, db: Path) -> None:
    store.record_round("r1", round_one(server_round=2, participants=[11], rejected=[(BIG_NODE, "nan in lora_B")]))

    nodes = {n["node_id"]: n for n in RunStoreReader(db).nodes("r1")}
    assert nodes["11"]["last_seen_round"] == 2 and nodes["11"]["rounds_participated"] == 1
    assert nodes[str(BIG_NODE)]["last_seen_round"] == 2
    assert nodes[str(BIG_NODE)]["rounds_participated"] == 0
    assert nodes[str(BIG_NODE)]["rejected_updates"] == 1
    assert RunStoreReader(db).rejected("r1") == [
        {"server_round": 2, "node_id": str(BIG_NODE), "reason": "nan in lora_B"}
    ]


def test_a_round_without_participants_is_reported_as_skipped(store: RunStore, db: Path) -> None:
    store.record_round("r1", RoundRecord(server_round=0, metrics={"eval_accuracy": 0.1}))
    store.record_round("r1", round_one())
    store.record_round(
        "r1", round_one(server_round=2, participants=[], bytes_up={11: 90}, rejected=[(BIG_NODE, "error reply")])
    )

    reader = RunStoreReader(db)
    assert [r["skipped"] for r in reader.rounds("r1")] == [False, False, True]
    run = reader.get_run("r1")
    assert (run["rounds_done"], run["rounds_skipped"], run["rejected_updates"]) == (2, 1, 1)


def test_round_zero_counts_neither_as_done_nor_as_participation(store: RunStore, db: Path) -> None:
    store.record_round("r1", RoundRecord(server_round=0, metrics={"eval_accuracy": 0.1}, participants=[11]))

    run = RunStoreReader(db).get_run("r1")
    assert (run["rounds_done"], run["last_round"], run["best_accuracy"]) == (0, 0, 0.1)
    assert all(n["rounds_participated"] == 0 for n in RunStoreReader(db).nodes("r1"))


def test_recording_a_round_again_replaces_it(store: RunStore, db: Path) -> None:
    store.record_round("r1", round_one(rejected=[(11, "bad shape")]))
    store.record_round("r1", round_one(bytes_down={11: 1}, bytes_up={}, participants=[11], rejected=[]))

    (only,) = RunStoreReader(db).rounds("r1")
    assert only["bytes_down"] == {"11": 1} and only["rejected"] == 0
    assert RunStoreReader(db).rejected("r1") == []


def test_failed_round_write_leaves_nothing_behind(store: RunStore, db: Path) -> None:
    class Exploding(RoundRecord):
        def node_rows(self) -> list[tuple[str, int, int, int]]:
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        store.record_round("r1", Exploding(**round_one().__dict__))

    assert RunStoreReader(db).rounds("r1") == []
    assert RunStoreReader(db).get_run("r1")["rounds_done"] == 0


def test_reader_never_sees_half_a_round(db: Path) -> None:
    nodes = list(range(1, 41))
    store = RunStore(db)
    store.start_run("r1", {}, rounds_planned=25, out_dir="/out")
    for n in nodes:
        store.upsert_node("r1", n, rank=4, device="cpu", name=f"n{n}", server_round=0)
    torn: list[str] = []

    def write() -> None:
        for k in range(1, 26):
            rejected = [(n, f"r{k}") for n in nodes[:k]]
            store.record_round(
                "r1",
                RoundRecord(server_round=k, bytes_down={n: k for n in nodes}, participants=nodes, rejected=rejected),
            )

    writer = threading.Thread(target=write)
    writer.start()
    reader = RunStoreReader(db)
    while writer.is_alive():
        for r in reader.rounds("r1"):
            k = r["server_round"]
            if len(r["bytes_down"]) != len(nodes) or r["bytes_down_total"] != k * len(nodes) or r["rejected"] != k:
                torn.append(f"round {k}: {len(r['bytes_down'])} nodes, {r['rejected']} rejected")
    writer.join()

    assert torn == []
    assert reader.get_run("r1")["rounds_done"] == 25


def test_start_run_refuses_a_duplicate_unless_resuming(store: RunStore, db: Path) -> None:
    store.record_round("r1", round_one())
    store.finish_run("r1", "failed", adapter_path=None)

    with pytest.raises(RunStoreError, match="already in"):
        store.start_run("r1", {}, rounds_planned=3, out_dir="/out/r1")
    store.start_run("r1", {"resumed": True}, rounds_planned=3, out_dir="/out/r1", resume=True)

    run = RunStoreReader(db).get_run("r1")
    assert (run["status"], run["ended_at"], run["rounds_done"], run["config"]) == (
        "running",
        None,
        1,
        {"resumed": True},
    )


def test_writes_to_an_unknown_run_raise(store: RunStore) -> None:
    with pytest.raises(UnknownRunError, match="nope"):
        store.record_round("nope", round_one())
    with pytest.raises(UnknownRunError):
        store.upsert_node("nope", 1, rank=4, device="cpu", name="x", server_round=0)
    with pytest.raises(UnknownRunError):
        store.finish_run("nope", "completed", None)


def test_reads_of_an_unknown_run_raise(store: RunStore, db: Path) -> None:
    reader = RunStoreReader(db)
    for query in (reader.get_run, reader.rounds, reader.nodes, reader.rejected, reader.diagnostics, reader.adapter_dir):
        with pytest.raises(UnknownRunError, match="nope"):
            query("nope")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"server_round": -1}, "server_round"),
        ({"bytes_down": {11: -5}}, "bytes_down"),
        ({"bytes_up": {-1: 5}}, "bytes_up key"),
        ({"participants": [True]}, "participants"),
        ({"aggregation_seconds": math.nan}, "aggregation_seconds"),
        ({"epsilon": -0.1}, "epsilon"),
        ({"rejected": [(1, None)]}, "reason"),
    ],
)
def test_round_record_names_the_bad_value(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        round_one(**overrides)


def test_writer_arguments_are_validated(store: RunStore) -> None:
    with pytest.raises(ValueError, match="status"):
        store.finish_run("r1", "done", None)
    with pytest.raises(ValueError, match="rank"):
        store.upsert_node("r1", 1, rank=0, device="cpu", name="x", server_round=0)
    for bad_id in ("", "a/b", "line\nbreak"):
        with pytest.raises(ValueError, match="run_id"):
            store.start_run(bad_id, {}, rounds_planned=1, out_dir="/x")
    with pytest.raises(ValueError, match="rounds_planned"):
        store.start_run("r2", {}, rounds_planned=-1, out_dir="/x")


def test_non_finite_values_are_stored_as_null(store: RunStore, db: Path) -> None:
    store.record_round(
        "r1",
        round_one(
            metrics={"train_loss": math.inf, "eval_loss": math.nan}, diagnostics={"q": {"fedavg_error": math.nan}}
        ),
    )

    (r,) = RunStoreReader(db).rounds("r1")
    assert r["metrics"] == {"train_loss": None, "eval_loss": None}
    assert RunStoreReader(db).diagnostics("r1")[0]["modules"] == {"q": {"fedavg_error": None}}
    json.dumps(RunStoreReader(db).rounds("r1"), allow_nan=False)


def test_adapter_dir_resolves_relative_paths_next_to_the_database(store: RunStore, db: Path) -> None:
    (db.parent / "r1" / "adapter").mkdir(parents=True)
    store.finish_run("r1", "completed", adapter_path="r1/adapter")

    reader = RunStoreReader(db)
    assert reader.adapter_dir("r1") == db.parent / "r1" / "adapter"
    assert reader.get_run("r1")["has_adapter"] is True


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    traffic=st.dictionaries(
        st.integers(0, 2**64 - 1), st.tuples(st.integers(0, 2**40), st.integers(0, 2**40)), max_size=8
    )
)
def test_byte_totals_equal_the_sums_written(tmp_path: Path, traffic: dict[int, tuple[int, int]]) -> None:
    db = tmp_path / f"p{len(list(tmp_path.iterdir()))}.db"
    store = RunStore(db)
    store.start_run("r", {}, rounds_planned=1, out_dir="/o")
    down = {n: d for n, (d, _) in traffic.items()}
    up = {n: u for n, (_, u) in traffic.items()}

    store.record_round("r", RoundRecord(server_round=1, bytes_down=down, bytes_up=up))

    (r,) = RunStoreReader(db).rounds("r")
    assert r["bytes_down_total"] == sum(down.values()) and r["bytes_up_total"] == sum(up.values())
    assert r["bytes_down"] == {str(n): d for n, d in down.items()}
