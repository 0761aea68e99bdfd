"""``python -m simulations.plot_epsilon``: DP cells of ``simulations.compare`` drawn as accuracy against ε."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from simulations.plot_epsilon import main


def cell(folder: Path, accuracies: list[float], nodes: int = 8) -> Path:
    """A finished compare cell with the global metric after every round."""
    rows = [{"round": i, "global_accuracy": a, "global_loss": 3.0 - a} for i, a in enumerate(accuracies)]
    result = {"method": "svd", "metric": "global", "overlay": {"num-nodes": nodes}, "rows": rows, "seconds": 60.0}
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(result))
    return folder


def test_cells_become_a_plot_and_a_csv_with_every_round(tmp_path: Path) -> None:
    off = cell(tmp_path / "off" / "svd-s0", [0.05, 0.5, 0.72])
    eps8 = cell(tmp_path / "eps8" / "svd-s0", [0.05, 0.3, 0.49])
    central = cell(tmp_path / "central" / "svd-s0", [0.05, 0.06, 0.053], nodes=100)
    out = tmp_path / "report" / "eps.png"

    assert main(["--out", str(out), "--baseline", f"local={off}", f"local:8={eps8}", f"central:8={central}"]) == 0

    assert out.stat().st_size > 0
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [(r["dp"], r["target_epsilon"], r["final_global_accuracy"]) for r in rows] == [
        ("off (local's baseline)", "inf", "0.72"),
        ("local", "8.0", "0.49"),
        ("central", "8.0", "0.053"),
    ]
    assert rows[1]["cell"] == "eps8/svd-s0"
    assert rows[1]["global_accuracy_per_round"] == "0.0500 0.3000 0.4900"


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("global:8=x", "unknown DP mode 'global'"),
        ("local:0=x", "ε must be a positive number"),
        ("local:inf=x", "ε must be a positive number"),
        ("local8=x", "expected MODE:EPSILON=CELL"),
    ],
)
def test_a_malformed_cell_argument_is_one_clear_error(
    arg: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["--out", str(tmp_path / "eps.png"), arg])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_a_cell_that_is_missing_or_has_no_global_metric_is_named(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"missing/result.json does not exist \(is the cell finished\?\)"):
        main(["--out", str(tmp_path / "eps.png"), f"local:8={tmp_path / 'missing'}"])
    old = tmp_path / "old"
    old.mkdir()
    (old / "result.json").write_text(json.dumps({"metric": "nodes", "rows": [{"round": 0}]}))
    with pytest.raises(SystemExit, match="has no global metric per round"):
        main(["--out", str(tmp_path / "eps.png"), f"local:8={old}"])
    assert not (tmp_path / "eps.png").exists()
