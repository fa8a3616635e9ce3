"""Byzantine sweep: every attack x every rule, MoDeST and gossip, 20 nodes of which 4 attack (docs/experiments.md).

Usage (from the repository root, with the package importable):

    python experiments/byzantine/run.py sweep [--seeds 1,2] [--rounds 15]   # runs, then writes the table
    python experiments/byzantine/run.py table                               # table + plots from results/

Each run is the simulation that this command runs (printed as it goes):

    p2pnode sim --nodes 20 --rounds 15 --topology T --rule R --seed S --byzantine 4 --attack A --quiet

(the clean runs have no ``--byzantine``/``--attack``). Results go to ``experiments/byzantine/results/``
(one JSON per run, as ``p2pnode sim --out`` writes it), the table to ``experiments/byzantine/table.md``
and ``summary.json``, the plots to ``experiments/byzantine/*.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TOPOLOGIES = ("modest", "gossip")
ATTACKS = ("none", "sign_flip", "gaussian", "scaled", "alie", "ipm", "random", "label_flip")
RULES = ("mean", "median", "trimmed_mean", "multikrum", "centered_clip", "flag")
#: Rule parameters of the sweep. trimmed_mean drops 2 values per side (the expected number of attackers among
#: 10 inputs when a fifth of the nodes attack); its default (trim = the most it tolerates) is the median.
RULE_PARAMS: dict[str, dict[str, Any]] = {"trimmed_mean": {"trim": 2}}
NODES = 20
BYZANTINE = 4


def command(topology: str, attack: str, rule: str, seed: int, rounds: int) -> str:
    cmd = f"p2pnode sim --nodes {NODES} --rounds {rounds} --topology {topology} --rule {rule} --seed {seed}"
    for k, v in RULE_PARAMS.get(rule, {}).items():
        cmd += f" --rule-param {k}={v}"
    if attack != "none":
        cmd += f" --byzantine {BYZANTINE} --attack {attack}"
    return cmd + " --quiet"


def result_path(topology: str, attack: str, rule: str, seed: int) -> Path:
    return RESULTS / f"{topology}-{attack}-{rule}-s{seed}.json"


def sweep(seeds: list[int], rounds: int, force: bool) -> None:
    from simulator import SimConfig, run_simulation

    RESULTS.mkdir(parents=True, exist_ok=True)
    total = len(TOPOLOGIES) * len(ATTACKS) * len(RULES) * len(seeds)
    done = 0
    t_all = time.perf_counter()
    for seed in seeds:
        for topology in TOPOLOGIES:
            for attack in ATTACKS:
                for rule in RULES:
                    done += 1
                    path = result_path(topology, attack, rule, seed)
                    if path.exists() and not force:
                        continue
                    cfg = SimConfig.of(nodes=NODES, rounds=rounds, topology=topology, rule=rule, seed=seed,
                                       rule_params=dict(RULE_PARAMS.get(rule, {})),
                                       byzantine=0 if attack == "none" else BYZANTINE,
                                       attack=None if attack == "none" else attack)
                    t0 = time.perf_counter()
                    res = run_simulation(cfg)
                    wall = time.perf_counter() - t0
                    res["command"] = command(topology, attack, rule, seed, rounds)
                    path.write_text(json.dumps(res, sort_keys=True, separators=(",", ":")) + "\n")
                    print(f"[{done}/{total}] {res['command']}  acc={res['final_accuracy']}  "
                          f"auc={res.get('suspicion_auc')}  {wall:.1f}s", flush=True)
    print(f"sweep done in {time.perf_counter() - t_all:.0f} s", flush=True)


def _load() -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for path in sorted(RESULTS.glob("*.json")):
        res = json.loads(path.read_text())
        cfg = res["config"]
        attack = cfg["attack"] if cfg.get("byzantine") else "none"
        out.setdefault((cfg["topology"], attack, cfg["rule"]), []).append(res)
    return out


def table() -> dict[str, Any]:
    runs = _load()
    summary: dict[str, Any] = {}
    lines: list[str] = []
    for topology in TOPOLOGIES:
        acc: dict[str, dict[str, float | None]] = {}
        auc: dict[str, dict[str, float | None]] = {}
        for attack in ATTACKS:
            acc[attack], auc[attack] = {}, {}
            for rule in RULES:
                rs = runs.get((topology, attack, rule), [])
                finals = [r["final_accuracy"] for r in rs if r["final_accuracy"] is not None]
                aucs = [r["suspicion_auc"] for r in rs if r.get("suspicion_auc") is not None]
                acc[attack][rule] = round(statistics.mean(finals), 4) if finals else None
                auc[attack][rule] = round(statistics.mean(aucs), 3) if aucs else None
        seeds = sorted({r["config"]["seed"] for k, v in runs.items() if k[0] == topology for r in v})
        summary[topology] = {"accuracy": acc, "suspicion_auc": auc, "seeds": seeds}
        lines.append(f"### {topology} (final honest accuracy, mean over seeds {seeds}; clean = no attacker)\n")
        lines.append("| attack | " + " | ".join(RULES) + " |")
        lines.append("| --- |" + " --- |" * len(RULES))
        for attack in ATTACKS:
            row = acc[attack]
            vals = [v for v in row.values() if v is not None]
            best = max(vals) if vals else None
            cells = []
            for rule in RULES:
                v = row[rule]
                if v is None:
                    cells.append("-")
                    continue
                # Bold: best or within 0.5 points of the best of the row (tied-best).
                cells.append(f"**{v:.3f}**" if best is not None and v >= best - 0.005 and attack != "none"
                             else f"{v:.3f}")
            lines.append(f"| {'clean' if attack == 'none' else attack} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(f"Suspicion AUC ({topology}): chance that an attacker's mean score exceeds an honest peer's.\n")
        lines.append("| attack | " + " | ".join(RULES) + " |")
        lines.append("| --- |" + " --- |" * len(RULES))
        for attack in ATTACKS[1:]:
            cells = ["-" if auc[attack][r] is None else f"{auc[attack][r]:.2f}" for r in RULES]
            lines.append(f"| {attack} | " + " | ".join(cells) + " |")
        lines.append("")
        summary[topology]["checks"] = _checks(acc)
    (HERE / "table.md").write_text("\n".join(lines) + "\n")
    (HERE / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    _plot(summary)
    print("\n".join(lines))
    print(json.dumps({t: summary[t]["checks"] for t in TOPOLOGIES}, indent=1))
    return summary


def _checks(acc: dict[str, dict[str, float | None]]) -> dict[str, Any]:
    """The experiment's targets: flag within 2 points of clean and best or tied-best (0.5 points) per attack;
    mean broken (10 points or more below clean) per attack."""
    clean_flag = acc["none"]["flag"]
    clean_mean = acc["none"]["mean"]
    out: dict[str, Any] = {"flag_within_2pt": [], "flag_best_or_tied": [], "mean_broken": []}
    for attack in ATTACKS[1:]:
        row = acc[attack]
        f = row["flag"]
        vals = [v for v in row.values() if v is not None]
        if f is not None and clean_flag is not None and f >= clean_flag - 0.02:
            out["flag_within_2pt"].append(attack)
        if f is not None and vals and f >= max(vals) - 0.005:
            out["flag_best_or_tied"].append(attack)
        m = row["mean"]
        if m is not None and clean_mean is not None and m < clean_mean - 0.10:
            out["mean_broken"].append(attack)
    out["flag_within_2pt_and_best"] = [a for a in out["flag_within_2pt"] if a in out["flag_best_or_tied"]]
    return out


def _plot(summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TOPOLOGIES), figsize=(13, 5), dpi=100)
    for ax, topology in zip(axes, TOPOLOGIES, strict=True):
        acc = summary[topology]["accuracy"]
        grid = [[acc[a][r] if acc[a][r] is not None else float("nan") for r in RULES] for a in ATTACKS]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(RULES)), RULES, rotation=30, ha="right")
        ax.set_yticks(range(len(ATTACKS)), ["clean" if a == "none" else a for a in ATTACKS])
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black",
                            fontsize=8)
        ax.set_title(f"{topology}: final honest accuracy\n{NODES} nodes, {BYZANTINE} attackers, digits-mlp")
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.savefig(HERE / "accuracy.png", bbox_inches="tight")
    plt.close(fig)
    _plot_curves(plt)


def _plot_curves(plt: Any) -> None:
    """Honest accuracy per round under ``scaled`` and ``alie`` (lowest seed), a few rules, and flag clean."""
    runs = _load()
    shown = ("mean", "median", "centered_clip", "flag")
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), dpi=100, sharey=True)
    for row, topology in enumerate(TOPOLOGIES):
        for col, attack in enumerate(("scaled", "alie")):
            ax = axes[row][col]
            for rule, cases in [(r, [(attack, r)]) for r in shown] + [("flag, clean", [("none", "flag")])]:
                rs = runs.get((topology, *cases[0]), [])
                if not rs:
                    continue
                res = min(rs, key=lambda r: r["config"]["seed"])
                rows = res["rounds"]
                ax.plot([r["round"] for r in rows], [r["accuracy"] for r in rows], marker=".",
                        linestyle="--" if "clean" in rule else "-", label=rule)
            ax.set_title(f"{topology}, {attack} (4 of 20 attack), seed {min(_seeds(runs))}")
            ax.set_xlabel("round")
            ax.set_ylabel("honest test accuracy")
            ax.set_ylim(0, 1)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "curves.png")
    plt.close(fig)


def _seeds(runs: dict[tuple[str, str, str], list[dict[str, Any]]]) -> list[int]:
    return sorted({r["config"]["seed"] for v in runs.values() for r in v}) or [0]


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["sweep", "table"])
    ap.add_argument("--seeds", default="1,2", help="comma-separated seeds (default 1,2)")
    ap.add_argument("--rounds", type=int, default=15, help="rounds per run (default 15)")
    ap.add_argument("--force", action="store_true", help="rerun runs whose result file exists")
    args = ap.parse_args(argv)
    if args.what == "sweep":
        sweep([int(s) for s in args.seeds.split(",")], args.rounds, args.force)
    table()


if __name__ == "__main__":
    main(sys.argv[1:])
