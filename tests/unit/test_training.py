"""Training layer: data splits, device choice, tasks (built-in and user) and the local trainer."""

from __future__ import annotations

import collections
import textwrap
from pathlib import Path

import pytest
import torch

from p2pnode.errors import ConfigError
from p2pnode.training import (
    ArrayDataset,
    Task,
    Trainer,
    available_tasks,
    get_task,
    select_device,
    split_indices,
)


@pytest.fixture(scope="module")
def digits() -> Task:
    return get_task("digits-mlp")


def _flat(shards: list[list[int]]) -> list[int]:
    return [i for shard in shards for i in shard]


# ------------------------------------------------------------------------------------------ splits


def test_iid_split_is_a_balanced_deterministic_partition(digits: Task) -> None:
    labels = digits.train_labels()
    n = len(labels)
    shards = split_indices(labels, 64, seed=7)
    assert len(shards) == 64
    assert sorted(_flat(shards)) == list(range(n))  # disjoint and complete
    sizes = [len(s) for s in shards]
    assert min(sizes) == n // 64 and max(sizes) == -(-n // 64)  # 22 and 23 for 1,437 examples
    assert all(s == sorted(s) for s in shards)
    assert split_indices(labels, 64, seed=7) == shards
    assert split_indices(labels, 64, seed=8) != shards
    # IID: each node sees many classes (22 examples out of 10 balanced classes).
    assert min(len(set(labels[s].tolist())) for s in shards) >= 5


@pytest.mark.parametrize(("alpha", "low", "high"), [(0.1, 0.55, 0.8), (1.0, 0.25, 0.4), (100.0, 0.0, 0.15)])
def test_dirichlet_split_is_a_skewed_deterministic_partition(
    digits: Task, alpha: float, low: float, high: float
) -> None:
    labels = digits.train_labels()
    shards = split_indices(labels, 32, seed=3, alpha=alpha)
    assert sorted(_flat(shards)) == list(range(len(labels)))
    assert min(len(s) for s in shards) >= 1
    assert split_indices(labels, 32, seed=3, alpha=alpha) == shards
    assert split_indices(labels, 32, seed=4, alpha=alpha) != shards

    def dominant_fraction(split: list[list[int]]) -> float:
        """Mean over nodes of the share of the node's most common class."""
        fractions = [collections.Counter(labels[s].tolist()).most_common(1)[0][1] / len(s) for s in split]
        return sum(fractions) / len(fractions)

    # IID: about 0.18 (a random 45-example shard of 10 classes). Small alpha concentrates a node on
    # few classes; large alpha approaches exact class proportions, more even than random sampling.
    assert 0.15 < dominant_fraction(split_indices(labels, 32, seed=3)) < 0.22
    assert low < dominant_fraction(shards) < high


def test_dirichlet_split_gives_every_node_an_example_even_when_scarce() -> None:
    labels = torch.arange(100) % 10
    for seed in range(5):
        shards = split_indices(labels, 90, seed=seed, alpha=0.01)
        assert min(len(s) for s in shards) >= 1
        assert sorted(_flat(shards)) == list(range(100))
    shards = split_indices(labels, 100, seed=0, alpha=0.05)
    assert sorted(len(s) for s in shards) == [1] * 100


def test_split_rejects_impossible_requests() -> None:
    labels = torch.zeros(10, dtype=torch.int64)
    with pytest.raises(ConfigError, match="11 nodes"):
        split_indices(labels, 11, seed=0)
    with pytest.raises(ConfigError, match="num_nodes"):
        split_indices(labels, 0, seed=0)
    with pytest.raises(ConfigError, match="alpha"):
        split_indices(labels, 2, seed=0, alpha=0.0)
    assert split_indices(labels, 1, seed=-5) == [list(range(10))]  # negative seeds are fine


# ------------------------------------------------------------------------------------------ device


def test_select_device() -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(" CPU ") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device().type == expected
    assert select_device("auto").type == expected
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        select_device("tpu")
    with pytest.raises(ConfigError, match="cuda:99"):
        select_device("cuda:99")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_a_config_error_with_a_fix(digits: Task) -> None:
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match="'cpu'") as info:
            select_device(name)
        assert "requested" in str(info.value)
    for device in ("cuda", torch.device("cuda", 0)):
        with pytest.raises(ConfigError, match="cuda"):
            Trainer(digits, node_index=0, num_nodes=1, seed=0, device=device)


# ------------------------------------------------------------------------------------------ tasks


def test_builtin_tasks_and_digits_data(digits: Task) -> None:
    assert available_tasks() == ["cifar10-resnet18", "digits-mlp", "tiny-lm"]
    train, test = digits.datasets()
    assert isinstance(train, ArrayDataset) and isinstance(test, ArrayDataset)
    assert (len(train), len(test)) == (1437, 360)
    assert digits.datasets()[0] is get_task("digits-mlp").datasets()[0]  # loaded once per process
    x, y = train[0]
    assert x.shape == (64,) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= float(train.inputs.min()) and float(train.inputs.max()) == 1.0
    assert digits.train_labels().dtype == torch.int64 and len(digits.train_labels()) == 1437
    # Stratified test split: every class has 35 to 37 of the 360 test images.
    counts = collections.Counter(test.targets.tolist())
    assert sorted(counts) == list(range(10)) and all(35 <= c <= 37 for c in counts.values())
    assert (digits.num_classes, digits.default_batch_size, digits.default_local_steps) == (10, 32, 10)


def test_build_model_is_deterministic_and_leaves_global_rng_alone(digits: Task) -> None:
    rng_before = torch.get_rng_state()
    a, b, c = digits.build_model(1), digits.build_model(1), digits.build_model(2)
    assert torch.equal(torch.get_rng_state(), rng_before)
    for (name, pa), pb, pc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name
        assert not torch.equal(pa, pc), name


def test_get_task_errors() -> None:
    with pytest.raises(ConfigError, match=r"unknown task 'mnist'.*digits-mlp"):
        get_task("mnist")
    with pytest.raises(ConfigError, match=r"does not accept option.*depth.*hidden"):
        get_task("digits-mlp", depth=3)
    assert get_task("digits-mlp", hidden=8).build_model(0).state_dict()["1.weight"].shape == (8, 64)


USER_TASK_MODULE = '''
import torch
from torch.utils.data import Dataset

from p2pnode.training import Task, seeded


class Blobs(Dataset):
    """Two well-separated Gaussian blobs; items are (tensor, int), no batch fetch, no targets attribute."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 2
        self.x = torch.randn(n, 2, generator=g) * 0.3 + (self.y[:, None] * 2.0 - 1.0)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class BlobTask(Task):
    name = "blobs"
    num_classes = 2
    default_lr = 0.1
    default_batch_size = 8
    default_local_steps = 5

    def __init__(self, n=64):
        self.data = (Blobs(n, 0), Blobs(40, 1))

    def build_model(self, seed):
        with seeded(seed):
            return torch.nn.Linear(2, 2)

    def datasets(self):
        return self.data


def make(n=64):
    return BlobTask(n)


def not_a_task():
    return object()


def broken():
    raise RuntimeError("no data here")
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "p2pnode_user_task.py").write_text(textwrap.dedent(USER_TASK_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "p2pnode_user_task"


def test_user_task_trains(user_module: str) -> None:
    task = get_task(f"{user_module}:make", n=32)
    assert task.name == "blobs"
    assert len(task.train_labels()) == 32 and task.train_labels().tolist()[:4] == [0, 1, 0, 1]
    trainer = Trainer(task, node_index=1, num_nodes=2, seed=0, device="cpu")
    assert trainer.num_examples == 16 and trainer.batch_size == 8
    loss_before, _ = trainer.evaluate()
    trainer.train(30)
    loss_after, accuracy = trainer.evaluate()
    assert loss_after < loss_before
    assert accuracy == 1.0


def test_user_task_errors(user_module: str) -> None:
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module_xyz'"):
        get_task("no_such_module_xyz:make")
    with pytest.raises(ConfigError, match="no callable 'missing'"):
        get_task(f"{user_module}:missing")
    with pytest.raises(ConfigError, match=r"returned object, not a p2pnode.training.Task"):
        get_task(f"{user_module}:not_a_task")
    with pytest.raises(ConfigError, match="RuntimeError: no data here"):
        get_task(f"{user_module}:broken")
    with pytest.raises(ConfigError, match=r"does not accept option.*size"):
        get_task(f"{user_module}:make", size=3)
    with pytest.raises(ConfigError, match=r"package.module:factory"):
        get_task(":make")


# ------------------------------------------------------------------------------------------ trainer


def test_state_spec_and_round_trip(digits: Task) -> None:
    a = Trainer(digits, node_index=0, num_nodes=4, seed=0, device="cpu")
    b = Trainer(digits, node_index=1, num_nodes=4, seed=0, device="cpu")
    assert a.spec == {
        "1.weight": ((64, 64), torch.float32),
        "1.bias": ((64,), torch.float32),
        "3.weight": ((10, 64), torch.float32),
        "3.bias": ((10,), torch.float32),
    }
    # Shared initialization: every node of a run starts from the same model.
    assert all(torch.equal(a.state()[k], b.state()[k]) for k in a.spec)
    a.train(5)
    state = a.state()
    assert all(v.device.type == "cpu" and not v.requires_grad for v in state.values())
    assert not torch.equal(state["1.weight"], b.state()["1.weight"])
    b.load_state(state)
    assert all(torch.equal(b.state()[k], state[k]) for k in state)
    assert b.evaluate() == a.evaluate()
    # state() is a copy: training afterwards does not change it.
    snapshot = {k: v.clone() for k, v in state.items()}
    a.train(3)
    assert all(torch.equal(state[k], snapshot[k]) for k in state)


def test_load_state_rejects_mismatches_and_changes_nothing(digits: Task) -> None:
    t = Trainer(digits, node_index=0, num_nodes=2, seed=0, device="cpu")
    before = t.state()
    bad = {k: torch.zeros_like(v) for k, v in before.items()}
    bad["3.weight"] = torch.zeros(10, 63)
    with pytest.raises(ValueError, match=r"'3.weight' has shape \(10, 63\).*\(10, 64\)"):
        t.load_state(bad)
    assert all(torch.equal(t.state()[k], before[k]) for k in before)  # 1.weight was not zeroed either
    missing = dict(before)
    del missing["1.bias"]
    with pytest.raises(ValueError, match=r"missing \['1.bias'\]"):
        t.load_state(missing)
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        t.load_state({**before, "extra": torch.zeros(1)})


def test_training_is_deterministic_given_seeds(digits: Task) -> None:
    rng_before = torch.get_rng_state()

    def run(node: int, seed: int = 5, model_seed: int | None = None) -> tuple[float, dict[str, torch.Tensor]]:
        t = Trainer(digits, node_index=node, num_nodes=8, seed=seed, model_seed=model_seed, device="cpu")
        losses = t.train(15) + t.train(10)
        assert t.steps_done == 25
        return losses, t.state()

    loss1, s1 = run(3)
    loss2, s2 = run(3)
    assert loss1 == loss2
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    _, other_node = run(4)
    assert not torch.equal(s1["1.weight"], other_node["1.weight"])
    _, other_init = run(3, model_seed=99)
    assert not torch.equal(s1["1.weight"], other_init["1.weight"])
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's random stream is untouched


def test_trainer_arguments(digits: Task) -> None:
    t = Trainer(digits, node_index=63, num_nodes=64, seed=0, device=torch.device("cpu"), lr=0.01)
    assert t.num_examples in (22, 23) and t.batch_size == t.num_examples  # batch capped at the shard
    assert t.lr == 0.01 and t.optimizer.param_groups[0]["lr"] == 0.01
    assert t.optimizer.param_groups[0]["momentum"] == 0.9
    with pytest.raises(ValueError, match="steps"):
        t.train(0)
    with pytest.raises(ConfigError, match="node_index"):
        Trainer(digits, node_index=64, num_nodes=64, seed=0)
    with pytest.raises(ConfigError, match="batch_size"):
        Trainer(digits, node_index=0, num_nodes=1, seed=0, batch_size=0)
    few = Trainer(digits, node_index=0, num_nodes=1, seed=0, device="cpu", max_eval_examples=7)
    _, accuracy = few.evaluate()
    assert accuracy * 7 == pytest.approx(round(accuracy * 7))  # a count out of 7
    assert few.model.training  # evaluate() puts the model back in train mode


def test_label_map_poisons_training_only(digits: Task) -> None:
    t = Trainer(digits, node_index=0, num_nodes=1, seed=0, device="cpu", label_map=torch.zeros_like)
    t.train(100)
    _, accuracy = t.evaluate()
    # The model learned "always 0": right only on the test images of class 0.
    test = digits.datasets()[1]
    assert isinstance(test, ArrayDataset)
    zeros = int((test.targets == 0).sum())
    assert accuracy == pytest.approx(zeros / 360)


def test_one_node_with_all_digits_reaches_95_percent(digits: Task) -> None:
    t = Trainer(digits, node_index=0, num_nodes=1, seed=0, device="cpu")
    loss_start, accuracy_start = t.evaluate()
    assert accuracy_start < 0.2 and loss_start > 2.0  # untrained: chance level
    train_loss = t.train(300)
    loss, accuracy = t.evaluate()
    assert accuracy >= 0.95
    assert loss < 0.2 and train_loss < 0.5


def test_64_nodes_averaging_every_round_reach_90_percent(digits: Task) -> None:
    """The simulator's main use: 64 nodes with ~22 examples each, train then average each round."""
    trainers = [Trainer(digits, node_index=i, num_nodes=64, seed=0, device="cpu") for i in range(64)]
    curve = []
    for _ in range(8):
        for t in trainers:
            t.train(digits.default_local_steps)
        states = [t.state() for t in trainers]
        mean = {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}
        for t in trainers:
            t.load_state(mean)
        curve.append(trainers[0].evaluate()[1])
    assert curve[0] < 0.8
    assert curve[-1] >= 0.9, curve
