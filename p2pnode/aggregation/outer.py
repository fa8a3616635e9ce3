"""DiLoCo-style outer optimizer: SGD with Nesterov momentum on the pseudo-gradient.

Source: Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models" (arXiv
2311.08105, 2023); OpenDiLoCo (arXiv 2407.07852). Spec: ``algorithms.md`` section 6.

After a round, the pseudo-gradient is ``delta = theta_old - theta_agg`` (the start-of-round model minus
the aggregate of the peers' models; equivalently minus the aggregate of their updates). The outer step
follows ``torch.optim.SGD`` semantics with dampening 0:

    buf <- delta                      (first step)
    buf <- momentum * buf + delta     (later steps)
    step = delta + momentum * buf     (nesterov)   or   step = buf   (plain momentum)
    theta_new = theta_old - lr * step

Defaults lr 0.7, momentum 0.9, Nesterov (the paper's). With ``lr=1, momentum=0`` the step is plain
replacement: `step_towards` then returns the aggregate exactly.

In MoDeST the aggregator changes every round, so the momentum buffers travel with the model:
`state_dict` exports them as tensors and `load_state_dict` imports them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import overload

import torch

from p2pnode.aggregation.inputs import FLOAT_DTYPES, work_dtype
from p2pnode.errors import AggregationError

#: Buffer name used when the parameters are one flat tensor rather than a state dict.
FLAT_KEY = "_flat"
_PREFIX = "momentum/"
_STEPS = "steps"

Params = torch.Tensor | Mapping[str, torch.Tensor]


class OuterOptimizer:
    """Outer SGD with (Nesterov) momentum applied to any aggregation rule's output.

    Args:
        lr: outer learning rate (dimensionless; 1 means "move all the way to the aggregate"); default 0.7.
        momentum: momentum coefficient in [0, 1); default 0.9.
        nesterov: Nesterov momentum (default True, as DiLoCo).

    Momentum buffers are kept per parameter name, in float32 for 16-bit parameters, else in the
    parameter's dtype, on the parameter's device.

    Example::

        outer = OuterOptimizer()
        new_state = outer.step_towards(start_state, aggregate_states("mean", received))
    """

    def __init__(self, lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True) -> None:
        if not (isinstance(lr, int | float) and lr > 0 and lr == lr and lr != float("inf")):
            raise AggregationError(f"outer optimizer: lr must be a finite number > 0, got {lr!r}")
        if not (isinstance(momentum, int | float) and 0.0 <= momentum < 1.0):
            raise AggregationError(f"outer optimizer: momentum must be in [0, 1), got {momentum!r}")
        if nesterov and momentum == 0.0:
            nesterov = False  # Nesterov without momentum is plain SGD
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.steps = 0
        self._buffers: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        """Forget the momentum (e.g. when a new run starts)."""
        self._buffers.clear()
        self.steps = 0

    @overload
    def step(self, params: torch.Tensor, pseudo_gradient: torch.Tensor) -> torch.Tensor: ...
    @overload
    def step(
        self, params: Mapping[str, torch.Tensor], pseudo_gradient: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]: ...

    def step(self, params: Params, pseudo_gradient: Params) -> torch.Tensor | dict[str, torch.Tensor]:
        """Return ``theta - lr * step(pseudo_gradient)``; inputs are not modified.

        `params` and `pseudo_gradient` are both tensors or both state dicts with the same float entries.
        Non-floating entries of a state dict are copied from `params`.
        """
        return self._apply(params, pseudo_gradient, towards=False)

    @overload
    def step_towards(self, params: torch.Tensor, aggregate: torch.Tensor) -> torch.Tensor: ...
    @overload
    def step_towards(
        self, params: Mapping[str, torch.Tensor], aggregate: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]: ...

    def step_towards(self, params: Params, aggregate: Params) -> torch.Tensor | dict[str, torch.Tensor]:
        """Outer step with pseudo-gradient ``params - aggregate`` (an aggregated *model*).

        Computed as ``aggregate + (1 - lr) * delta - lr * momentum * buf`` so that ``lr=1, momentum=0``
        returns the aggregate bit for bit. Non-floating entries are copied from `aggregate`.
        """
        return self._apply(params, aggregate, towards=True)

    @torch.no_grad()
    def _apply(self, params: Params, other: Params, *, towards: bool) -> torch.Tensor | dict[str, torch.Tensor]:
        if isinstance(params, torch.Tensor):
            if not isinstance(other, torch.Tensor):
                raise AggregationError("outer optimizer: params is a tensor, so the second argument must be one too")
            self._check_names([FLAT_KEY])
            out = self._one(FLAT_KEY, params, other, towards)
            self.steps += 1
            return out
        if not isinstance(other, Mapping):
            raise AggregationError("outer optimizer: params is a state dict, so the second argument must be one too")
        missing = [k for k in params if k not in other]
        if missing:
            raise AggregationError(f"outer optimizer: second argument lacks entries {missing[:5]}")
        float_keys = [k for k, v in params.items() if v.dtype in FLOAT_DTYPES]
        self._check_names(float_keys)
        result: dict[str, torch.Tensor] = {}
        for k, v in params.items():
            if k in float_keys:
                result[k] = self._one(k, v, other[k], towards)
            else:
                result[k] = (other[k] if towards else v).clone()
        self.steps += 1
        return result

    def _check_names(self, names: list[str]) -> None:
        if self._buffers and set(self._buffers) != set(names):
            raise AggregationError(
                "outer optimizer: the parameters do not match the momentum buffers "
                f"(buffers for {sorted(self._buffers)[:5]}..., got {sorted(names)[:5]}...); call reset()"
            )

    def _one(self, name: str, theta: torch.Tensor, other: torch.Tensor, towards: bool) -> torch.Tensor:
        if theta.shape != other.shape:
            raise AggregationError(
                f"outer optimizer: entry {name!r} has shape {tuple(other.shape)}, expected {tuple(theta.shape)}"
            )
        if theta.dtype not in FLOAT_DTYPES:
            raise AggregationError(f"outer optimizer: entry {name!r} has non-float dtype {theta.dtype}")
        wdt = work_dtype(theta.dtype)
        th = theta.to(wdt)
        o = other.to(device=theta.device, dtype=wdt)
        delta = th - o if towards else o.clone()
        if not bool(torch.isfinite(delta).all()):
            raise AggregationError(f"outer optimizer: entry {name!r} gives a pseudo-gradient with NaN or Inf")
        mu = self.momentum
        extra: torch.Tensor | None = None
        if mu > 0.0:
            buf = self._buffers.get(name)
            if buf is None:
                buf = delta.clone()
            else:
                buf = buf.to(device=theta.device, dtype=wdt)
                prev = buf.clone() if not self.nesterov else None
                buf.mul_(mu).add_(delta)
                if prev is not None:
                    extra = prev.mul_(mu)
            if self.nesterov:
                extra = buf * mu
            self._buffers[name] = buf
        if towards:
            # aggregate + (1 - lr) * delta - lr * extra; for plain momentum buf = mu*prev + delta
            new = o.add(delta, alpha=1.0 - self.lr)
        else:
            new = th.sub(delta, alpha=self.lr)
        if extra is not None:
            new.sub_(extra, alpha=self.lr)
        return new.to(theta.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The optimizer's state as tensors: ``"steps"`` (int64 scalar) and ``"momentum/<name>"`` buffers."""
        state = {_STEPS: torch.tensor(self.steps, dtype=torch.int64)}
        for name, buf in self._buffers.items():
            state[_PREFIX + name] = buf.clone()
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a `state_dict` (e.g. one received with the model); buffers move to the right device on use."""
        if not isinstance(state, Mapping):
            raise AggregationError(f"outer optimizer: state must be a mapping, got {type(state).__name__}")
        buffers: dict[str, torch.Tensor] = {}
        steps = 0
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise AggregationError(f"outer optimizer: state entry {key!r} is not a tensor")
            if key == _STEPS:
                steps = int(value.item())
            elif key.startswith(_PREFIX):
                if value.dtype not in FLOAT_DTYPES or not bool(torch.isfinite(value).all()):
                    raise AggregationError(f"outer optimizer: buffer {key!r} must be finite floating point")
                buffers[key[len(_PREFIX) :]] = value.detach().clone()
            else:
                raise AggregationError(
                    f"outer optimizer: unexpected state entry {key!r}; allowed: {_STEPS!r}, {_PREFIX!r}<name>"
                )
        self._buffers = buffers
        self.steps = steps


def outer_optimizer(lr: float | None, momentum: float = 0.9, nesterov: bool = True) -> OuterOptimizer | None:
    """The outer optimizer of a run's settings, or None when `lr` is None (no outer step: the plain merge)."""
    return None if lr is None else OuterOptimizer(lr=lr, momentum=momentum, nesterov=nesterov)


def load_outer_state(opt: OuterOptimizer | None, state: Mapping[str, torch.Tensor]) -> None:
    """Load `state` (a `state_dict`; empty: no momentum yet) into `opt`; with no optimizer, `state` must be empty.

    :raises AggregationError: `state` is not a valid state, or there is state but no optimizer to take it.
    """
    if opt is None:
        if state:
            raise AggregationError("outer optimizer state given, but this run has no outer optimizer")
        return
    if state:
        opt.load_state_dict(state)
    else:
        opt.reset()


#: What the outer step does in the rounds of a synchronisation warm-up (`warmup_outer_step`, the run-wide
#: ``sync_warmup_outer``): ``outer`` the run's outer step after every round, momentum carried over the switch
#: (the default); ``reset`` the same, the momentum forgotten at the first round after the warm-up; ``sgd``
#: the outer step with momentum 0 in warm-up rounds (the buffers start after it); ``plain`` the plain merge
#: in warm-up rounds (what plain averaging at ``H0`` does), the outer step only after it.
WARMUP_OUTER = ("outer", "reset", "sgd", "plain")


def warmup_outer_step(opt: OuterOptimizer, start: Mapping[str, torch.Tensor], merged: Mapping[str, torch.Tensor],
                      *, policy: str, warmup_round: bool, first_after: bool) -> dict[str, torch.Tensor]:
    """The model after a round's merge with the outer optimizer `opt`, following the warm-up `policy`.

    :param start: the round's start model (the pseudo-gradient's base).
    :param merged: the rule's merge of the round's trained models.
    :param policy: one of `WARMUP_OUTER`.
    :param warmup_round: the round is one of the warm-up's short rounds.
    :param first_after: the round is the first after the warm-up (``reset`` forgets the momentum before it).
    :raises AggregationError: an unknown `policy`, or the outer step's own errors.
    """
    if policy not in WARMUP_OUTER:
        raise AggregationError(f"sync_warmup_outer must be one of {', '.join(WARMUP_OUTER)}, got {policy!r}")
    if warmup_round and policy == "plain":
        return {k: v.clone() for k, v in merged.items()}
    if warmup_round and policy == "sgd":
        # A momentum-free step of its own: `opt`'s buffers and step count stay as they are.
        return OuterOptimizer(lr=opt.lr, momentum=0.0).step_towards(start, merged)
    if first_after and policy == "reset":
        opt.reset()
    return opt.step_towards(start, merged)
