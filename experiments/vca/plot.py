"""Table and plots of the variance-corrected averaging experiment, from experiments/vca/results/.

Usage (from the repository root, after ``python experiments/vca/run.py``)::

    python experiments/vca/plot.py

Writes, next to this script:

- ``summary.json`` and ``summary.md``: per method, split and initialisation, over the seeds: rounds to
  accuracy 0.80, 0.85 (the headline target) and 0.90, final accuracy (round 50) and the mean of rounds
  41-50;
- ``accuracy.png``: mean test accuracy per round (mean over seeds, band: min to max), one panel per
  split and initialisation;
- ``variance.png``: per-layer weight variance over rounds (averaged over the live nodes, then over the
  seeds), ``vca`` vs ``mean`` (and ``fl`` for reference), independent initialisation.

- ``regular8.png``: the runs on the 8-regular graph (seed 0): accuracy and the output layer's variance
  for vca, mean, the 0.5/0.5 merge without correction, and vca with equal weights.

Rows and curves appear for the runs whose files exist.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from run import ALPHAS, INITS, RESULTS, SEEDS, run_name, split_name  # noqa: E402

from simulator.analysis import rounds_to_target  # noqa: E402

#: Methods of the main comparison (3 seeds), then those on the 8-regular graph (seed 0).
MAIN = ("gossip-vca", "gossip-mean", "fl")
REGULAR = ("regular8-vca", "regular8-mean", "regular8-half", "regular8-vcaeq")
METHODS = MAIN + REGULAR
LABELS = {"gossip-vca": "gossip + vca", "gossip-mean": "gossip + mean", "fl": "FL (server, mean)",
          "regular8-vca": "8-regular + vca", "regular8-mean": "8-regular + mean",
          "regular8-half": "8-regular + 0.5 own/0.5 received, uncorrected",
          "regular8-vcaeq": "8-regular + vca, equal weights"}
COLORS = {"gossip-vca": "tab:blue", "gossip-mean": "tab:orange", "fl": "tab:green", "regular8-vca": "tab:blue",
          "regular8-mean": "tab:orange", "regular8-half": "tab:red", "regular8-vcaeq": "tab:purple"}
#: The paper's topology (seed 0 only) is drawn dashed.
STYLES = dict.fromkeys(REGULAR, "--")
TARGETS = (0.80, 0.85, 0.90)
HEADLINE = 0.85
#: Rounds averaged for the "end" accuracy: the last ten.
TAIL = 10


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _fmt_rounds(values: list[int | None]) -> str:
    """Mean over seeds of rounds to a target, then the per-seed values; "n/r" (not reached) and "-" for the
    seeds that never got there."""
    shown = ["-" if v is None else str(v) for v in values]
    if any(v is None for v in values):
        return f"n/r ({', '.join(shown)})"
    return f"{statistics.fmean(v for v in values if v is not None):.1f} ({', '.join(shown)})"


def summarize() -> dict[str, Any]:
    """Per (split, init, method): rounds to each target per seed, final and tail accuracy."""
    out: dict[str, Any] = {}
    for alpha in ALPHAS:
        for init in INITS:
            for method in METHODS:
                per_seed = [load(run_name(method, alpha, init, s)) for s in SEEDS]
                done = [r for r in per_seed if r is not None]
                if not done:
                    continue
                key = f"{split_name(alpha)}/{init}/{method}"
                entry: dict[str, Any] = {"seeds": [s for s, r in zip(SEEDS, per_seed, strict=True) if r is not None]}
                for t in TARGETS:
                    entry[f"rounds_to_{t:.2f}"] = [rounds_to_target(r["rounds"], t) for r in done]
                entry["final_accuracy"] = [r["final_accuracy"] for r in done]
                entry["tail_accuracy"] = [round(statistics.fmean(x["accuracy"] for x in r["rounds"][-TAIL:]), 4)
                                          for r in done]
                out[key] = entry
    return out


def table(summary: dict[str, Any]) -> str:
    """The markdown table of docs/experiments.md."""
    lines = ["| split | init | method | rounds to 0.80 | rounds to 0.85 | rounds to 0.90 | final acc. (%) | "
             "mean acc. rounds 41-50 (%) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, e in summary.items():
        split, init, method = key.split("/")
        split = "IID" if split == "iid" else f"Dir {split[3:]}"
        cells = [_fmt_rounds(e[f"rounds_to_{t:.2f}"]) for t in TARGETS]
        final = 100 * statistics.fmean(e["final_accuracy"])
        tail = 100 * statistics.fmean(e["tail_accuracy"])
        lines.append(f"| {split} | {init} | {LABELS[method]} | {' | '.join(cells)} | {final:.1f} | {tail:.1f} |")
    return "\n".join(lines) + "\n"


def _curves(method: str, alpha: float | None, init: str, key: str) -> list[list[Any]]:
    runs = [load(run_name(method, alpha, init, s)) for s in SEEDS]
    return [[row[key] for row in r["rounds"]] for r in runs if r is not None]


def plot_accuracy(path: Path, methods: tuple[str, ...] = (*MAIN, "regular8-vca", "regular8-mean")) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(ALPHAS), len(INITS), figsize=(11, 7.5), dpi=100, sharex=True, sharey=True)
    for i, alpha in enumerate(ALPHAS):
        for j, init in enumerate(INITS):
            ax = axes[i][j]
            for method in methods:
                curves = _curves(method, alpha, init, "accuracy")
                if not curves:
                    continue
                xs = list(range(1, len(curves[0]) + 1))
                mean = [statistics.fmean(c[k] for c in curves) for k in range(len(xs))]
                ax.plot(xs, mean, color=COLORS[method], ls=STYLES.get(method, "-"), label=LABELS[method])
                ax.fill_between(xs, [min(c[k] for c in curves) for k in range(len(xs))],
                                [max(c[k] for c in curves) for k in range(len(xs))], color=COLORS[method], alpha=0.15)
            ax.axhline(HEADLINE, color="grey", lw=0.8, ls=":")
            title = "IID" if alpha is None else f"Dirichlet {alpha}"
            ax.set_title(f"{title}, {init} initialisation")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            if i == len(ALPHAS) - 1:
                ax.set_xlabel("round (every node trains 10 steps)")
            if j == 0:
                ax.set_ylabel("mean test accuracy")
    axes[0][0].legend(loc="lower right")
    fig.suptitle(f"100 nodes, digits-mlp: mean over seeds {', '.join(map(str, SEEDS))} (band: min-max); "
                 f"dotted: target {HEADLINE}; dashed: 8-regular graph, seed 0")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_variance(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(r for r in (load(run_name("gossip-vca", None, "independent", s)) for s in SEEDS) if r is not None)
    # Weight matrices first (the tensors vca rescales), then biases, each in layer order.
    layers = sorted(first["rounds"][0]["layer_variance"], key=lambda n: (not n.endswith("weight"), n))
    fig, axes = plt.subplots(len(ALPHAS), len(layers), figsize=(14, 6.5), dpi=100, sharex=True)
    for i, alpha in enumerate(ALPHAS):
        for j, layer in enumerate(layers):
            ax = axes[i][j]
            for method in (*MAIN, "regular8-vca", "regular8-mean"):
                curves = _curves(method, alpha, "independent", "layer_variance")
                if not curves:
                    continue
                xs = list(range(1, len(curves[0]) + 1))
                ax.plot(xs, [statistics.fmean(c[k][layer] for c in curves) for k in range(len(xs))],
                        color=COLORS[method], ls=STYLES.get(method, "-"), label=LABELS[method])
            # The initial variance of a PyTorch Linear layer, U(+-1/sqrt(fan_in)): 1 / (3 fan_in).
            if layer.endswith("weight"):
                ax.axhline(1 / (3 * 64), color="grey", lw=0.8, ls=":")
            ax.set_yscale("log")
            split = "IID" if alpha is None else f"Dir {alpha}"
            ax.set_title(f"{layer} ({split})", fontsize=10)
            ax.grid(alpha=0.3, which="both")
            if i == len(ALPHAS) - 1:
                ax.set_xlabel("round")
            if j == 0:
                ax.set_ylabel("variance of the weights\n(mean over live nodes)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Per-layer weight variance, independent initialisation (mean over seeds); "
                 "dotted: variance at initialisation, 1/(3*64); dashed: 8-regular graph, seed 0")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_regular(path: Path) -> None:
    """Accuracy and the variance of the output layer's weights on the 8-regular graph: which part of vca helps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(ALPHAS), figsize=(11, 7.5), dpi=100, sharex=True)
    for j, alpha in enumerate(ALPHAS):
        for method in REGULAR:
            run = load(run_name(method, alpha, "independent", 0))
            if run is None:
                continue
            xs = [row["round"] for row in run["rounds"]]
            axes[0][j].plot(xs, [row["accuracy"] for row in run["rounds"]], color=COLORS[method], label=LABELS[method])
            axes[1][j].plot(xs, [row["layer_variance"]["3.weight"] for row in run["rounds"]], color=COLORS[method])
        split = "IID" if alpha is None else f"Dirichlet {alpha}"
        axes[0][j].set_title(f"{split}: mean test accuracy")
        axes[0][j].axhline(HEADLINE, color="grey", lw=0.8, ls=":")
        axes[0][j].set_ylim(0, 1)
        axes[1][j].set_title(f"{split}: variance of 3.weight (mean over nodes)")
        axes[1][j].axhline(1 / (3 * 64), color="grey", lw=0.8, ls=":")
        axes[1][j].set_yscale("log")
        axes[1][j].set_xlabel("round")
        for ax in (axes[0][j], axes[1][j]):
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle("100 nodes on a random 8-regular graph (every node merges its 8 neighbours each round), "
                 "independent initialisation, seed 0")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    summary = summarize()
    (HERE / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = table(summary)
    (HERE / "summary.md").write_text(md)
    print(md)
    plot_accuracy(HERE / "accuracy.png")
    plot_variance(HERE / "variance.png")
    plot_regular(HERE / "regular8.png")
    print(f"wrote {HERE / 'summary.md'} and the PNGs accuracy, variance, regular8 in {HERE}")


if __name__ == "__main__":
    main()
