"""Click options of ``p2pnode sim``, generated from the simulator's schema (`simulator.settings.sim_schema`):
every `NodeConfig` field but those the simulator sets per node, with the simulator's defaults, plus the
simulator's own sections; and their conversion back into a validated `SimConfig`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from p2pnode.cli.options import config_fields, schema_option
from p2pnode.config import NodeConfig, field_default
from simulator.settings import SECTION_TYPES, SIM_DEFAULTS, SIM_RUN_ID, SimConfig, sim_schema

F = Callable[..., Any]


def sim_options(f: F) -> F:
    """Every option of ``p2pnode sim``, in the order of `sim_schema` (nodes, the node's settings, the
    network model, churn, attackers, recording). The options of `NodeConfig` fields default to the field's
    default (the simulator's where `SIM_DEFAULTS` says so), never to ``run``'s pacing defaults. ``--run-id``
    keeps the daemon's default as its value (that is how the simulator sees it was not given) but shows
    what a run left at it uses, ``sim-<seed>`` (`SimConfig.run_id`)."""
    opts = []
    for section, fl, meta in sim_schema():
        default = SIM_DEFAULTS.get(fl.name, field_default(fl)) if section == "config" else field_default(fl)
        shown = SIM_RUN_ID.format(seed="<seed>") if (section, fl.name) == ("config", "run_id") else None
        opts.append(schema_option(fl, meta, default=default, shown_default=shown))
    for opt in reversed(opts):
        f = opt(f)
    return f


def sim_config_from_options(kw: dict[str, Any], validate: bool = True) -> SimConfig:
    """The `SimConfig` of the options `kw` of ``p2pnode sim`` (keyed by `Setting.param`), validated unless
    `validate` is False.

    Raises:
        ConfigError: a value is invalid (the message names the field).
    """
    node = {**SIM_DEFAULTS, **config_fields(kw, NodeConfig)}
    sections = {name: cls(**config_fields(kw, cls)) for name, cls in SECTION_TYPES.items()}
    own = {fl.name: kw.get(meta.param, field_default(fl)) for section, fl, meta in sim_schema() if section == ""}
    cfg = SimConfig(config=NodeConfig(**node), **sections, **own)
    return cfg.validate() if validate else cfg


def sim_value(cfg: SimConfig, section: str, name: str) -> Any:
    """The value of field `name` of `section` (``""``: `SimConfig` itself) in `cfg`, as the run uses it: the
    run id is `SimConfig.run_id` (``sim-<seed>`` when left at the daemon's default)."""
    if (section, name) == ("config", "run_id"):
        return cfg.run_id
    return getattr(cfg if section == "" else getattr(cfg, section), name)


__all__ = ["sim_config_from_options", "sim_options", "sim_value"]
