"""Causal-LM federations through the real runtime: ``fedlora simulate`` of the tiny Llama on Flower's simulation
engine, two nodes at ranks 2 and 4, the Friends lines with svd and the chatterbot chats with ffa. The exported
adapter loads with stock peft on ``AutoModelForCausalLM`` and gives the coordinator's final global perplexity; a run
killed from outside resumes to the same adapter."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from conftest import SimulationRun, fedlora_command, run_fedlora, settings_flags, simulate

pytestmark = pytest.mark.slow

LLM_SETTINGS = {
    "model": "tiny-llama", "node-ranks": "2,4", "num-rounds": 2, "local-steps": 10, "batch-size": 8,
    "learning-rate": 0.01, "lora-alpha": 8.0, "eval-examples": 8, "train-examples": 60, "global-eval-examples": 48,
}  # fmt: skip
CASES = {"friends": ("svd", 32), "chatterbot": ("ffa", 96)}
"""task → (rule, max-length)."""


@pytest.fixture(scope="module", params=sorted(CASES))
def llm_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> SimulationRun:
    """One real ``fedlora simulate`` per task, shared by the tests of this module."""
    rule, max_length = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    return simulate(tmp, nodes=2, cpus_per_node=1, task=request.param, rule=rule, **{"max-length": max_length},
                    **LLM_SETTINGS)  # fmt: skip


def test_a_causal_lm_federation_runs_on_flower_and_exports_a_stock_peft_adapter(llm_run: SimulationRun) -> None:
    # Assert: completed, the perplexity of the exported adapter on the fixed set fell, and the files say causal LM.
    run = llm_run
    assert run.returncode == 0, run.output[-3000:]
    rows = run.metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["global_perplexity"] < rows[0]["global_perplexity"]
    assert rows[-1]["eval_perplexity"] < rows[0]["eval_perplexity"]
    assert "perplexity" in (run.out_dir / "summary.txt").read_text()
    adapter_config = json.loads((run.out_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "CAUSAL_LM"
    assert adapter_config["r"] == 4
    # Stock transformers + peft, from the folder the adapter names, give the coordinator's final number.
    assert stock_perplexity(run.out_dir, run.config()) == pytest.approx(rows[-1]["global_perplexity"], rel=1e-4)


def test_the_dashboard_shows_a_causal_run_by_its_perplexity(llm_run: SimulationRun, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    from simulations.screenshot_dashboard import VIEWPORT, free_port, launch_chromium, start_dashboard, stop

    rows = llm_run.metrics()
    with sqlite3.connect(llm_run.store) as db:
        ((run_id,),) = db.execute("SELECT run_id FROM runs").fetchall()
    port = free_port()
    with (tmp_path / "dashboard.log").open("wb") as log, sync_playwright() as playwright:
        dashboard = start_dashboard(llm_run.store, port, log)
        try:
            page = launch_chromium(playwright).new_page(viewport=VIEWPORT)  # type: ignore[arg-type]
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"http://127.0.0.1:{port}/runs/{run_id}")
            page.wait_for_function("document.body.dataset.lastRound === '2'")
            # Assert: perplexity, not accuracy, everywhere the run's measure is shown; the numbers are the run's.
            best = min(rows, key=lambda r: r["global_perplexity"])
            assert page.locator("#best-title").text_content() == "Best perplexity"
            assert page.locator("#best-accuracy").inner_text() == f"{best['global_perplexity']:.2f}"
            assert page.locator("#global-metric-head").text_content() == "Global perplexity"
            chart = page.evaluate(
                "(() => { const c = Chart.getChart('chart-eval'); return {type: c.options.scales.y.type, "
                "label: c.data.datasets[0].label, data: c.data.datasets[0].data}; })()"
            )
            assert chart["type"] == "logarithmic" and chart["label"].startswith("global perplexity")
            assert chart["data"] == pytest.approx([r["global_perplexity"] for r in rows])
            cells = page.locator("#rounds-table tbody td.global_perplexity").all_inner_texts()
            assert cells == [f"{r['global_perplexity']:.2f}" for r in reversed(rows)]
            assert errors == []
        finally:
            stop(dashboard)


def stock_perplexity(out_dir: Path, settings: dict[str, object]) -> float:
    """The exported adapter on the run's fixed held-out set, loaded as a user would."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from client.causal_lm import line_perplexities
    from client.task_types import task_type_for
    from common.config import RunConfig

    adapter = out_dir / "adapter"
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), adapter)
    cfg = RunConfig.from_mapping(settings)
    fixed = task_type_for(cfg.task).global_set(cfg)
    assert fixed is not None
    everything, _ = line_perplexities(model, fixed.batch, 16, torch.device("cpu"))
    assert math.isfinite(everything.value)
    return everything.value


@pytest.mark.parametrize("dp", ["local", "central"])
def test_differential_privacy_runs_on_a_causal_lm_and_accounts_epsilon(tmp_path: Path, dp: str) -> None:
    # Act: one round of the tiny Llama on Friends lines under DP-SGD on the nodes, or clipping + noise centrally.
    settings = {**LLM_SETTINGS, "num-rounds": 1, "max-length": 32, "dp": dp, "noise-multiplier": 0.5}
    run = simulate(tmp_path, nodes=2, cpus_per_node=1, task="friends", **settings)
    # Assert
    assert run.returncode == 0, run.output[-3000:]
    rows = run.metrics()
    assert rows[-1]["epsilon"] is not None and 0 < rows[-1]["epsilon"] < math.inf
    assert math.isfinite(rows[-1]["global_perplexity"])
    assert (run.out_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("llm_run", ["friends"], indirect=True)
def test_a_causal_run_killed_from_outside_resumes_to_the_adapter_of_an_uninterrupted_run(
    llm_run: SimulationRun, tmp_path: Path
) -> None:
    from test_resume import TAG, assert_same_outcome, kill_everything, tagged, wait_until

    # Arrange: the Friends run of ``llm_run`` again, its whole process group killed once round 1 is checkpointed.
    tag, run_dir = uuid.uuid4().hex, tmp_path / "run"
    rule, max_length = CASES["friends"]
    settings = {**LLM_SETTINGS, "task": "friends", "rule": rule, "max-length": max_length}
    settings["audit-dir"] = str(tmp_path / "audit")
    command = fedlora_command(
        "simulate", "--cpus-per-node", "1", "--nodes", "2", "--out", str(run_dir),
        "--store", str(tmp_path / "fedlora.db"), *settings_flags(settings),
    )  # fmt: skip
    with (tmp_path / "simulate.log").open("wb") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, TAG: tag}
        )
    try:
        checkpoint = run_dir / "checkpoints" / "round-0001.ckpt"
        wait_until(checkpoint.is_file, proc, timeout=900, what="the round-1 checkpoint")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        kill_everything(proc, tag)
    # Act
    done = run_fedlora("resume", str(run_dir), timeout=900, env={TAG: tag})
    # Assert: it resumed after round 1 and ended with the uninterrupted run's adapter, checkpoints and metrics.
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "resuming from round-0001.ckpt (after round 1)" in done.stdout
    assert not tagged(tag), "the resumed run left processes behind"
    assert_same_outcome(run_dir, llm_run)
