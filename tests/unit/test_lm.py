"""The tiny-lm task: model, tokenizer, corpus and shards, AdamW schedule, perplexity, checkpoints, simulator."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from p2pnode.cli.main import cli
from p2pnode.daemon.checkpoint import CheckpointStore
from p2pnode.daemon.control import round_event
from p2pnode.daemon.node import Node
from p2pnode.daemon.node_status import metric_fields
from p2pnode.daemon.settings import DaemonSettings
from p2pnode.daemon.trainer_state import capture, restore
from p2pnode.discovery.memory import MemoryRegistry
from p2pnode.errors import ConfigError
from p2pnode.protocols.base import RoundReport
from p2pnode.training import ArrayDataset, Task, Trainer, get_task, seeded
from p2pnode.training.corpus import TokenWindows, contiguous_shards, load_documents, tokenize
from p2pnode.training.lm import TinyLMTask, warmup_cosine
from p2pnode.training.tokenizer import ByteTokenizer
from p2pnode.transport.clock import run_virtual
from p2pnode.transport.memory import MemoryNetwork
from simulator import SimConfig, run_simulation
from simulator.analysis import rounds_to_target
from simutil import memory_node


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # A 0.1 M-parameter model trains fastest on one thread on a shared machine (2 threads only add syncs).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny() -> TinyLMTask:
    task = get_task("tiny-lm", size="tiny")
    assert isinstance(task, TinyLMTask)
    return task


def test_model_sizes_and_output_shape(tiny: TinyLMTask) -> None:
    small = get_task("tiny-lm")
    assert isinstance(small, TinyLMTask)
    assert (small.d_model, small.n_layers, small.n_heads, small.context) == (256, 4, 4, 128)
    assert sum(p.numel() for p in small.build_model(0).parameters()) == 3_257_856
    model = tiny.build_model(0)
    # 256*64 token + 64*64 position embeddings, 2 blocks of 49,984, final LayerNorm 128; the head is tied.
    assert sum(p.numel() for p in model.parameters()) == 120_576
    ids = torch.randint(0, 256, (3, 64))
    assert model(ids).shape == (3, 64, 256)
    assert model(ids[:, :10]).shape == (3, 10, 256)  # shorter inputs are fine, longer ones are refused
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros((1, 65), dtype=torch.int64))
    # Same seed, same weights; a different seed, different ones.
    a, b, c = (tiny.build_model(s).state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["tok.weight"], c["tok.weight"])
    custom = get_task("tiny-lm", size="tiny", d_model=32, n_heads=4, context=16)
    assert custom.build_model(0)(torch.zeros((1, 16), dtype=torch.int64)).shape == (1, 16, 256)
    with pytest.raises(ConfigError, match="must divide"):
        get_task("tiny-lm", size="tiny", n_heads=3)
    with pytest.raises(ConfigError, match="size must be one of"):
        get_task("tiny-lm", size="huge")
    with pytest.raises(ConfigError, match="does not accept option"):
        get_task("tiny-lm", hidden=3)


def test_attention_is_causal(tiny: TinyLMTask) -> None:
    model = tiny.build_model(3).eval()
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[:, 40] = (changed[:, 40] + 1) % 256
    with torch.no_grad():
        before, after = model(ids), model(changed)
    assert torch.equal(before[:, :40], after[:, :40])  # no earlier position sees a later token
    assert not torch.allclose(before[:, 40:], after[:, 40:])


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    text = "To be, or not to be: that is the question.\nÆon — naïve 日本 🙂"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids[:-1]).endswith("\ufffd")  # a cut multi-byte character decodes, it does not raise


def test_shipped_corpus_split_and_disjoint_shards(tiny: TinyLMTask) -> None:
    text = load_documents("shakespeare")[0]
    assert text.startswith("HAMLET\n") and "#" not in text[:200]  # the source header is not training text
    total = len(text.encode("utf-8"))
    assert tiny.train_tokens + tiny.val_tokens == total and tiny.val_tokens == total - round(total * 0.9)
    _, test = tiny.datasets()
    assert isinstance(test, TokenWindows)
    assert len(test) == 128  # eval_windows: non-overlapping windows from the start of the held-out part
    x, y = test.get_batch(torch.tensor([0, 1]))
    assert x.shape == y.shape == (2, 64) and torch.equal(x[:, 1:], y[:, :-1])
    held_out = text.encode("utf-8")[tiny.train_tokens:]
    assert x[1].tolist() == list(held_out[64:128])  # window 1 starts one context after window 0
    # Shards: contiguous chunks; windows of different nodes never share a token.
    shards = tiny.split(4, seed=0)
    assert len(shards) == 4
    spans = [(int(s[0]), int(s[-1]) + tiny.context) for s in shards]  # first and last token a node reads
    assert spans[0][0] == 0 and all(a[1] < b[0] for a, b in itertools.pairwise(spans))
    assert all(torch.equal(s, torch.arange(int(s[0]), int(s[-1]) + 1)) for s in shards)
    assert tiny.split(4, seed=9)[2].tolist() == shards[2].tolist()  # the same on every node, whatever the seed
    trainer = Trainer(tiny, node_index=2, num_nodes=4, seed=0, device="cpu")
    assert trainer.num_examples == shards[2].numel()
    with pytest.raises(ConfigError, match="no classes"):
        tiny.split(4, seed=0, alpha=0.5)
    with pytest.raises(ConfigError, match="cannot split"):
        contiguous_shards(1000, 64, 20)


def test_training_lowers_validation_loss_and_perplexity_is_exp_loss(tiny: TinyLMTask) -> None:
    trainer = Trainer(tiny, node_index=0, num_nodes=1, seed=0, device="cpu", batch_size=16)
    assert trainer.metric == "perplexity" and isinstance(trainer.optimizer, torch.optim.AdamW)
    loss0, ppl0 = trainer.evaluate()
    assert loss0 == pytest.approx(math.log(256), abs=0.05)  # an untrained model is close to uniform
    trainer.train(100)
    loss1, ppl1 = trainer.evaluate()
    assert ppl0 == pytest.approx(math.exp(loss0), rel=1e-12) and ppl1 == pytest.approx(math.exp(loss1), rel=1e-12)
    # Measured: 5.55 -> 2.66 nats (perplexity 257 -> 14.2) after 100 steps of 16 x 64 tokens, about 2 s.
    assert loss1 < loss0 - 2.0 and ppl1 < 30, (loss0, loss1)


def test_warmup_cosine_schedule_values() -> None:
    assert warmup_cosine(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(4, 10, 110, 0.1) == pytest.approx(0.5)
    assert warmup_cosine(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.1) == pytest.approx(0.55)  # half way: the mean of 1 and 0.1
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(10_000, 10, 110, 0.1) == pytest.approx(0.1)
    task = get_task("tiny-lm", size="tiny", warmup_steps=4, total_steps=12, min_lr_ratio=0.0)
    trainer = Trainer(task, node_index=0, num_nodes=1, seed=0, device="cpu", batch_size=2, lr=0.01)
    lrs = []
    for _ in range(12):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])  # the rate the next step uses
        trainer.train(1)
    assert lrs[:4] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    assert lrs[8] == pytest.approx(0.005) and lrs[11] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert trainer.optimizer.param_groups[0]["lr"] == 0.0
    # Decay on matrices and embeddings only.
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.1, 0.0]


def _lrs(trainer: Trainer) -> list[float]:
    return [g["lr"] for g in trainer.optimizer.param_groups]


def test_schedule_spans_rounds_and_aligns_to_a_given_step() -> None:
    task = get_task("tiny-lm", size="tiny", warmup_steps=4, total_steps=40, min_lr_ratio=0.1)
    trainer = Trainer(task, node_index=0, num_nodes=2, seed=0, device="cpu", batch_size=2, lr=0.01)
    # Rounds of 5 steps go on along one schedule: no restart (or warm-up again) at a round's start.
    for _ in range(3):
        trainer.train(5)
    assert _lrs(trainer) == pytest.approx([0.01 * warmup_cosine(15, 4, 40, 0.1)] * 2)
    # A MoDeST node that sat out versions 3..5 trains version 6 (of 5 steps each) at the swarm's step 30.
    assert trainer.align_schedule(30)
    assert trainer.scheduler is not None and trainer.scheduler.last_epoch == 30
    assert _lrs(trainer) == pytest.approx([0.01 * warmup_cosine(30, 4, 40, 0.1)] * 2)
    assert trainer.scheduler.get_last_lr() == pytest.approx(_lrs(trainer))
    trainer.train(2)
    assert _lrs(trainer) == pytest.approx([0.01 * warmup_cosine(32, 4, 40, 0.1)] * 2)
    assert trainer.steps_done == 17  # its own count is unchanged
    # Back to an earlier step too (a node that trains an old version).
    assert trainer.align_schedule(0) and _lrs(trainer) == pytest.approx([0.01 * 0.25] * 2)
    with pytest.raises(ValueError, match="step must be >= 0"):
        trainer.align_schedule(-1)
    # SGD without a scheduler (digits-mlp): nothing to move.
    plain = Trainer(get_task("digits-mlp"), node_index=0, num_nodes=2, seed=0, device="cpu")
    assert not plain.align_schedule(10) and _lrs(plain) == [plain.lr]


def test_modest_trainers_follow_the_versions_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    # 4 nodes, samples of 2: each node trains about half the versions, so its own count would lag.
    cfg = SimConfig.of(nodes=4, task="tiny-lm", topology="modest", rounds=6, seed=0, sample_size=2,
                       task_options={"size": "tiny", "eval_windows": 2, "warmup_steps": 2, "total_steps": 18},
                       local_steps=3, batch_size=2)
    seen: dict[int, list[float]] = {}
    original = Trainer.train

    def spy(self: Trainer, steps: int) -> float:
        assert self.scheduler is not None
        seen.setdefault(self.node_index, []).append(self.scheduler.last_epoch)
        return original(self, steps)

    monkeypatch.setattr(Trainer, "train", spy)  # records where each training starts, then trains
    res = run_simulation(cfg)
    assert len(res["rounds"]) == 6
    starts = sorted(int(e) for epochs in seen.values() for e in epochs)
    # Every training starts at a version's step k * 3, version 0..5, two trainers per version.
    assert set(starts) <= {0, 3, 6, 9, 12, 15} and {12, 15} <= set(starts)
    assert sum(len(v) for v in seen.values()) >= 12
    # Some node skipped versions: its own count (3 per training) is behind the step it trained at.
    assert any(max(epochs) > 3 * (len(epochs) - 1) for epochs in seen.values())


def test_checkpoint_keeps_adamw_moments_steps_and_schedule(tmp_path: Path) -> None:
    task = get_task("tiny-lm", size="tiny", warmup_steps=5, total_steps=40)
    trainer = Trainer(task, node_index=1, num_nodes=2, seed=0, device="cpu", batch_size=4)
    trainer.train(7)
    store = CheckpointStore(tmp_path / "checkpoints")
    store.write(capture(trainer, round_=3, config_hash="abc", run_id="r", task="tiny-lm"))

    fresh = Trainer(task, node_index=1, num_nodes=2, seed=0, device="cpu", batch_size=4)
    found = store.load_latest("abc", run_id="r", task="tiny-lm")
    assert found is not None and found.round == 3 and set(found.scheduler) >= {"last_epoch", "base_lrs"}
    restore(fresh, found)
    old, new = trainer.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert old["state"].keys() == new["state"].keys()
    assert len(old["state"]) == len(list(task.build_model(0).parameters()))
    for index, state in old["state"].items():
        assert float(new["state"][index]["step"]) == float(state["step"]) == 7.0
        assert torch.equal(new["state"][index]["exp_avg"], state["exp_avg"])
        assert torch.equal(new["state"][index]["exp_avg_sq"], state["exp_avg_sq"])
    assert fresh.scheduler is not None and trainer.scheduler is not None
    assert fresh.scheduler.last_epoch == 7 and fresh.steps_done == 7
    assert fresh.scheduler.get_last_lr() == pytest.approx(trainer.scheduler.get_last_lr())
    assert _lrs(fresh) == pytest.approx(_lrs(trainer))
    # Both go on along the same schedule.
    trainer.train(2)
    fresh.train(2)
    assert _lrs(fresh) == pytest.approx(_lrs(trainer))
    # Resuming with another peak learning rate keeps the position in the schedule, scaled to the new rate.
    other = Trainer(task, node_index=1, num_nodes=2, seed=0, device="cpu", batch_size=4, lr=task.default_lr / 2)
    restore(other, found)
    assert other.optimizer.param_groups[0]["lr"] == pytest.approx(found.scheduler["_last_lr"][0].item() / 2)


def test_node_restarted_from_its_checkpoint_keeps_adamw_state(tmp_path: Path) -> None:
    """A tiny-lm node with checkpoints runs 2 rounds and stops; a new node on the same state dir resumes
    with the same AdamW moments, step counts and place in the learning-rate schedule."""

    def node() -> Node:
        settings = DaemonSettings.in_memory(checkpoint_every=1, keep_checkpoints=1, resume=True)
        return memory_node(MemoryNetwork(seed=0), MemoryRegistry(), 0, 1, settings,
                           CheckpointStore.in_state_dir(tmp_path, keep=1), eval_every=0, task="tiny-lm",
                           task_options={"size": "tiny"}, batch_size=4, local_steps=3)

    async def first() -> tuple[dict, list[float]]:  # type: ignore[type-arg]
        n = node()
        await n.start()
        await n.run(rounds=2)
        await n.shutdown()
        return n.trainer.optimizer.state_dict(), _lrs(n.trainer)

    async def again() -> tuple[dict, list[float], int, str, int]:  # type: ignore[type-arg]
        n = node()
        await n.start()
        out = (n.trainer.optimizer.state_dict(), _lrs(n.trainer), n.round, n.resumed_from, n.trainer.steps_done)
        n.stop()
        await n.shutdown()
        return out

    before, lrs = run_virtual(first())
    after, lrs_after, round_, source, steps = run_virtual(again())
    assert (round_, source, steps) == (2, "checkpoint", 6)
    assert lrs_after == pytest.approx(lrs) and lrs[0] == pytest.approx(3e-3 * 7 / 100)  # 6 warm-up steps done
    assert before["state"].keys() == after["state"].keys() and before["state"]
    for index, state in before["state"].items():
        assert float(after["state"][index]["step"]) == float(state["step"]) == 6.0
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(after["state"][index][key], state[key])


def test_text_and_jsonl_corpora_take_the_same_path(tmp_path: Path) -> None:
    docs = ["First document, with some words. " * 20, "Second one — ünïcode. " * 20, ""]
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n", encoding="utf-8")
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n".join(docs[:2]), encoding="utf-8")
    assert load_documents(str(jsonl)) == docs[:2]  # rows without text are skipped
    stream = tokenize(load_documents(str(jsonl)), ByteTokenizer())
    assert torch.equal(stream, tokenize(load_documents(str(txt)), ByteTokenizer()))  # joined by "\n" either way
    task = TinyLMTask(corpus=str(jsonl), size="tiny", context=16, eval_windows=4)
    assert task.train_tokens + task.val_tokens == stream.numel()
    trainer = Trainer(task, node_index=0, num_nodes=3, seed=0, device="cpu", batch_size=4)
    trainer.train(2)
    assert math.isfinite(trainer.evaluate()[1])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="line 2 is not JSON"):
        load_documents(str(bad))
    with pytest.raises(ConfigError, match="expected shakespeare"):
        load_documents(str(tmp_path / "corpus.csv"))


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hugging_face_sources_say_how_to_install_them() -> None:
    with pytest.raises(ConfigError, match=r"p2pnode\[hf\]"):
        get_task("tiny-lm", corpus="hf:wikitext:wikitext-2-raw-v1", size="tiny")


@pytest.mark.skipif(importlib.util.find_spec("transformers") is not None, reason="transformers is installed")
def test_gpt2_tokenizer_says_how_to_install_it() -> None:
    with pytest.raises(ConfigError, match=r"'transformers'.*p2pnode\[hf\]"):
        get_task("tiny-lm", tokenizer="gpt2", size="tiny")


class _ErrorRateTask(Task):
    """A user task with its own metric (error rate) and optimizer (plain SGD, no momentum, step decay)."""

    name = "error-rate"
    num_classes = 2
    metric = "error_rate"
    higher_is_better = False
    default_lr = 0.5
    default_batch_size = 8
    default_local_steps = 1

    def __init__(self) -> None:
        x = torch.linspace(-1, 1, 40)[:, None]
        y = (x[:, 0] > 0).long()
        self._data = (ArrayDataset(x, y), ArrayDataset(x, y))

    def build_model(self, seed: int) -> torch.nn.Module:
        with seeded(seed):
            return torch.nn.Linear(1, 2)

    def datasets(self) -> tuple[ArrayDataset, ArrayDataset]:
        return self._data

    def metric_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs.argmax(dim=1) != targets).sum()

    def make_optimizer(self, params, lr):  # type: ignore[no-untyped-def]
        optimizer = torch.optim.SGD(params, lr=lr)
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)


def test_user_task_declares_metric_and_optimizer() -> None:
    trainer = Trainer(_ErrorRateTask(), node_index=0, num_nodes=1, seed=0, device="cpu")
    assert trainer.metric == "error_rate" and type(trainer.optimizer) is torch.optim.SGD
    trainer.train(4)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.125)  # halved every 2 steps
    loss, error = trainer.evaluate()
    assert 0.0 <= error <= 1.0 and math.isfinite(loss)
    accuracy = Trainer(get_task("digits-mlp"), node_index=0, num_nodes=1, seed=0, device="cpu")
    assert accuracy.metric == "accuracy" and accuracy.scheduler is None


def test_metric_reported_under_its_name() -> None:
    report = RoundReport(round=2, train_loss=3.0, test_loss=2.5, accuracy=12.18, peers=3, combined=2, fraction=1.0)
    event = round_event(report, peer_id="p", bytes_sent=1, bytes_received=2, metric="perplexity")
    assert event.metric == "perplexity" and event.metric_value == pytest.approx(12.18)
    assert not event.HasField("accuracy")  # a perplexity is never shown as an accuracy
    event = round_event(report, peer_id="p", bytes_sent=1, bytes_received=2)
    assert event.accuracy == pytest.approx(12.18) and event.metric == "accuracy"
    assert metric_fields("perplexity", 12.0) == {"accuracy": None, "metric": "perplexity", "metric_value": 12.0}
    assert metric_fields("accuracy", 0.9)["accuracy"] == 0.9


def test_simulator_reports_perplexity(tmp_path: Path) -> None:
    res = run_simulation(SimConfig.of(nodes=4, rounds=2, task="tiny-lm", task_options={"size": "tiny"}, local_steps=5,
                                      batch_size=8))
    assert res["metric"] == "perplexity" and res["higher_is_better"] is False
    rows = res["rounds"]
    assert len(rows) == 2 and all("accuracy" not in r and r["perplexity"] > 1 for r in rows)
    assert rows[1]["perplexity"] < rows[0]["perplexity"] < 256 * 1.2
    assert res["final_perplexity"] == rows[-1]["perplexity"] and "final_accuracy" not in res
    reached = rounds_to_target(rows, rows[1]["perplexity"], metric="perplexity", higher_is_better=False)
    assert reached == 2 and rounds_to_target(rows, 1.0, metric="perplexity", higher_is_better=False) is None
    out = tmp_path / "lm.json"
    result = CliRunner().invoke(cli, ["sim", "--task", "tiny-lm", "--task-option", "size=tiny", "--nodes", "4",
                                      "--rounds", "2", "--local-steps", "5", "--batch-size", "8", "--quiet",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "final_perplexity=" in result.output
    data = json.loads(out.read_text())
    assert data["metric"] == "perplexity" and data["config"]["task_options"] == {"size": "tiny"}
    assert data["final_perplexity"] == res["final_perplexity"]  # the same run, through the CLI
