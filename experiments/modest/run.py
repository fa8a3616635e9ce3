"""Runs the MoDeST experiments of docs/experiments.md (MoDeST section) with `p2pnode sim` and keeps the result files.

Usage (from the repository root)::

    python experiments/modest/run.py compare   # MoDeST vs FL vs D-PSGD vs gossip, IID and Dirichlet 0.3
    python experiments/modest/run.py churn     # 80 % of the nodes unresponsive from round 20, half back at 60
    python experiments/modest/run.py scale     # 1,000 nodes, s = 10, 100 rounds: wall time and peak memory
    python experiments/modest/plot.py          # the PNGs and the summary tables from the result files

Every run is one ``p2pnode sim`` command (printed before it runs), with one torch thread, so that any of
them can be repeated alone. Results go to ``experiments/modest/results/<name>.json``; a run whose file
exists is skipped (delete the file to run it again). ``--jobs N`` runs N commands at a time.
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
ROUNDS = 100
SEEDS = (0, 1, 2)
#: Dirichlet concentration of the non-IID split (None: IID).
ALPHAS = (None, 0.3)


def sim(name: str, *args: object) -> tuple[str, list[str]]:
    cmd = [sys.executable, "-m", "p2pnode", "sim", "--quiet", "--out", str(RESULTS / f"{name}.json"),
           *(str(a) for a in args)]
    return name, cmd


def compare() -> list[tuple[str, list[str]]]:
    runs = []
    for alpha in ALPHAS:
        split = "iid" if alpha is None else f"dir{alpha}"
        extra = [] if alpha is None else ["--alpha", alpha]
        for seed in SEEDS:
            common = ["--nodes", NODES, "--rounds", ROUNDS, "--seed", seed, *extra]
            runs.append(sim(f"compare-{split}-modest-s{seed}", *common, "--topology", "modest",
                            "--sample-size", 10, "--aggregators", 1, "--success-fraction", 1.0))
            runs.append(sim(f"compare-{split}-fl-s{seed}", *common, "--topology", "fl", "--sample-size", 10))
        common = ["--nodes", NODES, "--rounds", ROUNDS, "--seed", 0, *extra]
        runs.append(sim(f"compare-{split}-dpsgd-s0", *common, "--topology", "dpsgd", "--dpsgd-graph", "exponential"))
        runs.append(sim(f"compare-{split}-gossip-s0", *common, "--topology", "gossip"))
    return runs


def churn() -> list[tuple[str, list[str]]]:
    runs = []
    for topology in ("modest", "fl", "dpsgd", "gossip"):
        args = ["--nodes", NODES, "--rounds", ROUNDS, "--seed", 0, "--topology", topology,
                "--crash-fraction", 0.8, "--crash-round", 20, "--rejoin-round", 60, "--rejoin-fraction", 0.5]
        if topology in ("modest", "fl"):
            args += ["--sample-size", 10]
        runs.append(sim(f"churn-{topology}-s0", *args))
    # The same for MoDeST with a shorter inactivity threshold (10 rounds instead of the authors' 50).
    runs.append(sim("churn-modest-inact10-s0", "--nodes", NODES, "--rounds", ROUNDS, "--seed", 0, "--topology",
                    "modest", "--crash-fraction", 0.8, "--crash-round", 20, "--rejoin-round", 60,
                    "--rejoin-fraction", 0.5, "--sample-size", 10, "--inactivity-threshold", 10))
    return runs


def scale() -> list[tuple[str, list[str]]]:
    name, cmd = sim("scale-modest-1000", "--nodes", 1000, "--rounds", 100, "--seed", 0, "--topology", "modest",
                    "--sample-size", 10)
    # GNU time reports the peak resident set size of the whole process.
    return [(name, ["/usr/bin/time", "-v", *cmd])]


def run_one(name: str, cmd: list[str]) -> None:
    out = RESULTS / f"{name}.json"
    if out.exists():
        print(f"skip {name}: {out} exists", flush=True)
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    print("$ " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"FAILED {name} ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}", flush=True)
        return
    shown = shlex.join(cmd).replace(sys.executable, "python").replace(str(Path.cwd()) + "/", "")
    info: dict[str, object] = {"wall_s": round(wall, 1), "command": shown}
    for line in proc.stderr.splitlines():  # /usr/bin/time -v
        if "Maximum resident set size" in line:
            info["max_rss_kb"] = int(line.rsplit(":", 1)[1])
    (RESULTS / f"{name}.meta.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"done {name} in {wall:.0f} s: {proc.stdout.strip().splitlines()[0]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=["compare", "churn", "scale", "all"])
    parser.add_argument("--jobs", type=int, default=1, help="commands run at a time (default 1)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs = {"compare": compare, "churn": churn, "scale": scale}
    todo = [r for key in (["compare", "churn", "scale"] if args.experiment == "all" else [args.experiment])
            for r in runs[key]()]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda r: run_one(*r), todo))


if __name__ == "__main__":
    main()
