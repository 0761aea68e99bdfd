"""``python -m simulations.bench_robust``: its arguments, a real tiny cell under attack, resuming and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations.bench_robust import main


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "krum"], "unknown method 'krum'; choose from svd, svd-trusting"),
        (["--attacks", "scale-10,flip"], "unknown attack 'flip'; choose from scale-10"),
    ],
)
def test_an_unknown_method_or_attack_is_one_clear_error(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "report")])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing ran


@pytest.mark.slow
def test_a_tiny_attack_cell_runs_resumes_and_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The no-attack row and one attacked cell through the real round engine and nodes; a rerun reuses both, and
    ``--attacks none`` asks for the no-attack row alone."""
    common = ["--scale", "tiny", "--methods", "svd", "--seeds", "0", "--runs", str(tmp_path / "runs")]
    common += ["--results", str(tmp_path / "report")]
    main([*common, "--attacks", "scale-1000", "--attackers", "1"])

    cells = tmp_path / "runs" / "tiny"
    assert sorted(p.name for p in cells.iterdir()) == ["svd-none-0-s0", "svd-scale-1000-1-s0"]
    clean = json.loads((cells / "svd-none-0-s0" / "result.json").read_text())
    attacked = json.loads((cells / "svd-scale-1000-1-s0" / "result.json").read_text())
    assert (clean["attack"], clean["attackers"], attacked["attack"], attacked["attackers"]) == (
        "none",
        0,
        "scale-1000",
        1,
    )
    assert clean["final_accuracy"] > clean["round0_accuracy"]  # it trained
    assert not (cells / "svd-none-0-s0" / "running").exists()
    report = (tmp_path / "report" / "robustness.md").read_text()
    assert "| scale-1000 | 1 | 0 |" in report and "| none | 0 | 0 |" in report
    assert (tmp_path / "report" / "robustness.png").stat().st_size > 0

    capsys.readouterr()
    saved = (cells / "svd-none-0-s0" / "result.json").stat().st_mtime_ns
    main([*common, "--attacks", "none"])
    assert "[1/1]" not in capsys.readouterr().out  # finished cells are not run again
    assert (cells / "svd-none-0-s0" / "result.json").stat().st_mtime_ns == saved
    assert "scale-1000" not in (tmp_path / "report" / "robustness.md").read_text()  # only the row asked for


def test_a_cell_that_fails_is_not_left_marked_as_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cell that raises gives its ``running`` mark back, so a rerun (in this process or another) runs it."""
    import simulations.bench_robust as bench

    def broken(*args: object) -> None:
        raise RuntimeError("the node ran out of memory")

    monkeypatch.setattr(bench, "run_cell", broken)
    args = ["--scale", "tiny", "--methods", "svd", "--attacks", "none", "--runs", str(tmp_path / "runs")]
    with pytest.raises(RuntimeError, match="out of memory"):
        main([*args, "--results", str(tmp_path / "report")])
    cell = tmp_path / "runs" / "tiny" / "svd-none-0-s0"
    assert cell.is_dir() and not (cell / "running").exists() and not (cell / "result.json").exists()
