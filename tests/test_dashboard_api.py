"""The dashboard's JSON API and pages, in process (FastAPI TestClient): every endpoint, bad ids, bad stores, token."""

from __future__ import annotations

import argparse
import hashlib
import io
import sqlite3
import zipfile
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from server.dashboard.app import ENDPOINTS, TOKEN_COOKIE, create_app
from server.dashboard.cli import DEFAULT_DB, add_parser, is_loopback, main, run
from server.dashboard.demo import write_demo_run
from server.run_store import SCHEMA_VERSION, RoundRecord, RunStore
from server.run_store_queries import RunStoreReader

RUN_ID = "demo"
RUN_ENDPOINTS = ["", "/rounds", "/nodes", "/rejected", "/diagnostics", "/adapter.zip"]


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("store") / "fedlora.db"
    write_demo_run(db, run_id=RUN_ID, rounds=4)
    return db


@pytest.fixture(scope="module")
def client(demo_db: Path) -> TestClient:
    return TestClient(create_app(demo_db))


def newer_schema_db(tmp_path: Path) -> Path:
    db = tmp_path / "newer.db"
    write_demo_run(db, run_id=RUN_ID, rounds=1)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    return db


def test_api_index_lists_every_endpoint(client: TestClient) -> None:
    response = client.get("/api")

    assert response.status_code == 200
    assert response.json()["endpoints"] == ENDPOINTS
    assert client.get("/api/openapi.json").status_code == 200


def test_health_and_store(client: TestClient, demo_db: Path) -> None:
    assert client.get("/api/health").json() == {"status": "ok"}
    assert client.get("/api/store").json() == {"path": str(demo_db), "schema_version": SCHEMA_VERSION, "runs": 1}


def test_runs_lists_the_summary(client: TestClient) -> None:
    (run,) = client.get("/api/runs").json()

    assert run["run_id"] == RUN_ID and run["status"] == "completed"
    assert (run["rounds_done"], run["rounds_planned"], run["last_round"], run["nodes"]) == (4, 4, 4, 3)
    assert run["best_accuracy_round"] == 4 and 0 < run["best_accuracy"] < 1
    assert (run["rounds_skipped"], run["rejected_updates"]) == (0, 1)
    assert run["started_at"].endswith("Z") and run["duration_seconds"] > 0 and run["has_adapter"] is True
    assert run["config_summary"] == {
        "model": "minilm-l6", "task": "newsgroups", "rule": "svd", "dp": "central", "node-ranks": "4,8,16", "seed": 0
    }  # fmt: skip


def test_run_detail_adds_config_and_paths(client: TestClient, demo_db: Path) -> None:
    run = client.get(f"/api/runs/{RUN_ID}").json()

    assert run["config"]["synthetic"] is True and run["config"]["num-rounds"] == 4
    assert run["out_dir"] == str(demo_db.parent / RUN_ID)
    assert run["adapter_path"] == str(demo_db.parent / RUN_ID / "adapter")
    assert set(run["latest_metrics"]) == {"train_loss", "eval_loss", "eval_accuracy", "global_loss", "global_accuracy"}


def test_rounds_match_the_store_and_since_filters(client: TestClient, demo_db: Path) -> None:
    rounds = client.get(f"/api/runs/{RUN_ID}/rounds").json()
    later = client.get(f"/api/runs/{RUN_ID}/rounds", params={"since": 2}).json()

    assert [r["server_round"] for r in rounds] == [0, 1, 2, 3, 4]
    assert [r["server_round"] for r in later] == [3, 4]
    with sqlite3.connect(demo_db) as conn:
        sums = dict(conn.execute("SELECT server_round, SUM(bytes_down) FROM round_nodes GROUP BY server_round"))
    assert {r["server_round"]: r["bytes_down_total"] for r in rounds if r["server_round"] in sums} == sums
    assert rounds[3]["rejected"] == 1 and len(rounds[3]["participants"]) == 2
    assert not any(r["skipped"] for r in rounds)
    assert all(isinstance(node_id, str) for r in rounds for node_id in r["participants"])


def test_nodes_show_rank_participation_and_rejections(client: TestClient) -> None:
    nodes = client.get(f"/api/runs/{RUN_ID}/nodes").json()

    assert [(n["name"], n["rank"], n["rounds_participated"], n["rejected_updates"]) for n in nodes] == [
        ("node-0", 4, 4, 0),
        ("node-1", 8, 4, 0),
        ("node-2", 16, 3, 1),
    ]
    assert all(n["last_seen_round"] == 4 for n in nodes)


def test_rejected_lists_reasons(client: TestClient) -> None:
    nodes = client.get(f"/api/runs/{RUN_ID}/nodes").json()

    assert client.get(f"/api/runs/{RUN_ID}/rejected").json() == [
        {"server_round": 3, "node_id": nodes[2]["node_id"], "reason": "lora_B has non-finite values (nan)"}
    ]


def test_diagnostics_per_round_and_module(client: TestClient) -> None:
    diagnostics = client.get(f"/api/runs/{RUN_ID}/diagnostics", params={"since": 3}).json()

    assert [d["server_round"] for d in diagnostics] == [4]
    module = diagnostics[0]["modules"]["base_model.model.bert.encoder.layer.0.attention.self.query"]
    assert set(module) == {"energy_kept_r4", "energy_kept_r8", "energy_kept_r16", "min_rank_energy"}
    assert module["min_rank_energy"] == module["energy_kept_r4"]
    assert module["energy_kept_r4"] < module["energy_kept_r8"] < module["energy_kept_r16"] <= 1


def test_adapter_zip_holds_the_peft_folder(client: TestClient, demo_db: Path) -> None:
    response = client.get(f"/api/runs/{RUN_ID}/adapter.zip")

    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    assert 'filename="fedlora-demo-adapter.zip"' in response.headers["content-disposition"]
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    folder = demo_db.parent / RUN_ID / "adapter"
    assert sorted(archive.namelist()) == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        expected = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert hashlib.sha256(archive.read(f"adapter/{name}")).hexdigest() == expected


def test_adapter_zip_is_404_while_no_adapter_exists(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "f.db")
    store.start_run("live", {}, rounds_planned=3, out_dir=str(tmp_path))

    response = TestClient(create_app(tmp_path / "f.db")).get("/api/runs/live/adapter.zip")

    assert response.status_code == 404
    assert "no final adapter" in response.json()["error"]


@pytest.mark.parametrize("suffix", RUN_ENDPOINTS)
def test_unknown_run_id_is_a_404_with_a_message(client: TestClient, suffix: str) -> None:
    response = client.get(f"/api/runs/no-such-run{suffix}")

    assert response.status_code == 404
    assert response.json() == {"error": "no run with id 'no-such-run' in the run store"}


def test_unknown_run_page_is_a_404_page_without_a_trace(client: TestClient) -> None:
    response = client.get("/runs/no-such-run")

    assert response.status_code == 404 and response.headers["content-type"].startswith("text/html")
    assert "no run with id &#x27;no-such-run&#x27;" in response.text and "Traceback" not in response.text


@pytest.mark.parametrize("since", ["soon", str(2**63), "-2", "1e400"])
@pytest.mark.parametrize("endpoint", ["rounds", "diagnostics"])
def test_bad_query_parameter_is_a_400_with_a_message(client: TestClient, endpoint: str, since: str) -> None:
    response = client.get(f"/api/runs/{RUN_ID}/{endpoint}", params={"since": since})

    assert response.status_code == 400
    assert response.json()["error"].startswith("bad request: query.since")


def test_unknown_route_is_a_json_404_under_api(client: TestClient) -> None:
    assert client.get("/api/nothing").json() == {"error": "Not Found"}


@pytest.mark.parametrize("path", ["/api/store", "/api/runs"] + [f"/api/runs/{RUN_ID}{s}" for s in RUN_ENDPOINTS])
def test_newer_schema_version_is_a_503_naming_the_problem(tmp_path: Path, path: str) -> None:
    client = TestClient(create_app(newer_schema_db(tmp_path)))

    response = client.get(path)

    assert response.status_code == 503
    assert f"schema version {SCHEMA_VERSION + 1}, newer than this fedlora supports" in response.json()["error"]


def test_pages_explain_a_newer_schema(tmp_path: Path) -> None:
    client = TestClient(create_app(newer_schema_db(tmp_path)))

    for path in ("/", f"/runs/{RUN_ID}"):
        response = client.get(path)
        assert response.status_code == 503 and "upgrade fedlora" in response.text


def test_corrupt_and_missing_databases_give_clear_messages(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"\x00garbage" * 512)
    corrupt_client = TestClient(create_app(corrupt))
    missing_client = TestClient(create_app(tmp_path / "missing.db"))

    assert corrupt_client.get("/api/runs").status_code == 503
    assert "is it corrupt?" in corrupt_client.get("/api/runs").json()["error"]
    assert "is it corrupt?" in corrupt_client.get("/").text
    assert "no run store at" in missing_client.get("/api/runs").json()["error"]
    assert missing_client.get("/api/runs").status_code == 503
    assert not (tmp_path / "missing.db").exists()


def test_runs_page_waits_for_a_store_that_does_not_exist_yet(tmp_path: Path) -> None:
    client = TestClient(create_app(tmp_path / "later.db"))

    page = client.get("/")
    RunStore(tmp_path / "later.db").start_run("r", {}, rounds_planned=1, out_dir=str(tmp_path))

    assert page.status_code == 200 and 'id="runs-table"' in page.text  # its script polls /api/runs
    assert [run["run_id"] for run in client.get("/api/runs").json()] == ["r"]


def test_unexpected_errors_are_a_message_not_a_trace(demo_db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: RunStoreReader) -> list[object]:
        raise RuntimeError("boom")

    monkeypatch.setattr(RunStoreReader, "list_runs", broken)
    client = TestClient(create_app(demo_db), raise_server_exceptions=False)

    response = client.get("/api/runs")

    assert response.status_code == 500
    assert response.json() == {"error": "internal error: RuntimeError: boom"}


def test_json_is_strict_even_with_non_finite_values(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "f.db")
    store.start_run("r", {}, rounds_planned=1, out_dir=str(tmp_path))
    store.record_round("r", RoundRecord(server_round=1, metrics={"eval_loss": float("nan")}, epsilon=float("inf")))

    (r,) = TestClient(create_app(tmp_path / "f.db")).get("/api/runs/r/rounds").json()

    assert r["metrics"] == {"eval_loss": None} and r["epsilon"] is None


def test_dashboard_never_writes_the_store(demo_db: Path, client: TestClient) -> None:
    before = hashlib.sha256(demo_db.read_bytes()).hexdigest()

    for path in ["/", f"/runs/{RUN_ID}", "/api/runs"] + [f"/api/runs/{RUN_ID}{s}" for s in RUN_ENDPOINTS]:
        assert client.get(path).status_code == 200

    assert hashlib.sha256(demo_db.read_bytes()).hexdigest() == before


def test_run_id_is_escaped_in_the_page(tmp_path: Path) -> None:
    nasty = 'x"><img src=x onerror=alert(1)>'
    store = RunStore(tmp_path / "f.db")
    store.start_run(nasty, {}, rounds_planned=1, out_dir=str(tmp_path))

    response = TestClient(create_app(tmp_path / "f.db")).get("/runs/" + quote(nasty, safe=""))

    assert response.status_code == 200
    assert (
        "<img" not in response.text and 'data-run-id="x&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"' in response.text
    )


def test_static_files_are_served_offline(client: TestClient) -> None:
    chart = client.get("/static/chart.umd.min.js")

    assert chart.status_code == 200 and chart.text.startswith("/*!\n * Chart.js v4")
    for name in ("dashboard.js", "runs.js", "run.js", "dashboard.css", "chart.js-LICENSE.txt"):
        response = client.get(f"/static/{name}")
        assert response.status_code == 200 and response.headers["cache-control"] == "no-cache"
        revalidated = client.get(f"/static/{name}", headers={"If-None-Match": response.headers["etag"]})
        assert revalidated.status_code == 304
    for page in ("/", f"/runs/{RUN_ID}"):
        assert "http" not in client.get(page).text.split("<body")[0]  # no CDN in the head


def test_token_guards_pages_and_api_but_not_static(demo_db: Path) -> None:
    client = TestClient(create_app(demo_db, token="s3cret"))

    assert client.get("/api/runs").status_code == 401
    assert "needs a token" in client.get("/api/runs").json()["error"]
    assert client.get("/").status_code == 401
    assert client.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/api/runs", params={"token": "s3cret"}).status_code == 200
    assert client.get("/static/run.js").status_code == 200
    assert client.get("/api/health").json() == {"status": "ok"}


def test_page_opened_with_token_sets_a_cookie_for_its_api_calls(demo_db: Path) -> None:
    client = TestClient(create_app(demo_db, token="s3cret"))

    page = client.get(f"/runs/{RUN_ID}", params={"token": "s3cret"})

    assert page.status_code == 200 and TOKEN_COOKIE in page.cookies
    assert "httponly" in page.headers["set-cookie"].lower()
    assert client.get(f"/api/runs/{RUN_ID}/nodes").status_code == 200  # the cookie alone


def test_cli_refuses_a_non_loopback_host_without_a_token(
    demo_db: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FEDLORA_DASHBOARD_TOKEN", raising=False)

    status = main(["--db", str(demo_db), "--host", "0.0.0.0", "--port", "8999"])

    assert status == 2 and "refusing to bind 0.0.0.0 without a token" in capsys.readouterr().err


LOOPBACK = ["127.0.0.1", "127.3.2.1", "::1", "localhost"]
NOT_LOOPBACK = ["0.0.0.0", "192.168.1.4", "example.org"]


@pytest.mark.parametrize(("host", "loopback"), [(h, True) for h in LOOPBACK] + [(h, False) for h in NOT_LOOPBACK])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_add_parser_wires_the_dashboard_subcommand() -> None:
    parser = argparse.ArgumentParser(prog="fedlora")
    add_parser(parser.add_subparsers(dest="command"))

    args = parser.parse_args(["dashboard", "--port", "9000", "--token", "t"])

    assert (args.command, args.db, args.host, args.port, args.token) == (
        "dashboard",
        DEFAULT_DB,
        "127.0.0.1",
        9000,
        "t",
    )
    assert args.func is run
