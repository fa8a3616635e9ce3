"""cifar10-resnet18 on a tiny folder in the real CIFAR-10 binary format (no network)."""

from __future__ import annotations

import hashlib
import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pnode.errors import ConfigError
from p2pnode.training import ArrayDataset, Trainer, get_task
from p2pnode.training import cifar as cifar_module
from p2pnode.training.cifar import CIFAR10_MEAN, CIFAR10_STD, ensure_cifar10, random_crop_flip
from p2pnode.training.models import ResNet18

RECORDS_PER_TRAIN_FILE = 10  # 5 files -> 50 train images
TEST_RECORDS = 20


def _write_batch(path: Path, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    pixels = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    records = np.concatenate([labels.astype(np.uint8)[:, None], pixels], axis=1)
    path.write_bytes(records.tobytes())
    return pixels


def _make_folder(root: Path) -> dict[str, np.ndarray]:
    """Write ``root/cifar-10-batches-bin`` with 50 train and 20 test records; return what was written."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_labels = np.arange(5 * RECORDS_PER_TRAIN_FILE) % 10
    pixels = [
        _write_batch(folder / f"data_batch_{i + 1}.bin", part, rng)
        for i, part in enumerate(np.split(train_labels, 5))
    ]
    test_labels = (np.arange(TEST_RECORDS) * 3) % 10
    test_pixels = _write_batch(folder / "test_batch.bin", test_labels, rng)
    return {
        "train_labels": train_labels,
        "train_pixels": np.concatenate(pixels),
        "test_labels": test_labels,
        "test_pixels": test_pixels,
    }


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    return tmp_path, _make_folder(tmp_path)


def test_tiny_cifar_folder_loads_in_the_binary_layout(tiny: tuple[Path, dict[str, np.ndarray]]) -> None:
    data_dir, written = tiny
    task = get_task("cifar10-resnet18", data_dir=str(data_dir), download=False)
    train, test = task.datasets()
    assert isinstance(train, ArrayDataset) and isinstance(test, ArrayDataset)
    assert (len(train), len(test)) == (50, 20)
    assert task.train_labels().tolist() == written["train_labels"].tolist()
    assert task.datasets()[0] is train  # cached per process and folder

    # Record 7 of the test file, rebuilt by hand: CHW planes, scaled to [0, 1], then normalized.
    x, y = test[7]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert y == written["test_labels"][7]
    raw = written["test_pixels"][7].reshape(3, 32, 32).astype(np.float32) / 255.0
    mean, std = np.array(CIFAR10_MEAN)[:, None, None], np.array(CIFAR10_STD)[:, None, None]
    np.testing.assert_allclose(x.numpy(), (raw - mean) / std, rtol=1e-5, atol=1e-5)


def test_resnet18_shapes_and_exchanged_entries() -> None:
    model = ResNet18()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # the usual CIFAR ResNet-18 size
    group = ResNet18(norm="group")
    assert not any("running" in name for name in group.state_dict())
    with pytest.raises(ConfigError, match="norm"):
        get_task("cifar10-resnet18", norm="layer")


def test_one_cifar_training_step(tiny: tuple[Path, dict[str, np.ndarray]]) -> None:
    data_dir, _ = tiny
    task = get_task("cifar10-resnet18", data_dir=data_dir, download=False)
    trainer = Trainer(
        task, node_index=1, num_nodes=2, seed=0, device="cpu", batch_size=4, max_eval_examples=4
    )
    assert trainer.num_examples == 25 and trainer.batch_size == 4
    spec = trainer.spec
    # BatchNorm running statistics are exchanged (float buffers); the integer step counters are not.
    assert spec["bn1.running_mean"] == ((64,), torch.float32)
    assert not any(name.endswith("num_batches_tracked") for name in spec)
    # 62 parameter tensors, and running mean and variance of the 20 BatchNorm layers.
    assert len(spec) == 62 + 2 * 20 == len(list(trainer.model.parameters())) + 40

    before = trainer.state()
    loss = trainer.train(1)
    assert math.isfinite(loss) and 1.0 < loss < 5.0  # about ln(10) = 2.3 for a fresh model
    after = trainer.state()
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])
    eval_loss, accuracy = trainer.evaluate()
    assert math.isfinite(eval_loss) and accuracy * 4 == round(accuracy * 4)


def test_random_crop_flip_takes_a_crop_of_the_padded_image() -> None:
    images = torch.arange(4 * 3 * 32 * 32, dtype=torch.float32).view(4, 3, 32, 32) + 1.0
    out = random_crop_flip(images, torch.Generator().manual_seed(0))
    again = random_crop_flip(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and torch.equal(out, again)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    flipped_any = False
    for b in range(4):
        matches = [
            (dy, dx, flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            if torch.equal(
                out[b],
                padded[b, :, dy : dy + 32, dx : dx + 32].flip(2)
                if flip
                else padded[b, :, dy : dy + 32, dx : dx + 32],
            )
        ]
        assert len(matches) == 1, matches
        flipped_any |= matches[0][2]
    assert flipped_any  # with seed 0, at least one of the four images is mirrored


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_download_checks_md5_then_extracts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "source"
    _make_folder(source)
    archive = tmp_path / "cifar-10-binary.tar.gz"
    archive.write_bytes(
        _tar_gz(
            {
                f"cifar-10-batches-bin/{p.name}": p.read_bytes()
                for p in (source / "cifar-10-batches-bin").iterdir()
            }
        )
    )
    url = archive.as_uri()  # urllib reads file:// URLs: the real download code path, without a network
    data_dir = tmp_path / "data"

    with pytest.raises(ConfigError, match="MD5"):
        ensure_cifar10(data_dir, url=url)  # the tiny archive is not the published one
    assert not (data_dir / "cifar-10-batches-bin").exists()
    assert list(data_dir.iterdir()) == []  # the rejected download was deleted

    monkeypatch.setattr(cifar_module, "CIFAR10_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    folder = ensure_cifar10(data_dir, url=url)
    assert folder == data_dir / "cifar-10-batches-bin"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        p.name for p in (source / "cifar-10-batches-bin").iterdir()
    )
    assert list(data_dir.iterdir()) == [folder]  # no archive or temporary folder left behind
    assert ensure_cifar10(data_dir, download=False) == folder

    with pytest.raises(ConfigError, match=r"not found.*allow the download"):
        ensure_cifar10(tmp_path / "empty", download=False)
    with pytest.raises(ConfigError, match="could not download"):
        ensure_cifar10(tmp_path / "nowhere", url=(tmp_path / "missing.tar.gz").as_uri())


@pytest.mark.parametrize("bad_name", ["../evil.bin", "/tmp/evil.bin", "cifar-10-batches-bin/../../evil.bin"])
def test_extraction_refuses_paths_outside_the_target(tmp_path: Path, bad_name: str) -> None:
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(_tar_gz({"cifar-10-batches-bin/test_batch.bin": b"x", bad_name: b"evil"}))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with pytest.raises(ConfigError, match="unsafe path"):
        cifar_module.extract_archive(archive, data_dir)
    assert not (tmp_path / "evil.bin").exists()
    assert not (data_dir / "cifar-10-batches-bin").exists()


def test_corrupt_batch_file_is_reported(tiny: tuple[Path, dict[str, np.ndarray]]) -> None:
    data_dir, _ = tiny
    path = data_dir / "cifar-10-batches-bin" / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ConfigError, match="not a multiple of 3073"):
        cifar_module.load_cifar10(data_dir / "cifar-10-batches-bin")
