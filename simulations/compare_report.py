"""The report of ``simulations.compare``: ``aggregation.md`` (mean ± std over seeds) and accuracy-per-round plots."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulations.compare_cells import BASELINES, format_duration
from simulations.launcher import PROJECT_DIR

METHOD_LABELS = {
    "svd": "svd + keep-residual",
    "svd-plain": "svd (plain FlexLoRA)",
    "raflora": "raflora",
    "fedavg": "fedavg (zero-padded)",
    "ffa": "ffa",
    "rfa": "rfa (geometric median)",
    "multikrum": "multikrum",
    "centralized": "centralized",
    "local": "local-only",
}
"""Column labels, in the table's order (``svd`` is the rule with its default ``keep-residual = true``)."""
RANK_LABELS = {"homogeneous": "homogeneous r=8", "heterogeneous": "heterogeneous 2…32"}
DATA_LABELS = {"iid": "IID", "dirichlet": "Dirichlet α=0.5", "two-labels": "two labels/node"}
FEDERATED = tuple(m for m in METHOD_LABELS if m not in BASELINES)
ENGINE_TEXT = {
    "flower": "real Flower simulations (`fedlora simulate`, one process per node message)",
    "inprocess": "in-process rounds (`--engine inprocess`): the coordinator's `GlobalAdapter` aggregation and the "
    "nodes' `train_node`/`evaluate_node` called directly, without Flower's transport and per-message processes",
}


def machine() -> str:
    """CPU model, cores, OS, Python, torch and GPU of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        versions = f"torch {torch.__version__}"
    except ImportError:  # pragma: no cover
        gpu, versions = "unknown GPU", "no torch"
    system = f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    return f"{cpu}, {os.cpu_count()} cores, {system}, {versions}, {gpu}"


def commit() -> str:
    """``git describe``-style commit of the checkout, with ``+uncommitted changes`` when tracked files differ."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=30)
        return done.stdout if done.returncode == 0 else ""

    head = git("rev-parse", "--short=12", "HEAD").strip() or "unknown"
    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line]
    if not changed:
        return f"{head} (clean)"
    shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
    return f"{head} + uncommitted changes to {len(changed)} tracked files ({shown})"


def mean_std(values: Sequence[float], seeds: int = 0) -> str:
    """``0.812 ± 0.010`` (sample std over seeds); ``0.812 (n=1)`` for one value, ``… (n=2)`` for fewer values than
    the ``seeds`` of the table; ``—`` for none."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f} (n=1)"
    fewer = f" (n={len(values)})" if len(values) < seeds else ""
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}{fewer}"


def group(results: Sequence[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """Results by (ranks, data, method)."""
    out: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        out.setdefault((r["ranks"], r["data"], r["method"]), []).append(r)
    return out


def accuracy_table(results: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown rows: one per (ranks, data), one column per method; the best federated mean in bold."""
    groups = group(results)
    methods = [m for m in METHOD_LABELS if any(key[2] == m for key in groups)]
    seeds = len({r["seed"] for r in results})
    lines = [
        "| ranks | data | " + " | ".join(METHOD_LABELS[m] for m in methods) + " |",
        "|---|---|" + "---:|" * len(methods),
    ]
    for ranks in RANK_LABELS:
        for data in DATA_LABELS:
            finals = {m: [float(r["final_accuracy"]) for r in groups.get((ranks, data, m), [])] for m in methods}
            if not any(finals.values()):
                continue
            means = {m: statistics.fmean(v) for m, v in finals.items() if v and m in FEDERATED}
            top = max(means.values(), default=None)
            best = {m for m, v in means.items() if top is not None and v >= top - 1e-12}
            cells = [mean_std(finals[m], seeds) for m in methods]
            cells = [f"**{cell}**" if m in best else cell for m, cell in zip(methods, cells, strict=True)]
            lines.append(f"| {RANK_LABELS[ranks]} | {DATA_LABELS[data]} | " + " | ".join(cells) + " |")
    return lines


def scale_line(scale: str, overlay: dict[str, Any]) -> str:
    """The scale and the settings every cell shares."""
    keys: tuple[str, ...] = (
        "model",
        "task",
        "num-nodes",
        "num-rounds",
        "local-steps",
        "batch-size",
        "learning-rate",
        "head-lr-ratio",
        "schedule-span",
        "max-length",
    )
    keys += ("train-examples", "eval-examples")
    settings = ", ".join(f"{k} = {overlay[k]}" for k in keys if k in overlay)
    return f"Scale **{scale}** (`simulations/experiments/scale-{scale}.toml`): {settings}."


def time_lines(results: Sequence[dict[str, Any]], wall_seconds: float) -> list[str]:
    """Compute time of the cells (summed, and mean per kind) and this invocation's wall time."""
    kinds: dict[str, list[float]] = {}
    for r in results:
        kinds.setdefault("federated" if r["method"] in FEDERATED else r["method"], []).append(float(r["seconds"]))
    per_kind = ", ".join(f"{k} {format_duration(statistics.fmean(v))}" for k, v in sorted(kinds.items()))
    total = sum(sum(v) for v in kinds.values())
    return [
        f"- Time: {format_duration(total)} of cell runs in all (mean per cell: {per_kind}); "
        f"the last invocation took {format_duration(wall_seconds)} (finished cells are not rerun)."
    ]


def engines(results: Sequence[dict[str, Any]]) -> str:
    """How the federated cells ran: ``flower`` (real simulations) and/or ``inprocess``."""
    used = sorted({str(r.get("engine", "flower")) for r in results if r["method"] in FEDERATED})
    return " + ".join(used) or "n/a"


def engine_text(results: Sequence[dict[str, Any]]) -> str:
    """How the federated cells ran, in words; with both engines, which cells ran in process."""
    used = engines(results)
    if used in ENGINE_TEXT:
        return ENGINE_TEXT[used]
    inprocess = sorted(r["cell"] for r in results if r["method"] in FEDERATED and r.get("engine") == "inprocess")
    return (
        f"{ENGINE_TEXT['flower']}, except {len(inprocess)} cells run as {ENGINE_TEXT['inprocess']} "
        f"({', '.join(inprocess)}); both engines give the same per-round global losses to every digit "
        "(`tests/test_compare.py::test_the_two_engines_compute_the_same_rounds`)"
    )


METRIC_TEXT = {
    "global": (
        "Final accuracy after the last round of the adapter a user exports (the global adapter at the largest node",
        "rank) on a fixed held-out set of the task, drawn with the cell's seed: every cell of a seed is evaluated",
        "on the same examples. The baselines on the same set: centralized its one model, local-only the mean over",
        "nodes of each node's own adapter.",
    ),
    "nodes": (
        "Final held-out accuracy after the last round (each node evaluates the global adapter at its own rank on its",
        "own held-out split; example-weighted over nodes).",
    ),
}
"""What the table's number is, by :func:`metric_of`."""


def metric_of(results: Sequence[dict[str, Any]]) -> str:
    """``global`` when every federated cell measured the exported adapter on the fixed set, else ``nodes``."""
    federated = [r for r in results if r["method"] in FEDERATED]
    return "global" if federated and all(r.get("metric") == "global" for r in federated) else "nodes"


def accuracy(row: dict[str, Any]) -> float:
    """A round's accuracy: the global metric where the row has it, else the nodes' mean."""
    value = row.get("global_accuracy")
    return float(row["eval_accuracy"] if value is None else value)


BASELINE_NOTES = (
    "- **centralized**: one LoRA at the largest node rank on the pooled data of all nodes, with the federated",
    "  run's total optimizer steps (rounds × nodes × local steps) and one schedule; evaluated on the same fixed",
    "  held-out set as the federated cells.",
    "- **local-only**: every node trains alone at its own rank with the same recipe as a federated node",
    "  (rounds × local steps, optimizer restarted each round); no aggregation. Each node's own adapter is",
    "  evaluated on the same fixed held-out set, and the table gives the mean over nodes.",
    "- The fixed held-out set is drawn, stratified and seeded, from the task's test split and covers every",
    "  label, so under label skew a node's own adapter (local-only) and the one global adapter are both judged",
    "  on labels the node never trained on. Each cell's `result.json` also keeps the nodes' own held-out",
    "  metric (`eval_accuracy`).",
)
"""What the report says about the baselines and the held-out splits."""


def write_report(
    results: Sequence[dict[str, Any]],
    scale: str,
    overlay: dict[str, Any],
    folder: Path,
    wall_seconds: float,
    planned: int,
    command: str = "",
    failures: Sequence[str] = (),
) -> Path:
    """Write ``aggregation.md`` and the plots into ``folder``; return the markdown path."""
    folder.mkdir(parents=True, exist_ok=True)
    plots = plot_accuracy(results, folder / "aggregation-accuracy.png", scale)
    plots += plot_collapse(results, folder / "aggregation-collapse.png", scale)
    seeds = sorted({int(r["seed"]) for r in results})
    round0 = [float(accuracy(r["rows"][0])) for r in results if r["rows"]]
    lines = [
        "# Aggregation rules, against centralized and local-only training",
        "",
        scale_line(scale, overlay),
        "",
        f"- Command: `{command or 'python -m simulations.compare --scale ' + scale}` ({len(results)} of {planned} "
        f"cells; seeds {seeds}; engine {engines(results)}).",
        f"- Machine: {machine()}.",
        f"- Commit: {commit()}; written {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}.",
        *time_lines(results, wall_seconds),
        "",
        *METRIC_TEXT[metric_of(results)],
        "Mean ± sample std over seeds. Bold: the best federated rule(s) of the row. Untrained model (round 0):",
        f"{mean_std(round0)}.",
        "",
        *accuracy_table(results),
        "",
        *BASELINE_NOTES,
        f"- Federated cells: {engine_text(results)}. The numbers are as measured,",
        "  including where a rule we favour loses.",
        "",
        *(
            ["Cells that failed (rerun the command to retry them):", "", *[f"- {f}" for f in failures], ""]
            if failures
            else []
        ),
        "Accuracy per round (mean over seeds, band ± std), and the rank-collapse measure of every federated rule",
        "where it was recorded (`mean_min_rank_energy`: the share of the global update's energy in the smallest",
        "node rank, mean over modules; raFLoRA, arXiv 2602.13486):",
        "",
        *[f"![{p.stem}]({p.name})" for p in plots],
        "",
    ]
    path = folder / "aggregation.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def plot_accuracy(results: Sequence[dict[str, Any]], path: Path, scale: str) -> list[Path]:
    """A grid (rank setting × data split) of accuracy per round, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = group(results)
    if not groups:
        return []
    rank_rows = [r for r in RANK_LABELS if any(k[0] == r for k in groups)]  # only the settings that were run
    data_cols = [d for d in DATA_LABELS if any(k[1] == d for k in groups)]
    size = (5 * len(data_cols), 4 * len(rank_rows) + 0.5)
    fig, axes = plt.subplots(len(rank_rows), len(data_cols), figsize=size, sharey=True, squeeze=False)
    for i, ranks in enumerate(rank_rows):
        for j, data in enumerate(data_cols):
            ax = axes[i][j]
            for method, label in METHOD_LABELS.items():
                runs = groups.get((ranks, data, method), [])
                if not runs:
                    continue
                length = min(len(r["rows"]) for r in runs)
                every = all("global_accuracy" in row for r in runs for row in r["rows"])
                metric = "global_accuracy" if every else "eval_accuracy"  # local-only has it in the last round only
                curves = np.array([[row[metric] for row in r["rows"][:length]] for r in runs], dtype=float)
                x = [row["round"] for row in runs[0]["rows"][:length]]
                mean, std = curves.mean(axis=0), curves.std(axis=0, ddof=1) if len(runs) > 1 else 0 * curves[0]
                style = "-" if method in FEDERATED else "--"
                ax.plot(x, mean, style, marker="o", markersize=3, label=label)
                ax.fill_between(x, mean - std, mean + std, alpha=0.15)
            ax.set_title(f"{RANK_LABELS[ranks]} · {DATA_LABELS[data]}")
            ax.set_xlabel("round")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("held-out accuracy")
    handles, labels = max((ax.get_legend_handles_labels() for ax in axes.flat), key=lambda hl: len(hl[1]))
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=9)
    fig.suptitle(f"Accuracy per round by aggregation rule (scale {scale})")
    fig.tight_layout(rect=(0, 0.04 + 0.05 * (len(rank_rows) == 1 and len(labels) > 3), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def plot_collapse(results: Sequence[dict[str, Any]], path: Path, scale: str) -> list[Path]:
    """Per data split with heterogeneous ranks: ``mean_min_rank_energy`` per round, one line per federated method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = group(results)
    splits = [d for d in DATA_LABELS if any(k[0] == "heterogeneous" and k[1] == d for k in groups)]
    key = "mean_min_rank_energy"
    if not any(key in row for r in results for row in r["rows"]) or not splits:
        return []
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4), sharey=True, squeeze=False)
    for ax, data in zip(axes[0], splits, strict=True):
        for method in FEDERATED:
            runs = [r for r in groups.get(("heterogeneous", data, method), []) if any(key in row for row in r["rows"])]
            if not runs:
                continue
            length = min(len(r["rows"]) for r in runs)
            x = [row["round"] for row in runs[0]["rows"][:length] if row["round"] >= 1]
            curves = np.array(
                [[row.get(key, np.nan) for row in r["rows"][:length] if row["round"] >= 1] for r in runs], dtype=float
            )
            mean = np.nanmean(curves, axis=0)
            ax.plot(x, mean, marker="o", markersize=3, label=METHOD_LABELS[method])
            if len(runs) > 1:
                std = np.nanstd(curves, axis=0, ddof=1)
                ax.fill_between(x, mean - std, mean + std, alpha=0.15)
        ax.set_title(f"{RANK_LABELS['heterogeneous']} · {DATA_LABELS[data]}")
        ax.set_xlabel("round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of ‖G‖² in the smallest rank")
    axes[0][0].legend(fontsize=9)
    fig.suptitle(f"Rank collapse: the global update's energy\nin the smallest node rank (scale {scale})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
