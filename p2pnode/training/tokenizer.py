"""Tokenizers of the language-model task: text -> token ids -> text.

- `ByteTokenizer` (the default): the UTF-8 bytes of the text, vocabulary 256. Needs nothing, never
  meets an unknown symbol, and round-trips any text exactly.
- `HFTokenizer`: a Hugging Face tokenizer (``"gpt2"``: GPT-2's byte-level BPE, vocabulary 50,257),
  for users with internet and the ``p2pnode[hf]`` extra; ``transformers`` is imported only when one
  is built.
"""

from __future__ import annotations

from typing import Any, Protocol

from p2pnode.errors import ConfigError

__all__ = ["ByteTokenizer", "HFTokenizer", "Tokenizer", "get_tokenizer", "require_hf"]

#: How to install what the Hugging Face paths need, quoted by every error about it.
HF_INSTALL = "pip install 'p2pnode[hf]' (installs datasets and transformers)"


class Tokenizer(Protocol):
    """What the LM task needs of a tokenizer."""

    name: str
    vocab_size: int
    #: Token put between two documents of a multi-document corpus (None: nothing is put).
    separator: int | None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, each in ``[0, vocab_size)``."""
        ...

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256); documents are separated by a newline byte."""

    name = "byte"
    vocab_size = 256
    separator: int | None = ord("\n")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        # Invalid sequences (a window cut inside a multi-byte character, a sampled model's output)
        # decode to U+FFFD instead of raising.
        return bytes(ids).decode("utf-8", errors="replace")


def require_hf(module: str) -> Any:
    """Import ``module`` (``"datasets"`` or ``"transformers"``) or raise a `ConfigError` saying how to get it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"this task option needs the Python package {module!r}, which is not installed: "
                          f"{HF_INSTALL}") from exc


class HFTokenizer:
    """A Hugging Face tokenizer by name (``"gpt2"``, or any name ``AutoTokenizer`` loads).

    Documents are separated by the tokenizer's end-of-text token when it has one.

    Raises:
        ConfigError: ``transformers`` is missing (install ``p2pnode[hf]``), or the tokenizer cannot
            be loaded (no internet and no local copy, unknown name).
    """

    def __init__(self, name: str) -> None:
        transformers = require_hf("transformers")
        try:
            self._tok = transformers.AutoTokenizer.from_pretrained(name)
        except Exception as exc:  # network errors, unknown names: all mean "cannot use it"
            raise ConfigError(f"cannot load tokenizer {name!r}: {type(exc).__name__}: {exc}") from exc
        self.name = name
        self.vocab_size = len(self._tok)
        eos = getattr(self._tok, "eos_token_id", None)
        self.separator = int(eos) if eos is not None else None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text))

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids))


def get_tokenizer(name: str) -> Tokenizer:
    """``"byte"`` (default of the task) or a Hugging Face tokenizer name such as ``"gpt2"``."""
    if name == "byte":
        return ByteTokenizer()
    return HFTokenizer(name)
