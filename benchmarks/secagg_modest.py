"""MoDeST rounds with and without secure aggregation in the simulator: bytes and time per round.

Run from the repository root::

    python benchmarks/secagg_modest.py                              # 20 nodes, s = 10, 10 rounds
    python benchmarks/secagg_modest.py --hidden 64 1024 --rounds 5
    python benchmarks/secagg_modest.py --aggregators 2 --groups 2     # groups spread over 2 aggregators

Both runs use the same seed, the same in-memory network (links 5 ms, 100 Mbit/s, uplink FIFO) on the
virtual clock and the same nodes; only ``secagg`` differs (its defaults: complete graph, t = 7 of 10,
modulus 2^32, 2^22 levels, clip 8, AES-256-CTR masks). The task is digits-mlp with a hidden layer of
``--hidden`` units (64: 4,810 parameters, the task's default; 1024: 76,810), through the factory
`hidden_digits` of this module. With ``--aggregators A`` both runs have A aggregators per version;
with ``--groups G`` the secure run splits each sample into G secure groups (``--secagg-groups``; with
A > 1 they are spread over the aggregators, which exchange their group sums, and each trainer uploads
once where a plain trainer uploads to all A). Figures per round, averaged over the run's rounds:

- ``KB``: bytes the network carried per model version (all messages, both directions, envelopes
  included), in 10^3 bytes.
- ``virt_s``: virtual seconds per model version (network model, pings and modelled training at 10 ms
  per step; protocol CPU counts as zero there).
- ``wall_s``: wall-clock seconds per model version of the whole in-process simulation (20 nodes on
  one thread: training, masks, Shamir, encodings, message copies), on this machine.
- ``cpu_s``: process CPU seconds per model version (``time.process_time``).
- ``acc``: test accuracy of the last version.
- ``pulls``: base models the aggregators pulled from a trainer in the whole run (secure rounds need the
  base, version ``k``, to apply the mean update; plain ``mean`` rounds do not).

One warm-up run (2 rounds) comes first and is not reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from p2pnode.training.tasks import DigitsMLPTask, Task

#: Hidden width used by `hidden_digits` (set from the command line before the simulation builds tasks).
_HIDDEN = {"units": 64}


def hidden_digits() -> Task:
    """digits-mlp with the benchmark's hidden width (a task factory for ``SimConfig.task``)."""
    return DigitsMLPTask(hidden=_HIDDEN["units"])


def run(hidden: int, secagg: bool, rounds: int, nodes: int, sample: int, seed: int, aggregators: int = 1,
        groups: int = 1, min_group: int = 5) -> dict[str, Any]:
    import importlib

    from simulator import SimConfig, run_simulation

    # The simulator imports this file as the module `secagg_modest` (not `__main__`): set the width there.
    importlib.import_module("secagg_modest")._HIDDEN["units"] = hidden
    cfg = SimConfig.of(nodes=nodes, rounds=rounds, topology="modest", sample_size=sample, seed=seed,
                       task="secagg_modest:hidden_digits", secagg=secagg, aggregators=aggregators,
                       secagg_groups=groups if secagg else 1, secagg_min_group=min_group)
    t0, c0 = time.perf_counter(), time.process_time()
    result = run_simulation(cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = result["rounds"]
    n = len(rows)
    return {"hidden": hidden, "secagg": secagg, "rounds": n, "KB": sum(r["bytes"] for r in rows) / n / 1e3,
            "virt_s": rows[-1]["time_s"] / n, "wall_s": wall / n, "cpu_s": cpu / n, "acc": result["final_accuracy"],
            "aborted": result["protocol_events"].get("secagg_aborted", 0), "stalled": result["stalled"],
            "base_pulls": result["protocol_events"].get("base_pulls", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--sample", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--aggregators", type=int, default=1, help="aggregators per version (both runs)")
    parser.add_argument("--groups", type=int, default=1, help="secure groups per sample (the secure run)")
    parser.add_argument("--min-group", type=int, default=5, help="secagg_min_group of the secure run")
    parser.add_argument("--json", action="store_true", help="one JSON line per run instead of a table")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the task factory lives here
    extra = {"aggregators": args.aggregators, "groups": args.groups, "min_group": args.min_group}
    print(f"# {args.nodes} nodes, s = {args.sample}, a = {args.aggregators}, secure groups G = {args.groups}, "
          f"seed {args.seed}, {args.rounds} rounds")
    run(64, True, 2, args.nodes, args.sample, args.seed, **extra)  # warm-up: data loading, imports, first allocations
    print(f"{'hidden':>6} {'secagg':>6} {'KB/round':>9} {'virt_s':>7} {'wall_s':>7} {'cpu_s':>6} {'acc':>6} "
          f"{'pulls':>5}")
    for hidden in args.hidden:
        for secagg in (False, True):
            r = run(hidden, secagg, args.rounds, args.nodes, args.sample, args.seed, **extra)
            if args.json:
                print(json.dumps(r))
            else:
                stalled = " STALLED" if r["stalled"] else ""
                print(f"{hidden:>6} {secagg!s:>6} {r['KB']:>9.1f} {r['virt_s']:>7.3f} {r['wall_s']:>7.3f} "
                      f"{r['cpu_s']:>6.3f} {r['acc']:>6.3f} {r['base_pulls']:>5}{stalled}")


if __name__ == "__main__":
    main()
