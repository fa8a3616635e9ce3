"""Seconds per call of every aggregation rule, and the Flag Aggregator against a straightforward solver.

Run from the repository root::

    python benchmarks/aggregators.py                          # p = 15, d = 1M and 11M, float32, CPU
    python benchmarks/aggregators.py --dims 1000000 --repeats 3 --device cuda
    python benchmarks/aggregators.py --rules mean,flag --peers 30

What is measured: `p2pnode.aggregation.aggregate(rule, updates, f=f)` with each rule's other defaults,
on p random float32 updates of length d (a common direction plus noise, so the rules have structure to
find). ``f`` is ``--f`` (default 3 of 15, the FA paper's setting), capped by each rule's guarantee
(``mean`` and ``vca`` take none); the trimmed mean then trims f per side and Multi-Krum averages p - f.
One warm-up call, then the median over ``--repeats`` timed calls (the minimum is printed too).
``ratio`` is the median time over the median time of ``mean``.

FA side by side: ``flag`` (our Gram-space solver, defaults m = round(8p/15), lambda 0, 1 IRLS step,
``scale="none"`` so the output is the authors' g_FA) against ``flag_svd``, the straightforward
implementation of the same algorithm (normalize and stack the inputs into a d x p matrix, a thin SVD for
the flag-mean start and again at every IRLS step, the projection at the end), timed in float32 like the
inputs. Accuracy: both outputs are compared with the straightforward solver run in float64 (largest
coordinate difference; the norm of g_FA is about p/m). lambda > 0 is not compared: the straightforward
solver then needs a d x p^2 matrix (about 10 GB at d = 11M, p = 15).

The machine (CPU model, cores, torch version, threads, load average) is printed first, because these
passes are memory-bound and a shared machine shows in the figures.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run as a script from a checkout

from benchmarks.machine import cpu_model  # noqa: E402
from p2pnode.aggregation import aggregate, available_rules, max_byzantine  # noqa: E402
from p2pnode.aggregation.flag import default_m  # noqa: E402


def machine_report(device: torch.device) -> list[str]:
    lines = [
        f"CPU: {cpu_model()}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}",
    ]
    if hasattr(os, "getloadavg"):
        lines.append("load average (1, 5, 15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    if device.type == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name(device)}")
    return lines


def straightforward_flag(updates: list[torch.Tensor], m: int, iterations: int = 1, eps: float = 1e-7) -> torch.Tensor:
    """FlagIRLS with lambda = 0 the direct way: a d x p matrix and its thin SVD at every step."""
    x = torch.stack([u / u.norm() for u in updates], dim=1)  # d x p copy

    def top(mat: torch.Tensor) -> torch.Tensor:
        u, _, _ = torch.linalg.svd(mat, full_matrices=False)
        return u[:, :m]

    def sin2(y: torch.Tensor) -> torch.Tensor:
        return 1.0 - (y.T @ x).square().sum(dim=0)

    def objective(y: torch.Tensor) -> float:
        return float(sin2(y).clamp_min(0.0).sqrt().sum())

    y = top(x)
    err = objective(y)
    for _ in range(iterations):
        if err <= 1e-10:
            break
        y_new = top(x * (sin2(y).abs() + eps) ** -0.25)
        new_err = objective(y_new)
        if not new_err < err:
            break
        decrease = err - new_err
        y, err = y_new, new_err
        if decrease <= 1e-10:
            break
    return y @ (y.T @ x.sum(dim=1)) / m


def timed(fn: Callable[[], torch.Tensor], repeats: int, device: torch.device) -> tuple[float, float, torch.Tensor]:
    """(median seconds, min seconds, last output) of `repeats` calls after one warm-up call."""
    out = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), out


def make_updates(p: int, d: int, device: torch.device, seed: int) -> list[torch.Tensor]:
    """p float32 updates of length d: a common direction plus twice as much noise."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(d, generator=gen)
    return [(common + 2.0 * torch.randn(d, generator=gen)).to(device) for _ in range(p)]


def bench_dim(
    d: int, p: int, f: int, rules: list[str], repeats: int, device: torch.device, svd: bool, seed: int
) -> None:
    """Print the table for one d."""
    updates = make_updates(p, d, device, seed)
    rows: list[tuple[str, float, float]] = []
    flag_out: torch.Tensor | None = None
    for rule in rules:
        params: dict[str, Any] = {}
        if rule not in ("mean", "vca"):
            params["f"] = max(0, min(f, max_byzantine(rule, p)))
        if rule == "flag":
            params["scale"] = "none"
        med, best, out = timed(functools.partial(aggregate, rule, updates, **params), repeats, device)
        rows.append((rule, med, best))
        if rule == "flag":
            flag_out = out
    mean_t = next((m for r, m, _ in rows if r == "mean"), float("nan"))
    print(f"d = {d:,} ({4 * d * p / 2**20:.0f} MiB of inputs)")
    print("| rule | s/call (median) | s/call (min) | ratio to mean |")
    print("| --- | --- | --- | --- |")
    for rule, med, best in rows:
        print(f"| {rule} | {med:.4f} | {best:.4f} | {med / mean_t:.1f} |")
    if flag_out is not None and svd:
        m = default_m(p)
        med, best, ref32 = timed(functools.partial(straightforward_flag, updates, m), repeats, device)
        print(f"| flag_svd (straightforward, float32) | {med:.4f} | {best:.4f} | {med / mean_t:.1f} |")
        as64 = [u.double() for u in updates]
        ref64 = straightforward_flag(as64, m)
        del as64
        flag_med = next(mm for r, mm, _ in rows if r == "flag")
        print(
            f"\nflag (Gram space) vs straightforward SVD solver (float32), m = {m}, 1 IRLS step: "
            f"{med / flag_med:.1f}x faster. Largest coordinate difference from the straightforward solver "
            f"run in float64: flag {float((flag_out.double() - ref64).abs().max()):.1e}, "
            f"flag_svd float32 {float((ref32.double() - ref64).abs().max()):.1e} "
            f"(|g_FA| = {float(ref64.norm()):.3f})"
        )
    print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    ap.add_argument("--dims", default="1000000,11000000", help="comma-separated d values (default 1M, 11M)")
    ap.add_argument("--peers", type=int, default=15, help="number of inputs p (default 15)")
    ap.add_argument("--f", type=int, default=3, help="declared Byzantine inputs for robust rules (default 3)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per figure (default 3)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    ap.add_argument("--rules", default=",".join(available_rules()), help="comma-separated rules (default all)")
    ap.add_argument("--no-svd", action="store_true", help="skip the straightforward FA solver")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random updates")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for line in machine_report(device):
        print(line)
    print(f"p = {args.peers}, f = {args.f}, float32, device {device}, median of {args.repeats} calls after 1 warm-up\n")
    rules = [r for r in args.rules.split(",") if r]
    for d in (int(x) for x in args.dims.split(",") if x):
        bench_dim(d, args.peers, args.f, rules, args.repeats, device, not args.no_svd, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
