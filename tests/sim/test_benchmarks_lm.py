"""benchmarks/lm_compression.py on a tiny configuration: the tables' layout and the int8 byte saving."""

from __future__ import annotations

import importlib.util
import io
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lm_compression_bench", ROOT / "benchmarks" / "lm_compression.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_lm_compression_tiny_run_tables_and_int8_bytes() -> None:
    bench = _bench()
    args = bench.parse_args(["--quick", "--nodes", "4", "--steps", "10", "--h-small", "5", "--h-large", "10",
                             "--eval-windows", "2", "--batch-size", "2", "--topologies", "modest,gossip",
                             "--compressions", "none,int8,topk:0.01"])
    out = io.StringIO()
    result = bench.run_benchmark(args, out=out)
    text = out.getvalue()
    assert "(topk:0.01: not allowed on gossip, skipped)" in text
    for topology in ("modest", "gossip"):
        entry = result["topologies"][topology]
        rows = {c["label"]: c for c in entry["compression"]}
        assert list(rows) == (["none", "int8", "topk:0.01"] if topology == "modest" else ["none", "int8"])
        for row in rows.values():
            assert row["rounds"] == 2 and math.isfinite(row["val_loss"]) and row["total_bytes"] > 0
            assert len(row["curve"]) == 2 and row["curve"][-1][2] == row["total_bytes"]
        # int8 sends about a quarter of float32 (block scales and envelopes are the rest).
        assert rows["int8"]["total_bytes"] < rows["none"]["total_bytes"] / 3.5
        diloco = entry["diloco"]
        assert diloco["large"]["rounds"] == 1 and diloco["large"]["outer_lr"] == args.outer_lr
        assert diloco["small"]["total_bytes"] == rows["none"]["total_bytes"]
        assert any(line.startswith(f"{topology}: int8 loss ratio") for line in entry["verdicts"])
        # Bytes by method: uploads and versions carry the tensors; int8 shrinks them, not the envelopes.
        by = {c["label"]: c["by_method"] for c in entry["compression"]}
        method = "modest.update" if topology == "modest" else "gossip.exchange"
        assert by["none"][method]["tensor_bytes"] > 3.5 * by["int8"][method]["tensor_bytes"] > 0
        assert by["int8"][method]["envelope_bytes"] >= by["none"][method]["envelope_bytes"] > 0
    # Markdown tables: a header, a separator and one line per row, ratio columns included.
    header = next(line for line in text.splitlines() if line.startswith("| compression |"))
    assert "loss ratio" in header and "bytes ratio" in header and "uplink s/round @50 Mbit/s" in header
    assert "| int8 |" in text and "MB to reach L=" in text
    assert "| int8 | modest.update |" in text and "| none | gossip.exchange reply |" in text
    dil = next(line for line in text.splitlines() if line.startswith("| run |"))
    assert "MB to reach L0=" in dil and "ratio at L0" in dil and "ratio at L " in dil
    assert len(dil.split("|")) == len(text.splitlines()[text.splitlines().index(dil) + 2].split("|"))


def test_lm_compression_longer_diloco_runs_its_own_baseline() -> None:
    bench = _bench()
    args = bench.parse_args(["--nodes", "4", "--steps", "10", "--diloco-steps", "20", "--h-small", "5",
                             "--h-large", "10", "--eval-windows", "2", "--batch-size", "2", "--topologies", "gossip",
                             "--compressions", "", "--diloco-warmup-steps", "10", "--diloco-compressions", ""])
    out = io.StringIO()
    entry = bench.run_benchmark(args, out=out)["topologies"]["gossip"]
    assert entry["compression"] == [] and "(a) compression" not in out.getvalue()
    small, large = entry["diloco"]["small"], entry["diloco"]["large"]
    assert (small["rounds"], large["rounds"]) == (4, 2)  # 20 local steps: 4 rounds of 5, 2 of 10
    # gossip: every node sends its model every round, so H = 10 sends half the bytes of H = 5.
    assert large["total_bytes"] == pytest.approx(small["total_bytes"] / 2, rel=0.01)
    assert "(b) DiLoCo, 20 local steps each (warm-up 2, cosine to 20)" in out.getvalue()
    # The synchronisation warm-up: 10 steps in rounds of 5 (--h-small), then one round of 10; 3/4 of the bytes.
    (warm,) = entry["diloco"]["more"]
    assert (warm["rounds"], warm["warmup_steps"], warm["warmup_local_steps"]) == (3, 10, 5)
    assert warm["total_bytes"] == pytest.approx(small["total_bytes"] * 3 / 4, rel=0.01)
    assert warm["label"].endswith("warm-up 10 steps at H=5")
    assert any("after 10 steps at H=5" in line for line in entry["verdicts"])
    verdict = entry["verdicts"][0]
    assert verdict.startswith("gossip: H=10 + outer ")


def test_lm_compression_warmup_rows_per_outer_policy_without_the_large_row() -> None:
    bench = _bench()
    args = bench.parse_args(["--nodes", "4", "--steps", "20", "--h-small", "5", "--h-large", "10",
                             "--eval-windows", "2", "--batch-size", "2", "--topologies", "gossip",
                             "--compressions", "", "--diloco-warmup-steps", "10", "--diloco-compressions", "int8",
                             "--diloco-warmup-outer", "outer,plain", "--no-diloco-large",
                             "--no-diloco-warmup-none"])
    out = io.StringIO()
    entry = bench.run_benchmark(args, out=out)["topologies"]["gossip"]
    assert entry["diloco"]["large"] is None
    rows = entry["diloco"]["more"]
    assert [(r["warmup_outer"], r["compression"], r["rounds"]) for r in rows] == [("outer", "int8", 3),
                                                                                 ("plain", "int8", 3)]
    assert rows[1]["label"].endswith("warm-up 10 steps at H=5 (plain), int8")
    # The same bytes (the same rounds and messages), not the same models: plain skips the outer step twice.
    assert rows[1]["total_bytes"] == pytest.approx(rows[0]["total_bytes"], rel=0.01)
    assert rows[0]["val_loss"] != rows[1]["val_loss"]
    assert any("(plain in the warm-up)" in line for line in entry["verdicts"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--diloco-warmup-outer", "nesterov"])
