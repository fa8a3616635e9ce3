"""The attack registry and `forge`, the entry point the simulator and the tests call."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from p2pnode.attacks import model as _model
from p2pnode.errors import AggregationError

AttackFn = Callable[..., list[torch.Tensor]]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttackInfo:
    """An attack: its summary, source, kind (``"model"``: forged updates; ``"data"``: applied in training)
    and keyword parameters with defaults."""

    name: str
    summary: str
    source: str
    kind: str
    params: Mapping[str, Any]
    fn: AttackFn | None


_ATTACKS: dict[str, AttackInfo] = {}


def _register(name: str, fn: AttackFn | None, *, summary: str, source: str, kind: str = "model") -> None:
    if name in _ATTACKS:
        raise ValueError(f"attack {name!r} is already registered")
    params: dict[str, Any] = {}
    if fn is not None:
        params = {
            n: prm.default
            for n, prm in inspect.signature(fn).parameters.items()
            if prm.kind is inspect.Parameter.KEYWORD_ONLY
        }
    _ATTACKS[name] = AttackInfo(name, summary, source, kind, params, fn)


_register(
    "sign_flip",
    _model.sign_flip,
    summary="-scale * mean(honest)",
    source="bit flipping, Karimireddy et al. ICLR 2022; 'reverse' (-10 g) in the FA code",
)
_register(
    "gaussian",
    _model.gaussian,
    summary="i.i.d. N(mean, std^2) entries",
    source="Xie, Koyejo, Gupta 2018 (Generalized Byzantine-tolerant SGD)",
)
_register(
    "scaled",
    _model.scaled,
    summary="factor * mean(honest), factor 100",
    source="boosting, Bhagoji et al. ICML 2019; model replacement, Bagdasaryan et al. AISTATS 2020",
)
_register(
    "alie",
    _model.alie,
    summary="mean - z * std per coordinate",
    source="Baruch, Baruch, Goldberg, NeurIPS 2019 (A Little Is Enough)",
)
_register(
    "ipm",
    _model.ipm,
    summary="-epsilon * mean(honest), epsilon 0.1",
    source="Xie, Koyejo, Gupta, UAI 2019 (Fall of Empires)",
)
_register(
    "random",
    _model.random_uniform,
    summary="i.i.d. U[low, high) entries",
    source="the FA reference code's 'random' attack (Almasi et al. ICLR 2024)",
)
_register(
    "label_flip",
    None,
    summary="labels y -> num_classes - 1 - y in the attacker's training data",
    source="Karimireddy et al. ICLR 2022; Tolpegin et al. ESORICS 2020",
    kind="data",
)


def available_attacks() -> list[str]:
    """Names of all registered attacks (model and data attacks), sorted."""
    return sorted(_ATTACKS)


def attack_info(attack: str) -> AttackInfo:
    """The `AttackInfo` of an attack; raises `AggregationError` for an unknown name."""
    info = _ATTACKS.get(attack) if isinstance(attack, str) else None
    if info is None:
        raise AggregationError(f"unknown attack {attack!r}; available: {', '.join(available_attacks())}")
    return info


@torch.no_grad()
def forge(
    attack: str, honest: Sequence[torch.Tensor], n_byzantine: int, seed: int = 0, **params: Any
) -> list[torch.Tensor]:
    """The updates that `n_byzantine` colluding attackers send this round.

    Args:
        attack: a model attack from `available_attacks()` (``label_flip`` is a data attack: see
            `p2pnode.attacks.flip_labels`).
        honest: the honest peers' 1-D updates (equal length, one float dtype and device, finite).
        n_byzantine: number of attackers (>= 0).
        seed: seed of the random attacks (``gaussian``, ``random``); results do not depend on the device.
        **params: the attack's parameters (see ``attack_info(attack).params``).

    Returns:
        `n_byzantine` new tensors shaped, typed and placed like the honest updates.
    """
    info = attack_info(attack)
    if info.fn is None:
        raise AggregationError(
            f"{attack!r} is a data attack: it changes the attacker's training labels, not the update it "
            "sends; apply p2pnode.attacks.flip_labels(labels, num_classes) in the attacker's training loop"
        )
    if isinstance(n_byzantine, bool) or not isinstance(n_byzantine, int) or n_byzantine < 0:
        raise AggregationError(f"{attack}: n_byzantine must be an integer >= 0, got {n_byzantine!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise AggregationError(f"{attack}: seed must be an integer, got {seed!r}")
    unknown = sorted(set(params) - set(info.params))
    if unknown:
        raise AggregationError(f"{attack}: unknown parameter(s) {unknown}; allowed: {', '.join(info.params) or 'none'}")
    for k, v in params.items():
        if v is not None and (
            isinstance(v, bool) or not isinstance(v, int | float) or v != v or abs(v) == float("inf")
        ):
            raise AggregationError(f"{attack}: parameter {k} must be a finite number, got {v!r}")
    _check_honest(attack, honest)
    if n_byzantine == 0:
        return []
    return info.fn(list(honest), n_byzantine, seed, **params)


def _check_honest(attack: str, honest: Sequence[torch.Tensor]) -> None:
    if isinstance(honest, torch.Tensor) or not isinstance(honest, Sequence) or len(honest) == 0:
        raise AggregationError(f"{attack}: honest must be a non-empty list of 1-D tensors")
    ref = honest[0]
    for i, h in enumerate(honest):
        if not isinstance(h, torch.Tensor) or h.dim() != 1:
            raise AggregationError(f"{attack}: honest update {i} must be a 1-D tensor")
        if h.dtype not in _FLOAT:
            raise AggregationError(f"{attack}: honest update {i} has dtype {h.dtype}; float dtypes only")
        if h.shape != ref.shape or h.dtype != ref.dtype or h.device != ref.device:
            raise AggregationError(
                f"{attack}: honest update {i} is {tuple(h.shape)} {h.dtype} on {h.device}, but update 0 is "
                f"{tuple(ref.shape)} {ref.dtype} on {ref.device}; all must match"
            )
        if not bool(torch.isfinite(h).all()):
            raise AggregationError(f"{attack}: honest update {i} contains NaN or Inf")
