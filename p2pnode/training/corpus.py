"""Text corpora of the language-model task: documents -> token stream -> windows -> node shards.

Every source goes through the same path: `load_documents` gives a list of texts, `tokenize` turns
them into one stream of token ids (documents joined by the tokenizer's separator), `split_stream`
cuts that stream into training and validation parts (the last ``val_fraction`` is validation, the
same on every node), `TokenWindows` serves ``(x[t:t+T], x[t+1:t+T+1])`` pairs, and
`contiguous_shards` gives each node a contiguous, disjoint chunk of the training stream.

Sources (the ``corpus`` option of ``tiny-lm``):

- ``"shakespeare"``: the corpus shipped in ``p2pnode/training/corpora/`` (see its README);
- a path to a ``.txt`` file (one document) or a ``.jsonl`` file (one JSON object per line, its
  ``"text"`` field a document; rows without text are skipped);
- ``"hf:PATH[:CONFIG]"``: the ``train`` split of a Hugging Face ``datasets`` set with a ``text``
  column, e.g. ``hf:wikitext:wikitext-2-raw-v1`` (needs internet and ``p2pnode[hf]``). Its rows are
  the same documents as a ``.jsonl`` file's lines.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import torch
from torch.utils.data import Dataset

from p2pnode.errors import ConfigError
from p2pnode.training.tokenizer import Tokenizer, require_hf

__all__ = ["BUILTIN_CORPORA", "TokenWindows", "contiguous_shards", "load_documents", "split_stream", "tokenize"]

#: Corpora shipped with the package: name -> file in ``p2pnode/training/corpora/``.
BUILTIN_CORPORA = {"shakespeare": "shakespeare.txt"}
HF_PREFIX = "hf:"


def _strip_header(text: str) -> str:
    """The shipped corpora start with ``# ...`` lines naming their source; they are not training text."""
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines) and lines[i].startswith("#"):
        i += 1
    return "".join(lines[i:]).lstrip("\n")


def _documents_of_rows(rows: Iterable[object], where: str) -> list[str]:
    docs: list[str] = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: row {number} is not an object with a 'text' field")
        text = row.get("text")
        if isinstance(text, str) and text.strip():
            docs.append(text)
    if not docs:
        raise ConfigError(f"{where}: no row has a non-empty 'text' field")
    return docs


def load_documents(source: str) -> list[str]:
    """The documents of ``source`` (see the module docstring for the accepted forms).

    Raises:
        ConfigError: unknown name, missing or unreadable file, a ``.jsonl`` line that is not JSON, no
            text at all, or ``hf:`` without the ``datasets`` package.
    """
    if source in BUILTIN_CORPORA:
        text = resources.files("p2pnode.training").joinpath("corpora", BUILTIN_CORPORA[source]).read_text("utf-8")
        return [_strip_header(text)]
    if source.startswith(HF_PREFIX):
        datasets = require_hf("datasets")
        path, _, config = source[len(HF_PREFIX):].partition(":")
        try:
            rows = datasets.load_dataset(path, config or None, split="train")
        except Exception as exc:  # network, unknown set: all mean "cannot use it"
            raise ConfigError(f"cannot load Hugging Face dataset {source!r}: {type(exc).__name__}: {exc}") from exc
        if "text" not in rows.column_names:
            raise ConfigError(f"{source}: the dataset has no 'text' column (columns: {rows.column_names})")
        return _documents_of_rows(rows, source)
    file = Path(source).expanduser()
    if file.suffix not in (".txt", ".jsonl"):
        raise ConfigError(f"corpus {source!r}: expected {', '.join(BUILTIN_CORPORA)}, a .txt or .jsonl file, "
                          f"or hf:PATH[:CONFIG]")
    try:
        raw = file.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"corpus {source!r}: cannot read it as UTF-8 text: {exc}") from exc
    if file.suffix == ".txt":
        if not raw.strip():
            raise ConfigError(f"corpus {source!r} is empty")
        return [raw]
    rows = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"corpus {source!r}: line {number} is not JSON ({exc})") from exc
    return _documents_of_rows(rows, source)


def tokenize(documents: list[str], tokenizer: Tokenizer) -> torch.Tensor:
    """One 1-D int64 stream of the documents' token ids, joined by ``tokenizer.separator``."""
    ids: list[int] = []
    for i, doc in enumerate(documents):
        if i and tokenizer.separator is not None:
            ids.append(tokenizer.separator)
        ids.extend(tokenizer.encode(doc))
    return torch.tensor(ids, dtype=torch.int64)


def split_stream(tokens: torch.Tensor, val_fraction: float, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, validation)``: the stream cut before its last ``val_fraction`` of tokens.

    Raises:
        ConfigError: ``val_fraction`` outside ``(0, 1)``, or a part too short for one window of
            ``context + 1`` tokens.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = round(tokens.numel() * (1.0 - val_fraction))
    train, val = tokens[:cut], tokens[cut:]
    if min(train.numel(), val.numel()) < context + 1:
        raise ConfigError(f"corpus of {tokens.numel()} tokens is too short for a train/validation split with "
                          f"windows of {context + 1} tokens")
    return train, val


class TokenWindows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Windows of a token stream: example ``i`` is ``(x[s:s+T], x[s+1:s+T+1])`` with ``s = i * stride``.

    Args:
        tokens: 1-D integer stream (stored as int32 when the vocabulary allows, to halve memory).
        context: window length ``T``.
        stride: distance between the starts of consecutive windows (1 for training: every position
            starts a window; ``T`` for validation: every token is predicted once).
        limit: keep only the first this many windows (default: all).
    """

    def __init__(self, tokens: torch.Tensor, context: int, stride: int = 1, limit: int | None = None) -> None:
        if context < 1 or stride < 1:
            raise ValueError(f"context and stride must be >= 1, got {context}, {stride}")
        self.tokens = tokens.to(torch.int32) if int(tokens.max()) < 2**31 else tokens
        self.context = context
        self.stride = stride
        count = max(0, (tokens.numel() - context - 1) // stride + 1)
        self._count = count if limit is None else min(count, limit)
        self._offsets = torch.arange(context + 1)

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.get_batch(torch.tensor([index]))
        return x[0], y[0]

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``, both int64 of shape ``(len(indices), T)``."""
        windows = self.tokens[(indices * self.stride)[:, None] + self._offsets].to(torch.int64)
        return windows[:, :-1], windows[:, 1:]


def contiguous_shards(num_tokens: int, context: int, num_nodes: int) -> list[torch.Tensor]:
    """Window starts of each node: the training stream cut into ``num_nodes`` contiguous chunks.

    Chunk ``i`` covers tokens ``[c_i, c_{i+1})`` (sizes differ by at most one) and its node gets every
    window that lies inside it, so no two nodes ever train on the same token.

    Raises:
        ConfigError: a chunk shorter than one window (``context + 1`` tokens).
    """
    if num_nodes < 1:
        raise ConfigError(f"num_nodes must be >= 1, got {num_nodes}")
    bounds = [num_tokens * i // num_nodes for i in range(num_nodes + 1)]
    if bounds[1] - bounds[0] < context + 1:
        raise ConfigError(f"cannot split {num_tokens} training tokens among {num_nodes} nodes with windows of "
                          f"{context + 1} tokens; use fewer nodes, a shorter context or a larger corpus")
    return [torch.arange(lo, hi - context, dtype=torch.int64) for lo, hi in itertools.pairwise(bounds)]
