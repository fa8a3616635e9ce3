"""Runs the variance-corrected averaging experiment of docs/experiments.md with `p2pnode sim`.

Usage (from the repository root)::

    python experiments/vca/run.py --jobs 2    # 36 runs: gossip+vca, gossip+mean, fl; IID and Dirichlet 0.3;
                                              # independent and shared initialisation; seeds 0, 1, 2;
                                              # plus 8 runs on the paper's 8-regular graph (seed 0)
    python experiments/vca/plot.py            # the table (experiments/vca/summary.md, summary.json) and PNGs

Every run is one ``p2pnode sim`` command (printed before it runs) with ``--record-variance``, so any of
them can be repeated alone. Results go to ``experiments/vca/results/<name>.json`` and the command with
its wall time to ``<name>.meta.json``; a run whose file exists is skipped (delete it to run it again).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
NODES = 100
#: Rounds per run: every method passes the 0.85 target well before this in the pilot runs.
ROUNDS = 50
SEEDS = (0, 1, 2)
#: Dirichlet concentration of the non-IID split (None: IID).
ALPHAS: tuple[float | None, ...] = (None, 0.3)
INITS = ("independent", "shared")
#: FL's server never trains, so "all clients train every round" (the paper's FL baseline, as many
#: trainings per round as gossip) is a sample of the other 99 nodes.
FL_SAMPLE = NODES - 1


def split_name(alpha: float | None) -> str:
    """``iid`` or ``dir<alpha>``: the split part of a run's name."""
    return "iid" if alpha is None else f"dir{alpha}"


def run_name(method: str, alpha: float | None, init: str, seed: int) -> str:
    """Name of a run: ``<method>-<split>-<init>-s<seed>``; method is ``gossip-vca``, ``gossip-mean``, ``fl``,
    or ``regular8-`` and ``vca``, ``mean``, ``half`` (0.5/0.5 merge, no correction) or ``vcaeq`` (equal
    weights, corrected)."""
    return f"{method}-{split_name(alpha)}-{init}-s{seed}"


def runs() -> list[tuple[str, list[str]]]:
    """Every run of the experiment as (name, command)."""
    out = []
    for alpha in ALPHAS:
        split = [] if alpha is None else ["--alpha", str(alpha)]
        for init in INITS:
            for seed in SEEDS:
                common = ["--nodes", str(NODES), "--rounds", str(ROUNDS), "--seed", str(seed), "--init", init,
                          *split, "--record-variance"]
                for rule in ("vca", "mean"):
                    out.append((run_name(f"gossip-{rule}", alpha, init, seed),
                                [*common, "--topology", "gossip", "--rule", rule]))
                out.append((run_name("fl", alpha, init, seed),
                            [*common, "--topology", "fl", "--rule", "mean", "--sample-size", str(FL_SAMPLE)]))
    # The paper's own topology: a random 8-regular graph on which every node merges all its neighbours'
    # models each round (`dpsgd --dpsgd-graph regular`). vca with self_index=0 is the authors' merge,
    # 0.5 own + 0.5 mean of the 8 received, with the target taken from the received models; mean is
    # the Metropolis-Hastings average, 1/9 each. Seed 0 only, independent initialisation.
    for alpha in ALPHAS:
        split = [] if alpha is None else ["--alpha", str(alpha)]
        common = ["--nodes", str(NODES), "--rounds", str(ROUNDS), "--seed", "0", "--init", "independent", *split,
                  "--record-variance", "--topology", "dpsgd", "--dpsgd-graph", "regular", "--dpsgd-degree", "8"]
        out.append((run_name("regular8-vca", alpha, "independent", 0),
                    [*common, "--rule", "vca", "--rule-param", "self_index=0"]))
        out.append((run_name("regular8-mean", alpha, "independent", 0), [*common, "--rule", "mean"]))
        # Which part of vca does what: the authors' 0.5 own + 0.5 received merge without the correction
        # (strength 0 leaves the scale at 1), and the correction on the plain 1/9 each average.
        out.append((run_name("regular8-half", alpha, "independent", 0),
                    [*common, "--rule", "vca", "--rule-param", "self_index=0", "--rule-param", "strength=0"]))
        out.append((run_name("regular8-vcaeq", alpha, "independent", 0), [*common, "--rule", "vca"]))
    return [(name, [sys.executable, "-m", "p2pnode", "sim", "--quiet", "--out", str(RESULTS / f"{name}.json"),
                    *args]) for name, args in out]


def run_one(name: str, cmd: list[str]) -> None:
    """Run one command unless its result file exists; write ``<name>.meta.json`` (command, wall time)."""
    out = RESULTS / f"{name}.json"
    if out.exists():
        print(f"skip {name}: {out} exists", flush=True)
        return
    # One thread per run: the models are tiny, and runs side by side should not fight over cores.
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    print("$ " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"FAILED {name} ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}", flush=True)
        return
    shown = shlex.join(cmd).replace(sys.executable, "python").replace(str(Path.cwd()) + "/", "")
    (RESULTS / f"{name}.meta.json").write_text(json.dumps({"wall_s": round(wall, 1), "command": shown},
                                                          indent=2) + "\n")
    print(f"done {name} in {wall:.0f} s: {proc.stdout.strip().splitlines()[0]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1, help="commands run at a time (default 1)")
    parser.add_argument("--only", default="", help="run only the runs whose name contains this text")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    todo = [r for r in runs() if args.only in r[0]]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda r: run_one(*r), todo))


if __name__ == "__main__":
    main()
