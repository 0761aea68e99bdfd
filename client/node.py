"""What a node does for one message, as plain functions of plain types: one path for every task type.

serve → load at this node's rank → train (DP-SGD under ``dp = "local"``) → reply with factors, head and metrics.
What differs between a classifier and a causal LM (model, targets, data, training step, metric) comes from the
node's :class:`client.task_types.TaskType`; the ClientApp only decodes and encodes.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch
from peft import PeftModel

from client.dp_train import LocalDPSettings, train_private
from client.model import LoRASettings, freeze_lora_A_inplace, get_adapter, load_adapter_inplace
from client.node_settings import NodeSettings
from client.privacy import NodePrivacyState, ledger_path, state_dir
from client.task_types import task_type_for
from client.train import TrainSettings, pick_device
from common.config import RunConfig
from common.lora import lora_scaling
from common.rules.factored_svd import svd_reproject
from common.updates import AdapterFactors, EvaluateReply, Instruction, NodeInfo, TrainReply
from common.validation import Layout, check_instruction


def device_summary(device: torch.device) -> str:
    """A short description of the compute this node trains on."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {os.cpu_count()} cores"


def node_info(cfg: RunConfig, node: NodeSettings) -> NodeInfo:
    """Rank, scaling, name and device of this node."""
    scaling = lora_scaling(cfg.lora.lora_alpha, node.rank, cfg.lora.use_rslora)
    return NodeInfo(node.rank, scaling, node.name, device_summary(pick_device()))


def build_model(cfg: RunConfig, node: NodeSettings, ins: Instruction | None) -> tuple[PeftModel, LoRASettings]:
    """The node's model at its rank, loaded with the global factors of ``ins`` (if any), else at the public start."""
    model, settings = task_type_for(node.data).model(cfg, node)
    if ins is not None and ins.adapter is not None:
        load_global_inplace(model, ins, settings, node.name)
    return model, settings


def load_global_inplace(model: PeftModel, ins: Instruction, settings: LoRASettings, node_name: str) -> None:
    """Check the global factors of ``ins`` against this model, then load them at this node's rank.

    The same checks the coordinator runs on replies (keys, shapes at the sent rank, dtype, finite values); a node
    refuses damaged factors with the reason instead of loading them.
    """
    assert ins.adapter is not None
    reason = check_instruction(ins, ins.rank, Layout.from_adapter(get_adapter(model)))
    if reason is not None:
        raise ValueError(f"node {node_name} refuses the global factors of round {ins.server_round}: {reason}")
    load_adapter_inplace(model, fit_to_rank(ins, settings), settings)


def fit_to_rank(ins: Instruction, settings: LoRASettings) -> AdapterFactors:
    """Global factors at this node's rank; re-projected locally when the coordinator used another rank."""
    assert ins.adapter is not None
    if ins.rank == settings.rank and abs(ins.scaling - settings.scaling) <= 1e-9 * settings.scaling:
        return ins.adapter
    lora = {}
    for module, (lora_A, lora_B) in ins.adapter.lora.items():
        ((a, b),) = svd_reproject([(lora_A, lora_B, ins.scaling)], [1.0], [(settings.rank, settings.scaling)])
        lora[module] = (a.numpy().astype(np.float32), b.numpy().astype(np.float32))
    return AdapterFactors(lora, ins.adapter.head)


def round_seed(seed: int, server_round: int, node: NodeSettings) -> int:
    """A seed of its own for every (run seed, round, node): batch order, and DP noise when a test fixes it."""
    return seed * 100_003 + server_round * 1_009 + node.partition_id


def privacy_state(cfg: RunConfig, node: NodeSettings) -> NodePrivacyState:
    """This node's ledger for this run: one file per (node name, seed, coordinator out-dir) in the state folder.

    The out-dir is only hashed (nodes cannot see coordinator paths); it tells runs apart and is the same when a
    run is resumed, so ε continues across node and coordinator restarts.
    """
    run_key = hashlib.sha256(f"{cfg.seed}|{cfg.output.out_dir}".encode()).hexdigest()[:12]
    path = ledger_path(state_dir(node.state_dir), node.name, run_key)
    return NodePrivacyState(path, delta=cfg.privacy.delta, mechanism=cfg.privacy.accountant)


def local_dp_settings(cfg: RunConfig, node: NodeSettings, server_round: int) -> LocalDPSettings:
    """DP-SGD settings of this node; a fixed noise seed (tests only) differs per node and round."""
    privacy = cfg.privacy
    seed = None if privacy.noise_seed < 0 else round_seed(privacy.noise_seed, server_round, node)
    return LocalDPSettings(
        noise_multiplier=privacy.noise_multiplier,
        max_grad_norm=privacy.max_grad_norm,
        delta=privacy.delta,
        target_epsilon=privacy.target_epsilon,
        accountant=privacy.accountant,
        planned_steps=cfg.num_rounds * cfg.training.local_steps,
        seed=seed,
    )


def train_node(cfg: RunConfig, node: NodeSettings, ins: Instruction) -> TrainReply:
    """Load the global adapter at this node's rank, train locally (DP-SGD under local DP), return factors and head.

    Under ``dp = "local"`` the reply's ``epsilon`` is this node's cumulative ε; a node whose budget is spent raises
    :class:`client.dp_train.PrivacyBudgetExhausted`, which Flower turns into an error reply with the reason.
    """
    task = task_type_for(node.data)
    model, _ = build_model(cfg, node, ins)
    if ins.freeze_lora_A:
        freeze_lora_A_inplace(model)
    data = task.data(cfg, node)
    settings = TrainSettings.from_config(
        cfg, cfg.training.local_steps, round_seed(cfg.seed, ins.server_round, node), ins.server_round
    )
    privacy: dict[str, float] = {}
    if cfg.privacy.dp == "local":
        dp = local_dp_settings(cfg, node, ins.server_round)
        private = train_private(model, data.train, settings, dp, privacy_state(cfg, node), pick_device())
        result = private.result
        privacy = {"epsilon": private.epsilon, "noise-multiplier": private.noise_multiplier}
    else:
        result = task.train(model, data.train, settings, pick_device())
    losses = {
        "train-loss": result.mean_loss,
        "train-loss-first": result.first_loss,
        "train-loss-last": result.last_loss,
    }
    metrics = {k: v for k, v in losses.items() if math.isfinite(v)} | privacy
    return TrainReply(get_adapter(model), data.num_train, node_info(cfg, node), metrics)


def evaluate_node(cfg: RunConfig, node: NodeSettings, ins: Instruction) -> EvaluateReply:
    """Evaluate the global adapter (at this node's rank) on the node's held-out split."""
    task = task_type_for(node.data)
    model, _ = build_model(cfg, node, ins)
    num_examples, metrics = task.evaluate(model, task.data(cfg, node).test, cfg, pick_device())
    return EvaluateReply(num_examples, node_info(cfg, node), metrics)
