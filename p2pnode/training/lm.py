"""The ``tiny-lm`` task: a small causal transformer trained on a text corpus (next-token prediction).

Model (`TinyGPT`): token and learned position embeddings, ``n_layers`` pre-LN blocks (causal
self-attention through `torch.nn.functional.scaled_dot_product_attention`, then a 4x GELU MLP), a
final LayerNorm and an output head tied to the token embedding. No dropout: training stays a
function of the seeds.

Data: `p2pnode.training.corpus` (text -> token ids -> windows -> contiguous node shards). Metric:
perplexity, ``exp(mean token cross entropy)`` on a fixed set of validation windows. Optimizer:
AdamW with a linear warm-up then a cosine decay, stepped once per local step (`warmup_cosine`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from p2pnode.errors import ConfigError
from p2pnode.training.corpus import TokenWindows, contiguous_shards, load_documents, split_stream, tokenize
from p2pnode.training.tasks import Optimizers, Task, seeded
from p2pnode.training.tokenizer import get_tokenizer

__all__ = ["SIZES", "TinyGPT", "TinyLMTask", "warmup_cosine"]

#: Size presets of ``tiny-lm``: name -> (d_model, n_layers, n_heads, context).
SIZES: dict[str, tuple[int, int, int, int]] = {
    "small": (256, 4, 4, 128),  # 3.26 M parameters with the byte tokenizer: the default
    "tiny": (64, 2, 2, 64),  # 0.12 M: tests and many-node simulations on a CPU
}


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        # (B, T, D) -> (B, heads, T, D / heads)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Causal transformer language model; ``forward(ids (B, T) int64) -> logits (B, T, vocab)``.

    Args:
        vocab_size: number of token ids.
        d_model: width of the residual stream.
        n_layers: number of pre-LN blocks.
        n_heads: attention heads per block (must divide ``d_model``).
        context: longest input ``T`` (size of the position embedding).

    Weights are drawn from N(0, 0.02) (the residual output projections scaled by
    ``1 / sqrt(2 * n_layers)``, as in GPT-2), biases are zero; build it inside `seeded`.
    """

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, context: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ConfigError(f"tiny-lm: n_heads ({n_heads}) must divide d_model ({d_model})")
        self.context = context
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, _Block):
                for proj in (module.proj, module.out):
                    nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        if t > self.context:
            raise ValueError(f"input of {t} tokens is longer than the context ({self.context})")
        x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        for block in self.blocks:
            x = block(x)
        # Tied head: the output projection is the token embedding (saves vocab * d_model parameters).
        return F.linear(self.ln_f(x), self.tok.weight)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate factor at local step ``step`` (0-based: the factor of the step about to run).

    Linear warm-up from ``1 / warmup_steps`` to 1 over the first ``warmup_steps`` steps, then a cosine
    decay from 1 down to ``min_ratio`` at ``total_steps``, and ``min_ratio`` after that.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@functools.cache
def _streams(corpus: str, tokenizer: str, val_fraction: float, context: int
             ) -> tuple[torch.Tensor, torch.Tensor, int]:
    tok = get_tokenizer(tokenizer)
    train, val = split_stream(tokenize(load_documents(corpus), tok), val_fraction, context)
    return train, val, tok.vocab_size


class TinyLMTask(Task):
    """Next-token prediction on a text corpus with `TinyGPT` (see the module docstring).

    Args:
        size: ``"small"`` (default: d_model 256, 4 layers, 4 heads, context 128; 3.26 M parameters) or
            ``"tiny"`` (64, 2, 2, 64; 0.12 M). The four options below override the preset one by one.
        d_model, n_layers, n_heads, context: model shape (default: the preset's).
        corpus: ``"shakespeare"`` (default, shipped), a ``.txt`` / ``.jsonl`` path, or ``hf:PATH[:CONFIG]``.
        tokenizer: ``"byte"`` (default, vocabulary 256) or a Hugging Face tokenizer name (``"gpt2"``).
        val_fraction: share of the token stream, taken from its end, held out for validation (0.1).
        eval_windows: validation windows (non-overlapping, from the start of the held-out part) used by
            every evaluation (default 128).
        warmup_steps: local steps of linear learning-rate warm-up (default 100).
        total_steps: local step at which the cosine decay reaches ``min_lr_ratio`` (default 10,000).
        min_lr_ratio: final learning rate as a share of the peak (default 0.1).
        weight_decay: AdamW decoupled weight decay on matrices and embeddings; none on biases and
            LayerNorm gains (default 0.1).

    Raises:
        ConfigError: unknown size, impossible shape, bad schedule, or a corpus that cannot be loaded.
    """

    name = "tiny-lm"
    num_classes = 256
    metric = "perplexity"
    higher_is_better = False
    default_lr = 1e-3
    default_batch_size = 32
    default_local_steps = 50
    eval_batch_size = 64

    def __init__(self, size: str = "small", d_model: int | None = None, n_layers: int | None = None,
                 n_heads: int | None = None, context: int | None = None, corpus: str = "shakespeare",
                 tokenizer: str = "byte", val_fraction: float = 0.1, eval_windows: int = 128,
                 warmup_steps: int = 100, total_steps: int = 10_000, min_lr_ratio: float = 0.1,
                 weight_decay: float = 0.1) -> None:
        if size not in SIZES:
            raise ConfigError(f"tiny-lm: size must be one of {', '.join(SIZES)}, got {size!r}")
        preset = SIZES[size]
        self.size = size
        self.d_model, self.n_layers, self.n_heads, self.context = (
            int(v if v is not None else p) for v, p in zip((d_model, n_layers, n_heads, context), preset, strict=True))
        if min(self.d_model, self.n_layers, self.n_heads, self.context) < 1:
            raise ConfigError("tiny-lm: d_model, n_layers, n_heads and context must be >= 1")
        if self.d_model % self.n_heads:
            raise ConfigError(f"tiny-lm: n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        if not (0 < warmup_steps <= total_steps):
            raise ConfigError(f"tiny-lm: need 0 < warmup_steps <= total_steps, got {warmup_steps}, {total_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ConfigError(f"tiny-lm: min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if eval_windows < 1:
            raise ConfigError(f"tiny-lm: eval_windows must be >= 1, got {eval_windows}")
        if size == "tiny":
            self.default_lr, self.default_local_steps = 3e-3, 20
        self.corpus, self.tokenizer = corpus, tokenizer
        self.val_fraction, self.eval_windows = float(val_fraction), int(eval_windows)
        self.warmup_steps, self.total_steps = int(warmup_steps), int(total_steps)
        self.min_lr_ratio, self.weight_decay = float(min_lr_ratio), float(weight_decay)
        train, val, self.vocab_size = _streams(corpus, tokenizer, self.val_fraction, self.context)
        self.num_classes = self.vocab_size
        self.train_tokens, self.val_tokens = int(train.numel()), int(val.numel())
        self._data = (TokenWindows(train, self.context),
                      TokenWindows(val, self.context, stride=self.context, limit=self.eval_windows))

    def build_model(self, seed: int) -> nn.Module:
        with seeded(seed):
            return TinyGPT(self.vocab_size, self.d_model, self.n_layers, self.n_heads, self.context)

    def datasets(self) -> tuple[Dataset, Dataset]:
        return self._data

    def train_labels(self) -> torch.Tensor:
        raise NotImplementedError("tiny-lm has no labels; its shards come from split()")

    def split(self, num_nodes: int, seed: int, alpha: float | None = None) -> Sequence[torch.Tensor]:
        """Contiguous, disjoint chunks of the training stream (`contiguous_shards`); ``seed`` is unused.

        Raises:
            ConfigError: ``alpha`` is set (a text stream has no classes to skew), or too many nodes.
        """
        del seed
        if alpha is not None:
            raise ConfigError("tiny-lm has no classes: a Dirichlet (alpha) split does not apply; leave alpha unset")
        return contiguous_shards(self.train_tokens, self.context, num_nodes)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross entropy over every token of the batch: logits ``(B, T, V)``, targets ``(B, T)``."""
        return F.cross_entropy(outputs.flatten(0, 1).float(), targets.flatten())

    def metric_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        del outputs, targets
        return None  # perplexity comes from the mean loss

    def metric_from_loss(self, mean_loss: float) -> float:
        """Perplexity ``exp(mean token cross entropy)`` (inf when the loss overflows it)."""
        try:
            return math.exp(mean_loss)
        except OverflowError:
            return math.inf

    def make_optimizer(self, params: Iterable[nn.Parameter], lr: float) -> Optimizers:
        """AdamW (betas 0.9 / 0.95) with `warmup_cosine` as a `LambdaLR`, stepped every local step.

        Weight decay applies to tensors of two or more dimensions (matrices, embeddings) only.
        """
        params = [p for p in params if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": self.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
        warmup, total, floor = self.warmup_steps, self.total_steps, self.min_lr_ratio
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, floor))
        return optimizer, scheduler

    def __repr__(self) -> str:
        return (f"TinyLMTask(size={self.size!r}, d_model={self.d_model}, n_layers={self.n_layers}, "
                f"n_heads={self.n_heads}, context={self.context}, corpus={self.corpus!r}, "
                f"tokenizer={self.tokenizer!r})")
