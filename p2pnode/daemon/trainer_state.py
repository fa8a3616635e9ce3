"""What a checkpoint holds of a trainer: `capture` its resumable state, `restore` it after a check.

`capture` copies the model's ``state_dict``, the optimizer's per-parameter tensors (SGD momentum, AdamW
moments and step), the numeric entries of the learning-rate scheduler's ``state_dict`` and the node's own
outer optimizer state into a `Checkpoint` of detached CPU tensors. `restore` first checks that every
tensor fits this run's model and optimizer (names and shapes; `check_outer` for the outer state) and
raises `CheckpointMismatch` before anything is loaded when one does not; the optimizer's hyperparameters
and the scheduler's base rates stay this run's, so a node may resume with another learning rate.
The file format and the store are `p2pnode.daemon.checkpoint`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch

from p2pnode.daemon.checkpoint import Checkpoint, CheckpointMismatch
from p2pnode.training.trainer import Trainer
from p2pnode.transport import codec


def capture(trainer: Trainer, *, round_: int, config_hash: str, run_id: str, task: str,
            peer_id: str = "", outer: Mapping[str, torch.Tensor] | None = None) -> Checkpoint:
    """A `Checkpoint` of `trainer` now: detached CPU copies, so training may go on while it is written.

    `outer`: the node's own outer optimizer state (`LocalOuterState.outer_state`), if any (default None).
    Call it between rounds (on the thread that trains), never while a training step runs.
    """
    model = {name: t.detach().to("cpu", copy=True) for name, t in trainer.model.state_dict().items()
             if t.dtype in codec.DTYPE_NAMES}
    optimizer: dict[int, dict[str, torch.Tensor]] = {}
    for index, state in trainer.optimizer.state_dict()["state"].items():
        tensors = {key: v.detach().to("cpu", copy=True) for key, v in state.items()
                   if isinstance(v, torch.Tensor) and v.dtype in codec.DTYPE_NAMES}
        if tensors:
            optimizer[int(index)] = tensors
    scheduler = trainer.scheduler
    return Checkpoint(round=round_, config_hash=config_hash, run_id=run_id, task=task, model=model,
                      optimizer=optimizer, scheduler=_scheduler_tensors(scheduler.state_dict()) if scheduler else {},
                      outer={k: v.detach().to("cpu", copy=True) for k, v in (outer or {}).items()},
                      steps_done=trainer.steps_done, peer_id=peer_id, created=time.time())


def _scheduler_tensors(state: dict[str, object]) -> dict[str, torch.Tensor]:
    """The numeric entries of a scheduler ``state_dict`` (ints, floats, lists of them) as tensors.

    Other entries (a `LambdaLR`'s ``lr_lambdas``: None for plain functions) are rebuilt by the task.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            out[key] = torch.tensor(value, dtype=torch.int64)
        elif isinstance(value, float):
            out[key] = torch.tensor(value, dtype=torch.float64)
        elif isinstance(value, list) and value and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                       for v in value):
            out[key] = torch.tensor([float(v) for v in value], dtype=torch.float64)
    return out


def _restore_scheduler(trainer: Trainer, saved: dict[str, torch.Tensor]) -> None:
    """Load the saved scheduler position into the trainer's scheduler and set the current learning rate.

    ``base_lrs`` stay this run's (a node may resume with another learning rate); the learning rate now
    is the saved one scaled by the ratio of the base rates, which is exact for multiplicative schedules
    such as `LambdaLR`.
    """
    scheduler = trainer.scheduler
    if scheduler is None or not saved:
        return  # no scheduler, or written without one: keep the fresh schedule (restore checked the rest)
    state = scheduler.state_dict()
    current_base = list(state.get("base_lrs", []))
    for key, t in saved.items():
        if key not in state or key == "base_lrs":
            continue
        if t.dim() == 0:
            state[key] = int(t.item()) if t.dtype == torch.int64 else float(t.item())
        else:
            state[key] = [float(v) for v in t.tolist()]
    scheduler.load_state_dict(state)
    saved_base, last = saved.get("base_lrs"), saved.get("_last_lr")
    if last is not None and saved_base is not None and len(last) == len(current_base) == len(saved_base):
        lrs = [float(lr) * (base / float(sb) if sb else 1.0)
               for lr, base, sb in zip(last.tolist(), current_base, saved_base.tolist(), strict=True)]
        for group, lr in zip(trainer.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        scheduler._last_lr = list(lrs)  # type: ignore[assignment]  # what get_last_lr() reports


def restore(trainer: Trainer, ckpt: Checkpoint) -> None:
    """Load `ckpt` into `trainer` (model, optimizer state, scheduler position, step count).

    :raises CheckpointMismatch: the checkpoint's tensors do not fit the model (names or shapes differ);
        nothing is loaded then.
    """
    current = trainer.model.state_dict()
    if set(ckpt.model) != {k for k, v in current.items() if v.dtype in codec.DTYPE_NAMES}:
        missing = sorted(set(current) - set(ckpt.model))[:3]
        extra = sorted(set(ckpt.model) - set(current))[:3]
        raise CheckpointMismatch(f"checkpoint of round {ckpt.round} does not fit the model: missing {missing}, "
                                 f"unexpected {extra}")
    for name, t in ckpt.model.items():
        if tuple(t.shape) != tuple(current[name].shape):
            raise CheckpointMismatch(f"checkpoint entry {name!r} has shape {tuple(t.shape)}, the model's is "
                                     f"{tuple(current[name].shape)}")
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    for index, state in ckpt.optimizer.items():
        if not 0 <= index < len(params):
            raise CheckpointMismatch(f"checkpoint has optimizer state for parameter {index}; the model has "
                                     f"{len(params)}")
        for key, t in state.items():
            # Per-element state (SGD momentum, AdamW moments) has the parameter's shape; scalars (AdamW's
            # step count) have none.
            if t.dim() > 0 and tuple(t.shape) != tuple(params[index].shape):
                raise CheckpointMismatch(f"optimizer {key} of parameter {index} has shape {tuple(t.shape)}, "
                                         f"the parameter's is {tuple(params[index].shape)}")
    if trainer.scheduler is None and ckpt.scheduler:
        raise CheckpointMismatch("checkpoint has learning-rate scheduler state; this task has no scheduler")
    check_outer(ckpt, current)
    with torch.no_grad():
        for name, t in ckpt.model.items():
            current[name].copy_(t)
    opt_state = trainer.optimizer.state_dict()
    # The optimizer's hyperparameters (param_groups) come from this run's settings, not the checkpoint:
    # a node may resume with another learning rate.
    opt_state["state"] = {index: dict(state) for index, state in ckpt.optimizer.items()}
    trainer.optimizer.load_state_dict(opt_state)
    _restore_scheduler(trainer, ckpt.scheduler)
    trainer.steps_done = ckpt.steps_done


def check_outer(ckpt: Checkpoint, model: Mapping[str, torch.Tensor]) -> None:
    """Refuse outer optimizer state that does not fit `model` (a ``state_dict``).

    :raises CheckpointMismatch: an entry other than ``steps`` (a non-negative int64 scalar) and
        ``momentum/<floating model entry>`` (finite, floating, that entry's shape).
    """
    for key, t in ckpt.outer.items():
        if key == "steps":
            if t.dtype != torch.int64 or t.numel() != 1 or int(t.reshape(())) < 0:
                raise CheckpointMismatch("outer optimizer 'steps' must be a non-negative int64 scalar")
            continue
        name = key[len("momentum/"):] if key.startswith("momentum/") else None
        if name is None or name not in model or not model[name].is_floating_point():
            raise CheckpointMismatch(f"checkpoint has outer optimizer state {key[:80]!r} for no floating model entry")
        if tuple(t.shape) != tuple(model[name].shape) or not t.is_floating_point():
            raise CheckpointMismatch(f"outer optimizer {key[:80]!r} has shape {tuple(t.shape)} {t.dtype}, the "
                                     f"entry's is {tuple(model[name].shape)}")
        if not bool(torch.isfinite(t).all()):
            raise CheckpointMismatch(f"outer optimizer {key[:80]!r} holds NaN or Inf")


__all__ = ["capture", "check_outer", "restore"]
