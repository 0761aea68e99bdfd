"""The experiment matrix: cell names, overlays, resume, time estimates and the report (fake runs, no training)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from simulations.compare import (
    BASELINES,
    EXPERIMENTS,
    RESULT_FILE,
    RULE_NAMES,
    Cell,
    cell_overlay,
    eta_seconds,
    fingerprint,
    plan,
    run_matrix,
)
from simulations.compare_cells import format_duration
from simulations.compare_report import accuracy_table, mean_std, write_report
from simulations.simulate import merged_config, read_overlay


def fake_rows(final: float, rounds: int = 2) -> list[dict[str, Any]]:
    """Per-round rows of a run that ends at ``final`` accuracy."""
    rows: list[dict[str, Any]] = [
        {"round": r, "eval_accuracy": 0.25 + (final - 0.25) * r / rounds, "eval_loss": 1.0} for r in range(rounds + 1)
    ]
    for row in rows[1:]:
        row["mean_min_rank_energy"] = 1.0 - final / (1 + row["round"])
    return rows


FINALS = {"svd": 0.8, "svd-plain": 0.75, "raflora": 0.78, "fedavg": 0.7, "ffa": 0.6, "centralized": 0.9, "local": 0.5}


class FakeRunner:
    """Records which cells ran; returns rows whose final accuracy is set per method, or raises for chosen cells."""

    def __init__(self, fail: tuple[str, ...] = ()) -> None:
        self.ran: list[str] = []
        self.fail = fail

    def __call__(
        self, cell: Cell, overlay: dict[str, Any], cell_dir: Path, echo: Any, engine: str
    ) -> list[dict[str, Any]]:
        cell_dir.mkdir(parents=True, exist_ok=True)
        self.ran.append(cell.name)
        if cell.name in self.fail:
            raise RuntimeError("simulated failure")
        return fake_rows(FINALS[cell.method] + 0.01 * cell.seed)


def test_plan_covers_the_matrix_with_unique_names() -> None:
    cells = plan(range(3))
    assert len(cells) == (len(RULE_NAMES) + len(BASELINES)) * 2 * 3 * 3
    assert len({c.name for c in cells}) == len(cells)
    assert Cell("svd", "heterogeneous", "two-labels", 2).name == "svd-heterogeneous-two-labels-s2"
    assert {c.kind for c in cells} == {"federated", "centralized", "local"}
    with pytest.raises(ValueError, match="unknown method 'fedprox'"):
        plan([0], ["fedprox"])


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.name)
def test_every_overlay_uses_known_keys(path: Path) -> None:
    merged, _ = merged_config(read_overlay(path), {})  # raises on an unknown key
    assert merged


def test_cell_overlay_composes_scale_ranks_data_rule_and_seed() -> None:
    overlay = cell_overlay("tiny", Cell("ffa", "heterogeneous", "two-labels", 2))
    assert overlay["model"] == "tiny"
    assert overlay["node-ranks"] == "2,4,4,8,8,16,16,32"
    assert overlay["partitioner"] == "pathological" and overlay["labels-per-node"] == 2
    assert (overlay["rule"], overlay["seed"], overlay["num-nodes"]) == ("ffa", 2, 8)
    baseline = cell_overlay("full", Cell("local", "homogeneous", "iid", 0), extra={"local-steps": 3})
    assert "rule" not in baseline and baseline["local-steps"] == 3 and baseline["node-ranks"] == "8"


def test_fingerprint_changes_with_the_overlay_and_the_engine_of_federated_cells() -> None:
    cell, local = Cell("svd", "homogeneous", "iid", 0), Cell("local", "homogeneous", "iid", 0)
    overlay = cell_overlay("tiny", cell)
    assert fingerprint(cell, overlay) == fingerprint(cell, dict(overlay))
    assert fingerprint(cell, overlay) != fingerprint(cell, {**overlay, "local-steps": 1})
    assert fingerprint(cell, overlay, "flower") != fingerprint(cell, overlay, "inprocess")
    assert fingerprint(local, overlay, "flower") == fingerprint(local, overlay, "inprocess")


def test_completed_cells_are_not_rerun(tmp_path: Path) -> None:
    # Arrange
    cells = plan([0, 1], ["svd", "local"], ["homogeneous"], ["iid"])
    first = FakeRunner()
    # Act
    results, failures = run_matrix(cells, "tiny", tmp_path, runner=first, echo=lambda _: None)
    second = FakeRunner()
    again, _ = run_matrix(cells, "tiny", tmp_path, runner=second, echo=lambda _: None)
    # Assert
    assert sorted(first.ran) == sorted(c.name for c in cells) and not failures
    assert second.ran == []
    assert [r["cell"] for r in again] == [r["cell"] for r in results]
    saved = json.loads((tmp_path / cells[0].name / RESULT_FILE).read_text())
    assert saved["final_accuracy"] == pytest.approx(0.8) and saved["engine"] == "flower"


def test_failed_and_stale_cells_run_again(tmp_path: Path) -> None:
    cells = plan([0], ["svd", "fedavg"], ["homogeneous"], ["iid"])
    failing = FakeRunner(fail=(cells[0].name,))
    results, failures = run_matrix(cells, "tiny", tmp_path, runner=failing, echo=lambda _: None)
    assert len(results) == 1 and failures and cells[0].name in failures[0]
    assert not (tmp_path / cells[0].name / RESULT_FILE).exists()

    retry = FakeRunner()
    run_matrix(cells, "tiny", tmp_path, runner=retry, echo=lambda _: None)
    assert retry.ran == [cells[0].name]

    changed = FakeRunner()
    run_matrix(cells, "tiny", tmp_path, extra={"local-steps": 2}, runner=changed, echo=lambda _: None)
    assert sorted(changed.ran) == sorted(c.name for c in cells)


def test_progress_prints_an_estimate_of_the_time_left(tmp_path: Path) -> None:
    lines: list[str] = []
    run_matrix(
        plan([0], ["svd", "fedavg"], ["homogeneous"], ["iid"]), "tiny", tmp_path, runner=FakeRunner(), echo=lines.append
    )
    assert any("left" in line for line in lines)


def test_eta_uses_the_mean_time_of_the_same_kind() -> None:
    remaining = [Cell("svd", "homogeneous", "iid", 1), Cell("local", "homogeneous", "iid", 1)]
    assert eta_seconds({}, remaining) is None
    assert eta_seconds({"federated": [10.0, 20.0], "local": [2.0]}, remaining) == pytest.approx(17.0)
    assert eta_seconds({"federated": [10.0]}, remaining) == pytest.approx(20.0)  # unknown kind: overall mean
    assert (
        format_duration(3725) == "1 h 02 min"
        and format_duration(65) == "1 min 05 s"
        and format_duration(None) == "unknown"
    )


def test_table_shows_mean_and_std_over_seeds_and_bolds_the_best_rule(tmp_path: Path) -> None:
    # Arrange
    methods = ["svd", "svd-plain", "raflora", "fedavg", "ffa", "centralized", "local"]
    cells = plan([0, 1, 2], methods, ["heterogeneous"], ["dirichlet"])
    results, _ = run_matrix(cells, "tiny", tmp_path / "runs", runner=FakeRunner(), echo=lambda _: None)
    # Act
    table = accuracy_table(results)
    report = write_report(results, "tiny", cell_overlay("tiny", cells[0]), tmp_path / "results", 12.0, len(cells))
    # Assert
    assert table[0] == (
        "| ranks | data | svd + keep-residual | svd (plain FlexLoRA) | raflora | fedavg (zero-padded) | ffa "
        "| centralized | local-only |"
    )
    assert table[2].startswith(
        "| heterogeneous 2…32 | Dirichlet α=0.5 | **0.810 ± 0.010** | 0.760 ± 0.010 | 0.790 ± 0.010 | 0.710 ± 0.010 |"
    )
    text = report.read_text()
    for expected in ("Scale **tiny**", "Machine:", "Commit:", "Time:", "aggregation-accuracy.png", "seeds [0, 1, 2]"):
        assert expected in text
    for plot in ("aggregation-accuracy.png", "aggregation-collapse.png"):
        assert f"]({plot})" in text and (tmp_path / "results" / plot).stat().st_size > 0


def test_seeds_are_a_count_or_a_list() -> None:
    from simulations.compare import build_parser

    assert build_parser().parse_args(["--seeds", "3"]).seeds == [0, 1, 2]
    assert build_parser().parse_args(["--seeds", "0,2,3"]).seeds == [0, 2, 3]
    assert build_parser().parse_args([]).seeds == [0, 1, 2]


def test_mean_std_formats() -> None:
    assert mean_std([]) == "—"
    assert mean_std([0.5]) == "0.500 (n=1)"
    assert mean_std([0.7, 0.9]) == "0.800 ± 0.141"


@pytest.mark.slow
def test_the_two_engines_compute_the_same_rounds(tmp_path: Path) -> None:
    """A real tiny cell through a Flower simulation and in process: the same global loss and the same nodes' eval
    loss every round, to the digit, so one report may hold cells of both engines. The nodes sample (half of them
    train, three quarters evaluate each round), so the two engines must also draw the same nodes in the same order."""
    from simulations.compare import main

    losses = {}
    for engine in ("flower", "inprocess"):
        args = ["--scale", "tiny", "--engine", engine, "--threads", "1", "--methods", "svd", "--ranks", "heterogeneous"]
        args += ["--data", "dirichlet", "--seeds", "1", "--runs", str(tmp_path / engine)]
        args += ["--set", "fraction-train=0.5", "--set", "fraction-evaluate=0.75"]
        assert main([*args, "--results", str(tmp_path / f"report-{engine}")]) == 0
        result = json.loads((tmp_path / engine / "svd-heterogeneous-dirichlet-s0" / RESULT_FILE).read_text())
        losses[engine] = [(row["round"], row["global_loss"], row["eval_loss"]) for row in result["rows"]]

    assert len(losses["flower"]) >= 4
    assert losses["flower"] == losses["inprocess"]
    assert losses["flower"][-1][1] < losses["flower"][0][1]  # it trained
