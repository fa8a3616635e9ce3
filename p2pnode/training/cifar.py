"""CIFAR-10 from its binary distribution, read with numpy (no pickle), and batched augmentation.

The binary distribution (``cifar-10-binary.tar.gz``) unpacks to ``cifar-10-batches-bin/`` with
``data_batch_1.bin`` .. ``data_batch_5.bin`` (10,000 records each) and ``test_batch.bin`` (10,000).
A record is 3,073 bytes: one label byte (0..9), then 3,072 pixel bytes, the 32x32 red plane, then
green, then blue (CHW order, row-major).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from p2pnode.errors import ConfigError
from p2pnode.training.data import ArrayDataset

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10_URL",
    "ensure_cifar10",
    "load_cifar10",
    "random_crop_flip",
]

logger = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
FOLDER = "cifar-10-batches-bin"
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
#: Per-channel mean and standard deviation of the CIFAR-10 training pixels, scaled to [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_RECORD = 1 + 3 * 32 * 32
_DOWNLOAD_TIMEOUT_S = 60.0


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _safe_members(archive: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """The archive's members under ``FOLDER/``, refusing any that could write outside the target."""
    members = []
    for member in archive.getmembers():
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts or member.name.startswith(("/", "\\")):
            raise ConfigError(f"refusing to extract {member.name!r} from the CIFAR-10 archive: unsafe path")
        if not (member.isfile() or member.isdir()):
            raise ConfigError(
                f"refusing to extract {member.name!r} from the CIFAR-10 archive: links and special files "
                "are not expected in it"
            )
        if path.parts and path.parts[0] == FOLDER:
            members.append(member)
    return members


def extract_archive(archive_path: Path, data_dir: Path) -> None:
    """Extract the CIFAR-10 binary archive into ``data_dir`` after checking every member's path.

    The files go to a temporary folder first and are moved into place at the end, so an interrupted
    extraction never leaves a half-filled ``cifar-10-batches-bin/`` behind.
    """
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".extract-") as tmp:
        with tarfile.open(archive_path, "r:gz") as archive:
            members = _safe_members(archive)
            # The "data" filter repeats the path checks inside tarfile itself (and drops permissions
            # bits such as setuid), as a second line of defence.
            archive.extractall(tmp, members=members, filter="data")
        extracted = Path(tmp) / FOLDER
        missing = [name for name in (*TRAIN_FILES, TEST_FILE) if not (extracted / name).is_file()]
        if missing:
            raise ConfigError(f"the CIFAR-10 archive {archive_path} lacks {', '.join(missing)}")
        target = data_dir / FOLDER
        if not target.exists():
            os.replace(extracted, target)


def ensure_cifar10(data_dir: Path, *, download: bool = True, url: str = CIFAR10_URL) -> Path:
    """Return ``data_dir/cifar-10-batches-bin``, downloading and extracting it first if it is missing.

    The archive (about 163 MB) is downloaded with urllib to a temporary file in ``data_dir``, its MD5
    is checked against the published one, and it is deleted after extraction.

    Raises:
        ConfigError: the folder is missing and ``download`` is false, the download fails, or the
            archive's checksum or contents are wrong.
    """
    folder = data_dir / FOLDER
    if folder.is_dir():
        return folder
    if not download:
        raise ConfigError(
            f"CIFAR-10 not found at {folder}; allow the download or place the binary distribution "
            f"({CIFAR10_URL}, extracted) under {data_dir}"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    logger.info("downloading CIFAR-10 from %s to %s", url, data_dir)
    fd, name = tempfile.mkstemp(dir=data_dir, prefix=".cifar-10-", suffix=".tar.gz")
    archive = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
                    shutil.copyfileobj(response, out, length=1 << 20)
            except OSError as exc:
                raise ConfigError(
                    f"could not download CIFAR-10 from {url}: {exc}; download it by hand and extract it "
                    f"under {data_dir}"
                ) from exc
        digest = _md5(archive)
        if digest != CIFAR10_MD5:
            raise ConfigError(
                f"CIFAR-10 archive from {url} has MD5 {digest}, expected {CIFAR10_MD5} (corrupt or altered "
                "download); try again"
            )
        extract_archive(archive, data_dir)
    finally:
        archive.unlink(missing_ok=True)
    logger.info("CIFAR-10 ready in %s", folder)
    return folder


def read_batch_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one binary batch file: ``(images uint8 (N, 3, 32, 32), labels int64 (N,))``."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _RECORD != 0:
        raise ConfigError(
            f"{path} is not a CIFAR-10 binary batch: its {raw.size} bytes are not a multiple of {_RECORD}"
        )
    records = raw.reshape(-1, _RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise ConfigError(f"{path} holds label {labels.max()}, CIFAR-10 labels are 0..9")
    images = records[:, 1:].reshape(-1, 3, 32, 32)
    return images, labels


def load_cifar10(folder: Path) -> tuple[ArrayDataset, ArrayDataset]:
    """Load ``(train, test)`` from a ``cifar-10-batches-bin`` folder, normalized with `CIFAR10_MEAN`/`STD`.

    Pixels stay ``uint8`` in memory and are scaled and normalized per fetched batch.
    """
    missing = [name for name in (*TRAIN_FILES, TEST_FILE) if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"{folder} lacks {', '.join(missing)}; delete the folder to download it again")
    parts = [read_batch_file(folder / name) for name in TRAIN_FILES]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = read_batch_file(folder / TEST_FILE)

    def dataset(x: np.ndarray, y: np.ndarray) -> ArrayDataset:
        return ArrayDataset(
            torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), mean=CIFAR10_MEAN, std=CIFAR10_STD
        )

    return dataset(train_x, train_y), dataset(test_x, test_y)


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation on a batch ``(B, C, H, W)``: a random ``H x W`` crop of the image
    zero-padded by ``padding`` pixels on each side, then a horizontal flip with probability 1/2.

    Applied to normalized images, so padding pixels take the dataset mean colour. Random draws come
    from ``generator`` (a CPU generator) and the work runs on the images' device.
    """
    b, _, h, w = images.shape
    device = images.device
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(device)
    flips = (torch.rand(b, generator=generator) < 0.5).to(device)
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    rows = (offsets[0][:, None] + torch.arange(h, device=device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (offsets[1][:, None] + torch.arange(w, device=device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=device)[None, :, None, None]
    cropped = padded[batch, channels, rows, cols]
    return torch.where(flips[:, None, None, None], cropped.flip(3), cropped)
