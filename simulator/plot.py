"""Plot of a simulation's results: the task's metric (accuracy, perplexity) and megabytes sent per round."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_results(results: dict[str, Any], path: Path) -> None:
    """Draw the metric (left axis) and MB sent (right axis) per round into a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rounds"]
    xs = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    metric = results.get("metric", "accuracy")
    ax.plot(xs, [r[metric] for r in rows], color="tab:blue", marker=".", label=metric)
    ax.set_xlabel("round")
    ax.set_ylabel(f"mean test {metric}", color="tab:blue")
    if metric == "accuracy":
        ax.set_ylim(0, 1)
    ax2 = ax.twinx()
    ax2.bar(xs, [r["bytes"] / 1e6 for r in rows], color="tab:orange", alpha=0.3, label="MB sent")
    ax2.set_ylabel("MB sent in the round", color="tab:orange")
    cfg = results["config"]
    ax.set_title(f"{cfg['nodes']} nodes, {cfg['task']}, {cfg['topology']} + {cfg['rule']}, seed {cfg['seed']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
