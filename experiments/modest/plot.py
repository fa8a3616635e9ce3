"""Plots and summary tables of the MoDeST experiments, from the files written by run.py.

Usage (from the repository root): ``python experiments/modest/plot.py``. Writes the PNGs next to this
script and prints the tables used in docs/experiments.md (MoDeST section); also writes ``summary.json``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TOPOLOGIES = ("modest", "fl", "dpsgd", "gossip")
COLORS = {"modest": "tab:blue", "fl": "tab:green", "dpsgd": "tab:red", "gossip": "tab:orange",
          "modest-inact10": "tab:purple"}
LABELS = {"modest": "MoDeST (s=10, a=1)", "fl": "FL (server, s=10)", "dpsgd": "D-PSGD (one-peer exp.)",
          "gossip": "gossip (push-pull)", "modest-inact10": "MoDeST, inactivity threshold 10"}
TARGETS = (0.80, 0.85, 0.90, 0.93)


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def runs(prefix: str) -> list[dict[str, Any]]:
    return [r for r in (load(p.stem) for p in sorted(RESULTS.glob(f"{prefix}-s*.json"))
                        if not p.stem.endswith(".meta")) if r is not None]


def curve(res: dict[str, Any]) -> tuple[list[int], list[float], list[float]]:
    rounds, accs, mbytes = [], [], []
    total = 0
    for row in res["rounds"]:
        total += row["bytes"]
        if row["accuracy"] is not None:
            rounds.append(row["round"])
            accs.append(row["accuracy"])
            mbytes.append(total / 1e6)
    return rounds, accs, mbytes


def bytes_to(res: dict[str, Any], target: float) -> float | None:
    """MB sent until the accuracy first reaches `target` (None: never)."""
    for _, acc, mb in zip(*curve(res), strict=True):
        if acc >= target:
            return mb
    return None


def mean_curve(results: list[dict[str, Any]]) -> tuple[list[int], list[float], list[float], list[float]]:
    curves = [curve(r) for r in results]
    n = min(len(c[0]) for c in curves)
    rounds = curves[0][0][:n]
    accs = [statistics.fmean(c[1][i] for c in curves) for i in range(n)]
    spread = [statistics.pstdev([c[1][i] for c in curves]) for i in range(n)]
    mbytes = [statistics.fmean(c[2][i] for c in curves) for i in range(n)]
    return rounds, accs, spread, mbytes


def compare(split: str, summary: dict[str, Any]) -> None:
    data = {t: runs(f"compare-{split}-{t}") for t in TOPOLOGIES}
    data = {t: v for t, v in data.items() if v}
    if not data:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    for t, results in data.items():
        rounds, accs, spread, mbytes = mean_curve(results)
        label = f"{LABELS[t]}" + (f", {len(results)} seeds" if len(results) > 1 else "")
        ax1.plot(rounds, accs, color=COLORS[t], label=label)
        if len(results) > 1:
            ax1.fill_between(rounds, [a - s for a, s in zip(accs, spread, strict=True)],
                             [a + s for a, s in zip(accs, spread, strict=True)], color=COLORS[t], alpha=0.15)
        ax2.plot(mbytes, accs, color=COLORS[t], label=LABELS[t])
    title = "IID" if split == "iid" else "non-IID, Dirichlet 0.3"
    ax1.set(xlabel="round", ylabel="test accuracy", title=f"digits-mlp, 100 nodes, {title}", ylim=(0, 1))
    ax2.set(xlabel="MB sent by all nodes (log)", ylabel="test accuracy", xscale="log", ylim=(0, 1),
            title="accuracy per byte")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / f"compare-{split}.png")
    plt.close(fig)

    out: dict[str, Any] = {}
    for t, results in data.items():
        rounds, accs, _, mbytes = mean_curve(results)
        per_round = statistics.fmean(r["total_bytes"] / len(r["rounds"]) for r in results) / 1e6
        out[t] = {
            "seeds": len(results),
            "accuracy_at": {str(k): round(accs[rounds.index(k)], 4) for k in (10, 25, 50, 100) if k in rounds},
            "accuracy_last10": round(statistics.fmean(accs[-10:]), 4),
            "mb_per_round": round(per_round, 3),
            "mb_to": {str(x): _median([bytes_to(r, x) for r in results]) for x in TARGETS},
        }
    if "modest" in data and "fl" in data:
        _, m, m_sd, _ = mean_curve(data["modest"])
        _, f, f_sd, _ = mean_curve(data["fl"])
        gap = [a - b for a, b in zip(m, f, strict=True)]
        out["modest_minus_fl"] = {
            "mean_rounds_1_20": round(statistics.fmean(gap[:20]), 4),
            "mean_rounds_21_100": round(statistics.fmean(gap[20:]), 4),
            "share_of_rounds_within_1_point": round(sum(abs(g) <= 0.01 for g in gap) / len(gap), 3),
            "share_within_1_point_rounds_21_100": round(sum(abs(g) <= 0.01 for g in gap[20:]) / len(gap[20:]), 3),
            "seed_std_rounds_21_100": round(statistics.fmean([*m_sd[20:], *f_sd[20:]]), 4),
        }
    if "modest" in data and "dpsgd" in data:
        out["dpsgd_over_modest_bytes_to"] = {
            k: (round(out["dpsgd"]["mb_to"][k] / out["modest"]["mb_to"][k], 1)
                if out["dpsgd"]["mb_to"][k] and out["modest"]["mb_to"][k] else None) for k in out["modest"]["mb_to"]}
    summary[split] = out


def _median(values: list[float | None]) -> float | None:
    """Median over seeds; None when any seed never reached the target."""
    if any(v is None for v in values) or not values:
        return None
    return round(statistics.median(v for v in values if v is not None), 3)


def churn(summary: dict[str, Any]) -> None:
    data = {t: load(f"churn-{t}-s0") for t in (*TOPOLOGIES, "modest-inact10")}
    data = {t: v for t, v in data.items() if v is not None}
    if not data:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    out: dict[str, Any] = {}
    for t, res in data.items():
        rounds, accs, _ = curve(res)
        style = "--" if t == "modest-inact10" else "-"
        ax1.plot(rounds, accs, color=COLORS[t], ls=style, label=LABELS[t])
        rows = res["rounds"]
        ax2.plot([r["round"] for r in rows], [r["time_s"] for r in rows], color=COLORS[t], ls=style,
                 label=LABELS[t])
        acc = {r["round"]: r["accuracy"] for r in rows}
        out[t] = {
            "accuracy_at": {str(k): acc.get(k) for k in (19, 20, 25, 40, 59, 60, 70, 100)},
            "virtual_s_at": {str(r["round"]): r["time_s"] for r in rows if r["round"] in (19, 59, 100)},
            "participants_after_crash": statistics.fmean(r["participants"] for r in rows[20:59]),
            "stalled": res.get("stalled", False),
            "protocol_events": res.get("protocol_events"),
        }
    for ax in (ax1, ax2):
        ax.axvline(20, color="grey", ls="--", lw=1)
        ax.axvline(60, color="grey", ls=":", lw=1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1),
            title="80 % unresponsive from round 20, half of them back at 60")
    ax2.set(xlabel="round", ylabel="virtual time (s, log)", yscale="log", title="virtual time at each round")
    fig.tight_layout()
    fig.savefig(HERE / "churn.png")
    plt.close(fig)
    summary["churn"] = out


def main() -> None:
    summary: dict[str, Any] = {}
    for split in ("iid", "dir0.3"):
        compare(split, summary)
    churn(summary)
    for name in ("scale-modest-1000",):
        res, meta = load(name), load(f"{name}.meta")
        if res is not None and meta is not None:
            summary["scale"] = {"nodes": res["config"]["nodes"], "rounds": len(res["rounds"]),
                                "final_accuracy": res["final_accuracy"], "virtual_s": res["rounds"][-1]["time_s"],
                                "total_mb": round(res["total_bytes"] / 1e6, 2), **meta}
    (HERE / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(json.dumps(summary, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
