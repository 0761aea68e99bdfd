"""Bad command-line input gets one line that names the problem, a non-zero exit, and no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_fedlora


def check_one_line_error(args: list[str], expected: str) -> None:
    done = run_fedlora(*args, timeout=120)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr + done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("fedlora: error:")
    assert expected in lines[0]


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    check_one_line_error(["simulate", "--config", str(missing), "--out", str(tmp_path / "o")], str(missing))


def test_unknown_rule(tmp_path: Path) -> None:
    check_one_line_error(["simulate", "--rule", "median", "--out", str(tmp_path / "o")], "'median'")


@pytest.mark.parametrize("ranks", ["0,4", "2,-1"])
def test_rank_below_one(tmp_path: Path, ranks: str) -> None:
    check_one_line_error(
        ["simulate", "--set", f'node-ranks="{ranks}"', "--out", str(tmp_path / "o")], "rank must be a positive"
    )


def test_model_path_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "no-model"
    check_one_line_error(["simulate", "--set", f'model="{missing}"', "--out", str(tmp_path / "o")], str(missing))


def test_cpus_per_node_below_one(tmp_path: Path) -> None:
    check_one_line_error(["simulate", "--cpus-per-node", "0", "--out", str(tmp_path / "o")], "--cpus-per-node")


@pytest.mark.parametrize("gpus", ["-1", "0.5"])
def test_gpus_per_node_out_of_range_or_without_a_gpu(tmp_path: Path, gpus: str) -> None:
    import torch

    if gpus == "0.5" and torch.cuda.is_available():
        gpus = "65"  # on a GPU machine, a share is valid: ask for more than the limit instead
    check_one_line_error(["simulate", "--gpus-per-node", gpus, "--out", str(tmp_path / "o")], "--gpus-per-node")


def test_unknown_config_key_in_overlay(tmp_path: Path) -> None:
    overlay = tmp_path / "exp.toml"
    overlay.write_text('rul = "svd"\n')
    check_one_line_error(["simulate", "--config", str(overlay), "--out", str(tmp_path / "o")], "'rul'")


def test_malformed_overlay(tmp_path: Path) -> None:
    overlay = tmp_path / "exp.toml"
    overlay.write_text("num-rounds = = 3\n")
    check_one_line_error(["simulate", "--config", str(overlay), "--out", str(tmp_path / "o")], "not valid TOML")


def test_resume_of_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    check_one_line_error(["resume", str(tmp_path)], "not a fedlora run folder")


def test_no_process_is_started_for_bad_input(tmp_path: Path) -> None:
    run_fedlora("simulate", "--rule", "median", "--out", str(tmp_path / "o"), timeout=120)
    assert not (tmp_path / "o" / "superlink.log").exists()


@pytest.mark.parametrize("command", ["client", "dashboard", "certs", "submit", "generate", "export", "proxy"])
def test_delegated_commands_receive_their_options(command: str) -> None:
    done = run_fedlora(command, "--help", timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"fedlora {command}" in done.stdout or "usage:" in done.stdout
