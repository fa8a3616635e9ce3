"""tiny-lm in the simulator: validation loss against bytes, for each wire compression and for DiLoCo.

Run from the repository root::

    python benchmarks/lm_compression.py                  # 16 nodes, modest and gossip (~8 min, 2 cores)
    python benchmarks/lm_compression.py --quick          # 8 nodes, fewer steps (1-2 min)
    python benchmarks/lm_compression.py --topologies modest --steps 400 --json out.json

Every run is a `simulator.run_simulation` of the ``tiny-lm`` task (``--size``, default ``tiny``: 0.12 M
parameters, byte tokenizer, Shakespeare), ``--nodes`` nodes, the same seed and the same initial model, on
links of ``--bandwidth-mbps`` (default 50 Mbit/s) and 5 ms. modest samples 10 trainers per version (the
simulator's default ``sample_size``); gossip runs every node every round. ``--steps`` is the number of
local (inner) steps each trainer takes over the run; a round is ``H`` of them, so a run has
``steps / H`` rounds. The learning-rate schedule is fitted to the run: warm-up over ``--warmup`` steps
(default 10 % of ``--steps``), cosine decay to 10 % at ``--steps`` (the task's own defaults, 100 and
10,000 steps, are meant for long runs and would leave these short ones at full lr).

(a) Compression: H = ``--h-small`` (default 10) plain averaging, for each of ``--compressions`` (default
none, fp16, int8, topk:0.01; topk only where the topology sends updates, i.e. modest). Ratio columns are
against ``none`` on the same topology: ``loss ratio`` = val loss / val loss(none), ``bytes ratio`` =
bytes(none) / bytes (so 4.0 means four times fewer bytes).

(b) DiLoCo: H = ``--h-large`` (default 100) with the outer Nesterov step (``--outer-lr``, default 1.0,
``--outer-momentum`` 0.5; on ``--quick``, 0.7 / 0.9 ended higher) against H = ``--h-small`` plain
averaging, the same total local steps: ``--diloco-steps`` (default ``--steps``, and then the baseline is row
``none`` of (a); a longer setting, so that H = 100 takes tens of outer steps, runs its own baseline, and
``--compressions ''`` skips (a)). ``MB to reach L0``: total bytes sent up to the first evaluation whose
validation loss is <= L0, the H small run's final loss (the claim at equal loss; "never" if H large does
not get there); ``MB to reach L``: the same at L, the larger of the two final losses (both reach it).
``ratio at`` = the H small run's bytes to that loss / this run's. The verdict is the ratio at L0.
``--diloco-compressions`` (default ``int8``) adds an H large row per format with the pseudo-gradients
compressed (modest: the uploaded updates, with error feedback, and the versions; gossip: the models the
receivers form them from), against the same uncompressed H small baseline; each gets its verdict.
``--diloco-warmup-steps`` (comma-separated, default 100; quick 10; 0: none) adds, for each S, the
synchronisation warm-up rows (``--sync-warmup-steps``): H large whose first S local steps run in rounds of
``--diloco-warmup-local-steps`` (default H small), uncompressed and in each ``--diloco-compressions``
format; then those formats get no row without the warm-up. ``--diloco-warmup-outer`` (comma-separated, default
``outer``) repeats those rows for each ``--sync-warmup-outer`` policy: what the outer step does in the
warm-up rounds (``outer``: the outer step every round; ``reset``: momentum reset after the warm-up;
``sgd``: no momentum in the warm-up; ``plain``: the plain merge in the warm-up). A warm-up run has
``S / H0 + (steps - S) / H`` rounds, so it sends more than H large alone: uncompressed it cannot reach 10x
fewer bytes than H small unless ``S / H0`` is small against ``steps / H small``.

Figures: ``val loss`` is ln(perplexity) of the last round's evaluation on the task's validation windows
(``--eval-windows``, default 32; modest: the aggregator's evaluation of the new version; gossip: ln of the
nodes' mean perplexity). ``B/node/round`` is the mean over rounds of the bytes one node sent in a round;
``total MB`` all bytes sent by all nodes over the run (MB = 10^6 bytes). ``uplink s/round`` is
``B/node/round * 8 / 50e6``, the time that node's sends take on a 50 Mbit/s uplink (``--bandwidth-mbps``),
and ``sim s/round`` the simulator's virtual time per round (that bandwidth, 5 ms latency, 10 ms per local
step), so compute is in it too. ``wall s`` is the real time of the run on this machine.

Below (a), ``bytes by method`` splits each run's bytes by method (``<method> reply``: the answers), with
the mean message size and its envelope (all but the tensor bytes: header, body, tensor specs), from the
simulator's ``bytes_by_method``.

The machine (CPU, cores, torch, load average) is printed first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run as a script from a checkout

from benchmarks.machine import cpu_model  # noqa: E402
from p2pnode.config.choices import SYNC_WARMUP_OUTER  # noqa: E402
from p2pnode.errors import ConfigError  # noqa: E402
from p2pnode.training.round_schedule import RoundSchedule  # noqa: E402
from p2pnode.transport.compression import check_combination, parse_compression  # noqa: E402
from simulator import SimConfig, run_simulation  # noqa: E402

#: Targets the figures are reported against.
INT8_LOSS_RATIO_MAX = 1.02  # int8 within 2 % of the uncompressed validation loss ...
INT8_BYTES_RATIO_MIN = 3.9  # ... with at least 3.9x fewer bytes
DILOCO_BYTES_RATIO_MIN = 10.0  # H = 100 + outer step reaches H = 10's loss with >= 10x fewer bytes


def machine_report() -> list[str]:
    """Lines that describe the machine: the simulator uses one torch thread, so load shows in wall time."""
    lines = [f"CPU: {cpu_model()}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
             f"Python {platform.python_version()} (the simulator runs on 1 torch thread)"]
    if hasattr(os, "getloadavg"):
        lines.append("load average (1, 5, 15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    return lines


@dataclass
class Case:
    """One simulated run and its figures."""

    topology: str
    label: str  # row name: the compression, or "H=10", "H=100 + outer"
    compression: str
    local_steps: int
    rounds: int
    outer_lr: float | None
    #: Synchronisation warm-up: local steps run in rounds of `warmup_local_steps` first (0: none).
    warmup_steps: int = 0
    warmup_local_steps: int | None = None
    #: What the outer step does in the warm-up rounds (``sync_warmup_outer``; default ``outer``).
    warmup_outer: str = "outer"
    val_loss: float = math.nan
    perplexity: float = math.nan
    total_bytes: int = 0
    bytes_per_node_per_round: float = 0.0
    sim_s_per_round: float = 0.0
    wall_s: float = 0.0
    #: Per round: (round, validation loss or None, bytes sent by all nodes up to and including it).
    curve: list[tuple[int, float | None, int]] = field(default_factory=list)
    #: The run's `bytes_by_method` (simulator results): {method: {messages, bytes, tensor_bytes, envelope_bytes}}.
    by_method: dict[str, dict[str, int]] = field(default_factory=dict)

    def uplink_s_per_round(self, mbps: float) -> float:
        """Seconds one node's sends of a round take on an uplink of `mbps` Mbit/s."""
        return self.bytes_per_node_per_round * 8 / (mbps * 1e6)

    def bytes_to_reach(self, loss: float) -> int | None:
        """Bytes sent up to the first round whose validation loss is <= `loss` (None: never)."""
        for _, value, sent in self.curve:
            if value is not None and value <= loss + 1e-12:
                return sent
        return None


def _val_loss(perplexity: float | None) -> float | None:
    if perplexity is None or not perplexity > 0 or math.isinf(perplexity):
        return None
    return math.log(perplexity)


def warmup_of(args: argparse.Namespace, steps: int) -> int:
    """Warm-up steps of a run of `steps` local steps: ``--warmup``, else 10 % of `steps`."""
    return min(steps, args.warmup if args.warmup is not None else max(1, steps // 10))


def run_case(args: argparse.Namespace, topology: str, label: str, compression: str, local_steps: int,
             outer_lr: float | None, steps: int | None = None, sync_warmup: tuple[int, int] | None = None,
             warmup_outer: str = "outer") -> Case:
    """Simulate one configuration (see the module docstring) and collect its figures.

    `steps`: local steps over the run (default ``--steps``); the schedule is fitted to it. `sync_warmup`:
    (warm-up local steps S, local steps of a warm-up round H0), the synchronisation warm-up (None: none);
    `warmup_outer`: what the outer step does in its rounds (``sync_warmup_outer``, default ``outer``).
    """
    steps = args.steps if steps is None else steps
    sync_steps, sync_h = sync_warmup if sync_warmup is not None else (0, None)
    rounds = max(1, RoundSchedule(local_steps, sync_steps, sync_h).rounds_for(steps)) if sync_steps else max(
        1, steps // local_steps)
    warmup = warmup_of(args, steps)
    cfg = SimConfig.of(
        nodes=args.nodes, task="tiny-lm", topology=topology, rounds=rounds, seed=args.seed,
        task_options={"size": args.size, "eval_windows": args.eval_windows, "warmup_steps": warmup,
                      "total_steps": steps},
        local_steps=local_steps, batch_size=args.batch_size, lr=args.lr, bandwidth_mbps=args.bandwidth_mbps,
        compression=compression, outer_lr=outer_lr, outer_momentum=args.outer_momentum,
        sync_warmup_steps=sync_steps, sync_warmup_local_steps=sync_h,
        # Named whenever there is a warm-up: the nodes' default is ``plain``, the benchmark's ``outer`` (so that
        # the commands recorded in docs/benchmarks.md before the default changed give the same rows).
        **({"sync_warmup_outer": warmup_outer} if sync_steps else {}))
    t0 = time.perf_counter()
    res = run_simulation(cfg)
    case = Case(topology, label, compression, local_steps, rounds, outer_lr, sync_steps, sync_h,
                warmup_outer if sync_steps else "outer", wall_s=time.perf_counter() - t0)
    rows = res["rounds"]
    sent = 0
    for row in rows:
        sent += row["bytes"]
        case.curve.append((row["round"], _val_loss(row["perplexity"]), sent))
    final = res["final_perplexity"]
    case.perplexity = final if final is not None else math.nan
    loss = _val_loss(final)
    case.val_loss = loss if loss is not None else math.nan
    case.total_bytes = int(res["total_bytes"])
    case.bytes_per_node_per_round = float(res["bytes_per_node_per_round"] or 0.0)
    case.sim_s_per_round = rows[-1]["time_s"] / len(rows) if rows else 0.0
    case.by_method = dict(res.get("bytes_by_method", {}))
    if res.get("stalled"):
        case.label += " (stalled)"
    return case


def allowed(compression: str, topology: str) -> bool:
    """Whether `compression` may run on `topology` (topk only where updates travel: modest, fl)."""
    try:
        check_combination(parse_compression(compression), payload="models" if topology in ("gossip", "dpsgd")
                          else "updates")
    except (ConfigError, ValueError):
        return False
    return True


def _fmt_bytes(n: float | None) -> str:
    return "never" if n is None else f"{n / 1e6:.2f}"


def compression_table(cases: list[Case], mbps: float) -> list[str]:
    """(a): one row per compression, ratios against ``none`` of the same topology."""
    base = next(c for c in cases if c.compression == "none")
    lines = ["| compression | val loss | ppl | loss ratio | B/node/round | total MB | bytes ratio "
             f"| uplink s/round @{mbps:g} Mbit/s | sim s/round | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in cases:
        lines.append(f"| {c.label} | {c.val_loss:.4f} | {c.perplexity:.2f} | {c.val_loss / base.val_loss:.4f} "
                     f"| {c.bytes_per_node_per_round:,.0f} | {c.total_bytes / 1e6:.2f} "
                     f"| {base.total_bytes / max(1, c.total_bytes):.2f}x | {c.uplink_s_per_round(mbps):.4f} "
                     f"| {c.sim_s_per_round:.3f} | {c.wall_s:.0f} |")
    return lines


def method_table(cases: list[Case]) -> list[str]:
    """Where each run's bytes went: one row per (compression, method), largest first.

    ``share`` is of that run's bytes by method (which count until shutdown, a little more than ``total MB``);
    ``B/message`` the mean message size, ``envelope B/message`` what is not tensor bytes (header, body,
    tensor specs); ``ratio`` = the ``none`` run's bytes of that method / this run's.
    """
    base = next((c for c in cases if c.compression == "none"), None)
    lines = ["| compression | method | messages | MB | share | B/message | envelope B/message | tensor MB | ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in cases:
        total = sum(row["bytes"] for row in c.by_method.values()) or 1
        for method, row in c.by_method.items():
            n = max(1, row["messages"])
            ref = base.by_method.get(method) if base is not None else None
            ratio = f"{ref['bytes'] / row['bytes']:.2f}x" if ref and row["bytes"] else "-"
            lines.append(f"| {c.label} | {method} | {row['messages']:,} | {row['bytes'] / 1e6:.3f} "
                         f"| {100 * row['bytes'] / total:.1f} % | {row['bytes'] / n:,.0f} "
                         f"| {row['envelope_bytes'] / n:,.0f} | {row['tensor_bytes'] / 1e6:.3f} | {ratio} |")
    return lines


def diloco_table(small: Case, large: Case | None, mbps: float, more: list[Case] | None = None
                 ) -> tuple[list[str], float]:
    """(b): H small plain against H large + outer step, and the bytes each sends to reach two losses (`more`:
    further H large rows, e.g. int8 pseudo-gradients, against the same losses).

    `large` None (``--no-diloco-large``): the first of `more` stands in for it in ``L``.
    ``L0`` is the H small run's final loss (the claim at equal loss: does H large reach it, and with how many
    bytes?); ``L`` the larger of the two final losses, which both runs reach. Returns the lines and ``L``.
    """
    runs = [small, *([large] if large is not None else []), *(more or [])]
    target = max(c.val_loss for c in runs[:2])
    lines = [f"| run | rounds | val loss | ppl | loss ratio | total MB | bytes ratio "
             f"| MB to reach L0={small.val_loss:.4f} | ratio at L0 | MB to reach L={target:.4f} | ratio at L "
             f"| uplink s/round @{mbps:g} Mbit/s | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    cells: list[list[str]] = [[] for _ in runs]
    for loss in (small.val_loss, target):
        reach_small = small.bytes_to_reach(loss)
        for i, c in enumerate(runs):
            reach = c.bytes_to_reach(loss)
            cells[i] += [_fmt_bytes(reach), f"{reach_small / reach:.2f}x" if reach and reach_small else "-"]
    for c, extra in zip(runs, cells, strict=True):
        lines.append(f"| {c.label} | {c.rounds} | {c.val_loss:.4f} | {c.perplexity:.2f} "
                     f"| {c.val_loss / small.val_loss:.4f} | {c.total_bytes / 1e6:.2f} "
                     f"| {small.total_bytes / max(1, c.total_bytes):.2f}x | {' | '.join(extra)} "
                     f"| {c.uplink_s_per_round(mbps):.4f} | {c.wall_s:.0f} |")
    return lines, target


def verdicts(topology: str, comp: list[Case], small: Case | None, large: Case | None,
             more: list[Case] | None = None) -> list[str]:
    """Lines that say whether the targets are met on `topology` (`more`: further H large runs, each judged)."""
    out: list[str] = []
    base = next((c for c in comp if c.compression == "none"), None)
    int8 = next((c for c in comp if c.compression == "int8"), None)
    if base is not None and int8 is not None:
        lr_ = int8.val_loss / base.val_loss
        br = base.total_bytes / max(1, int8.total_bytes)
        ok = lr_ <= INT8_LOSS_RATIO_MAX and br >= INT8_BYTES_RATIO_MIN
        out.append(f"{topology}: int8 loss ratio {lr_:.4f} (target <= {INT8_LOSS_RATIO_MAX}), bytes ratio {br:.2f}x "
                   f"(target >= {INT8_BYTES_RATIO_MIN}x): {'MEETS' if ok else 'MISSES'}")
    for run in ([large] if large is not None else []) + (more or []):
        if small is None:
            break
        name = f"H={run.local_steps} + outer" + (f" ({run.compression})" if run.compression != "none" else "")
        if run.warmup_steps:
            name += f" after {run.warmup_steps} steps at H={run.warmup_local_steps}"
            if run.warmup_outer != "outer":
                name += f" ({run.warmup_outer} in the warm-up)"
        reach = run.bytes_to_reach(small.val_loss)
        if reach is None:
            out.append(f"{topology}: {name} does not reach H={small.local_steps}'s loss "
                       f"{small.val_loss:.4f} (it ends at {run.val_loss:.4f}): MISSES")
        else:
            # Both at their first evaluation at or below that loss: H small may reach its own final loss
            # before its last round (the curve is not monotone), which is what it needed to send.
            ratio = (small.bytes_to_reach(small.val_loss) or small.total_bytes) / reach
            ok = ratio >= DILOCO_BYTES_RATIO_MIN
            out.append(f"{topology}: {name} reaches H={small.local_steps}'s final loss "
                       f"{small.val_loss:.4f} with {ratio:.2f}x fewer bytes (target >= {DILOCO_BYTES_RATIO_MIN}x): "
                       f"{'MEETS' if ok else 'MISSES'}")
    return out


def run_benchmark(args: argparse.Namespace, out: Any = sys.stdout) -> dict[str, Any]:
    """Run every configuration of `args`, print the tables to `out`, and return them as a dict."""
    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    for line in machine_report():
        say(line)
    say(f"tiny-lm size={args.size}, {args.nodes} nodes, seed {args.seed}, batch {args.batch_size}, "
        f"lr {args.lr if args.lr is not None else 'task default'}, {args.steps} local steps per trainer "
        f"(warm-up {warmup_of(args, args.steps)}, cosine to {args.steps}), eval windows {args.eval_windows}, "
        f"links {args.bandwidth_mbps:g} Mbit/s\n")
    result: dict[str, Any] = {"args": vars(args), "topologies": {}}
    for topology in args.topologies:
        say(f"## {topology}\n")
        comp: list[Case] = []
        for compression in args.compressions:
            if not allowed(compression, topology):
                say(f"({compression}: not allowed on {topology}, skipped)")
                continue
            comp.append(run_case(args, topology, compression, compression, args.h_small, None))
        if args.compressions and not any(c.compression == "none" for c in comp):
            comp.insert(0, run_case(args, topology, "none", "none", args.h_small, None))
        entry: dict[str, Any] = {"compression": [asdict(c) for c in comp]}
        if comp:
            say(f"(a) compression, H={args.h_small}, {comp[0].rounds} rounds\n")
            for line in compression_table(comp, args.bandwidth_mbps):
                say(line)
            say()
            say("bytes by method (requests; \"<method> reply\": the answers)\n")
            for line in method_table(comp):
                say(line)
            say()
        small = large = None
        more: list[Case] = []
        if not args.no_diloco:
            steps = args.diloco_steps
            label = f"H={args.h_small} plain"
            base = next((c for c in comp if c.compression == "none"), None)
            if base is not None and steps == args.steps:
                small = Case(**{**asdict(base), "label": label})
            else:  # (b) runs longer than (a), or (a) was skipped: its own baseline
                small = run_case(args, topology, label, "none", args.h_small, None, steps)
            label_large = f"H={args.h_large} + outer (lr {args.outer_lr:g}, Nesterov {args.outer_momentum:g})"
            large = (None if args.no_diloco_large
                     else run_case(args, topology, label_large, "none", args.h_large, args.outer_lr, steps))
            formats = [fmt for fmt in args.diloco_compressions if fmt != "none" and allowed(fmt, topology)]
            # The pseudo-gradients (modest: uploads; gossip: the models they are formed from) in a lossy format.
            more = [run_case(args, topology, f"{label_large}, {fmt}", fmt, args.h_large, args.outer_lr, steps)
                    for fmt in formats if not args.diloco_warmups]
            # The synchronisation warm-up: the first S steps in rounds of H0, then H large; uncompressed and
            # in each format.
            h0 = args.diloco_warmup_local_steps
            for s0 in args.diloco_warmups:
                for policy in args.diloco_warmup_outer:
                    more += [run_case(args, topology, f"{label_large}, warm-up {s0} steps at H={h0}"
                                      + (f" ({policy})" if policy != "outer" else "")
                                      + (f", {fmt}" if fmt != "none" else ""), fmt, args.h_large, args.outer_lr,
                                      steps, sync_warmup=(s0, h0), warmup_outer=policy)
                             for fmt in ([] if args.no_diloco_warmup_none else ["none"]) + formats]
            say(f"(b) DiLoCo, {steps} local steps each (warm-up {warmup_of(args, steps)}, cosine to {steps})\n")
            table, target = diloco_table(small, large, args.bandwidth_mbps, more)
            for line in table:
                say(line)
            say()
            entry["diloco"] = {"small": asdict(small), "large": asdict(large) if large is not None else None,
                               "common_loss": target,
                               "more": [asdict(c) for c in more]}
        entry["verdicts"] = verdicts(topology, comp, small, large, more)
        for line in entry["verdicts"]:
            say(line)
        say()
        result["topologies"][topology] = entry
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="8 nodes, 100 steps, H 5 vs 50, 16 eval windows (1-2 min); explicit options win")
    ap.add_argument("--nodes", type=int, default=None, help="simulated nodes (default 16; quick 8)")
    ap.add_argument("--steps", type=int, default=None,
                    help="local steps per trainer over the run (default 400; quick 100)")
    ap.add_argument("--size", default="tiny", help="tiny-lm size preset (default tiny)")
    ap.add_argument("--topologies", default="modest,gossip", help="comma-separated (default modest,gossip)")
    ap.add_argument("--compressions", default="none,fp16,int8,topk:0.01",
                    help="comma-separated (default none,fp16,int8,topk:0.01; topk is skipped where refused; "
                         "empty: skip (a))")
    ap.add_argument("--h-small", type=int, default=None,
                    help="local steps per round of (a) and the (b) baseline (10; quick 5)")
    ap.add_argument("--h-large", type=int, default=None, help="local steps per round of DiLoCo in (b) (100; quick 50)")
    ap.add_argument("--outer-lr", type=float, default=1.0, help="DiLoCo outer learning rate (default 1.0)")
    ap.add_argument("--outer-momentum", type=float, default=0.5, help="outer Nesterov momentum (default 0.5)")
    ap.add_argument("--no-diloco", action="store_true", help="skip (b)")
    ap.add_argument("--diloco-compressions", default="int8",
                    help="comma-separated formats of further H-large rows in (b), against the same uncompressed "
                         "H-small baseline (default int8, OpenDiLoCo's practice; empty: none)")
    ap.add_argument("--diloco-warmup-steps", default=None,
                    help="comma-separated synchronisation warm-ups of (b): for each S, H-large rows (uncompressed and "
                         "each --diloco-compressions) whose first S local steps run in rounds of "
                         "--diloco-warmup-local-steps (default 100; quick 10; 0 or empty: none, and then the "
                         "--diloco-compressions rows run without warm-up)")
    ap.add_argument("--diloco-warmup-local-steps", type=int, default=None,
                    help="local steps per round during the warm-up (default --h-small)")
    ap.add_argument("--diloco-warmup-outer", default="outer",
                    help="comma-separated --sync-warmup-outer policies of the warm-up rows, one set of rows each "
                         "(default outer: the outer step every round; reset, sgd, plain)")
    ap.add_argument("--no-diloco-large", action="store_true",
                    help="skip the H-large row without warm-up in (b) (e.g. when an earlier invocation ran it)")
    ap.add_argument("--no-diloco-warmup-none", action="store_true",
                    help="skip the uncompressed warm-up rows (only those in --diloco-compressions)")
    ap.add_argument("--diloco-steps", type=int, default=None,
                    help="local steps per trainer of (b) (default --steps; longer runs its own H-small baseline)")
    ap.add_argument("--batch-size", type=int, default=8, help="windows per local step (default 8)")
    ap.add_argument("--lr", type=float, default=None, help="peak inner lr (default: the task's, 3e-3 for tiny)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 10%% of --steps)")
    ap.add_argument("--eval-windows", type=int, default=None, help="validation windows per evaluation (32; quick 16)")
    ap.add_argument("--bandwidth-mbps", type=float, default=50.0, help="link bandwidth in Mbit/s (default 50)")
    ap.add_argument("--seed", type=int, default=0, help="simulation seed (default 0)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    quick = {"nodes": 8, "steps": 100, "h_small": 5, "h_large": 50, "eval_windows": 16, "diloco_warmup_steps": "10"}
    full = {"nodes": 16, "steps": 400, "h_small": 10, "h_large": 100, "eval_windows": 32, "diloco_warmup_steps": "100"}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.topologies = [t for t in args.topologies.split(",") if t]
    args.compressions = [c for c in args.compressions.split(",") if c]
    args.diloco_compressions = [c for c in args.diloco_compressions.split(",") if c]
    try:
        args.diloco_warmups = [int(v) for v in args.diloco_warmup_steps.split(",") if v and int(v) > 0]
    except ValueError:
        ap.error(f"--diloco-warmup-steps: comma-separated integers, got {args.diloco_warmup_steps!r}")
    args.diloco_warmup_outer = [p for p in args.diloco_warmup_outer.split(",") if p] or ["outer"]
    bad = [p for p in args.diloco_warmup_outer if p not in SYNC_WARMUP_OUTER]
    if bad:
        ap.error(f"--diloco-warmup-outer: {bad[0]!r} is none of {', '.join(SYNC_WARMUP_OUTER)}")
    if args.diloco_warmup_local_steps is None:
        args.diloco_warmup_local_steps = args.h_small
    if args.diloco_warmup_local_steps < 1:
        ap.error("need --diloco-warmup-local-steps >= 1")
    if args.diloco_steps is None:
        args.diloco_steps = args.steps
    if args.h_small < 1 or args.h_large < 1 or min(args.steps, args.diloco_steps) < max(args.h_small, args.h_large):
        ap.error("need 1 <= --h-small, --h-large <= --steps, --diloco-steps")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run_benchmark(args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
