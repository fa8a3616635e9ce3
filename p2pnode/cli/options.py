"""Click options shared by `run`, `join`, `config`, `swarm` and `sim`, generated from the `NodeConfig` schema
(`p2pnode.config.Setting`), and their conversion back into a `NodeConfig`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click

from p2pnode.cli.layered import split_items
from p2pnode.config import _UNSET, NodeConfig, Setting, field_default, schema
from p2pnode.errors import ConfigError

F = Callable[..., Any]


def parse_shard(value: str) -> tuple[int, int]:
    """``"2/8"`` -> (2, 8)."""
    try:
        index, count = (int(x) for x in value.split("/"))
    except ValueError as e:
        raise ConfigError(f"shard={value!r}: expected INDEX/COUNT, for example 0/4") from e
    return index, count


def parse_params(items: tuple[str, ...]) -> dict[str, Any]:
    """``("trim=1", "tau=0.5")`` -> {"trim": 1, "tau": 0.5} (values parsed as JSON when they can be)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"parameter {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


#: `NodeConfig` fields of `training_options` (the run-wide training setup that `sim` and `swarm` share with
#: `run`); `swarm.FORWARDED` passes them on to each daemon.
TRAINING_FIELDS = ("task", "task_options", "topology", "rule", "rule_params", "seed", "alpha", "local_steps",
                   "sync_warmup_steps", "sync_warmup_local_steps", "sync_warmup_outer", "lr", "batch_size",
                   "model_seed_mode",
                   "sample_size", "aggregators", "success_fraction", "aggregation_timeout_s", "sample_key", "fl_server",
                   "outer_lr", "outer_momentum", "outer_nesterov", "compression", "secagg", "secagg_neighbours",
                   "secagg_threshold", "secagg_clip", "secagg_groups", "secagg_min_group", "dpsgd_graph",
                   "dpsgd_degree")
_TYPES: dict[str, Any] = {"int": int, "float": float, "str": str}


def schema_option(f: dataclasses.Field[Any], meta: Setting, default: Any = _UNSET,
                  shown_default: str | None = None) -> Callable[[F], F]:
    """The click option of one `NodeConfig` field, generated from its type, default and `Setting`; `default`
    replaces the option's default (``p2pnode sim`` gives the simulator's, `simulator.settings.SIM_DEFAULTS`),
    and `shown_default`, when given, is what ``--help`` says the default is (``sim-<seed>``: a default that
    depends on another option)."""
    typ = str(f.type).replace(" | None", "")
    if default is _UNSET:
        default = field_default(f) if meta.flag_default is _UNSET else meta.flag_default
    decl = meta.flag or "--" + meta.param.replace("_", "-")
    kw: dict[str, Any] = {"help": meta.help, "metavar": meta.metavar}
    if typ == "bool":
        if "/" not in decl:
            return click.option(decl, meta.param, is_flag=True, default=bool(default), help=meta.help)
        return click.option(decl, meta.param, default=default, show_default=True, help=meta.help)
    if typ.startswith(("list[", "dict[")):
        return click.option(decl, meta.param, multiple=True, **kw)
    if typ.startswith("tuple["):  # shard: INDEX/COUNT
        return click.option(decl, meta.param, default="/".join(str(v) for v in default), show_default=True, **kw)
    if meta.choices:
        kw["type"] = click.Choice(list(meta.choices))
        kw.pop("metavar")
    elif typ in _TYPES:
        kw["type"] = _TYPES[typ]
    show: bool | str = shown_default if shown_default is not None else default is not None
    return click.option(decl, meta.param, default=default, show_default=show, **kw)


def schema_options(names: Iterable[str], cls: Any = None) -> Callable[[F], F]:
    """A decorator adding the generated options of the fields `names` of `cls` (default `NodeConfig`)."""
    fields = {f.name: (f, meta) for f, meta in schema(cls)}
    opts = [schema_option(*fields[name]) for name in names]

    def decorate(f: F) -> F:
        for opt in reversed(opts):
            f = opt(f)
        return f

    return decorate


def training_options(f: F) -> F:
    """Options of the run-wide training setup (task, rule, seed, data split, local steps, topologies, secagg)."""
    return schema_options(TRAINING_FIELDS)(f)


def byzantine_options(f: F) -> F:
    """Options of attacking nodes (for tests of a swarm's defences) and of the defences themselves."""
    # Names are checked by NodeConfig.validate: importing the attack registry here would load torch for
    # every command, the light control clients included.
    return schema_options(f.name for f, meta in schema() if meta.section == "byzantine")(f)


def node_options(f: F) -> F:
    """Options of one real node: every `NodeConfig` field not in `training_options` or `byzantine_options`,
    plus the state dir and logging."""
    names = [fl.name for fl, meta in schema() if fl.name not in TRAINING_FIELDS and meta.section != "byzantine"
             and meta.option]
    opts = [
        click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), envvar="P2PNODE_STATE_DIR",
                     default=Path("~/.p2pnode").expanduser(), show_default="~/.p2pnode",
                     help="Where the node keeps its control address and token (env P2PNODE_STATE_DIR)."),
        click.option("--json-logs", is_flag=True, help="Log JSON lines (one per event) instead of text."),
        click.option("--log-level", default="INFO", show_default=True,
                     type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return schema_options(names)(f)


def _value(f: dataclasses.Field[Any], raw: Any) -> Any:
    """Option value `raw` as the value of field `f`."""
    typ = str(f.type)
    if typ.startswith("dict["):
        return parse_params(tuple(raw or ()))
    if typ.startswith("list["):
        items: list[str] = []
        for item in raw or ():
            items.extend(split_items(str(item)) if f.name == "allow_peers" else [str(item)])
        return items
    if typ.startswith("tuple["):
        return parse_shard(str(raw))
    if typ == "bool":
        return bool(raw)
    if typ.endswith("| None") and raw == "":
        return None
    return raw


def config_fields(kw: dict[str, Any], cls: Any = None) -> dict[str, Any]:
    """The fields of `cls` (default `NodeConfig`) given in option values `kw` (keyed by `Setting.param`;
    absent or None options of fields whose default is not None keep the field's default)."""
    out: dict[str, Any] = {}
    for f, meta in schema(cls):
        if not meta.option or meta.param not in kw:
            continue
        raw = kw[meta.param]
        if raw is None and field_default(f) is not None:
            continue  # an option without a default of its own (aggregation_timeout): the field's default
        out[f.name] = _value(f, raw)
    return out


def config_from_options(kw: dict[str, Any]) -> NodeConfig:
    """Build and validate a `NodeConfig` from the options of `run`/`join`/`config`."""
    return NodeConfig(**config_fields(kw)).validate()


def byzantine_settings(kw: dict[str, Any]) -> dict[str, Any]:
    """The `NodeConfig` fields of `byzantine_options`."""
    names = {f.name for f, meta in schema() if meta.section == "byzantine"}
    return {k: v for k, v in config_fields(kw).items() if k in names}


def admission_settings(kw: dict[str, Any]) -> dict[str, Any]:
    """The `NodeConfig` fields of the admission options (absent options keep their defaults)."""
    names = {f.name for f, meta in schema() if meta.section == "admission"}
    return {k: v for k, v in config_fields(kw).items() if k in names}


def topology_settings(kw: dict[str, Any]) -> dict[str, Any]:
    """The `NodeConfig` fields of the modest, fl, dpsgd and secagg options (absent options keep their defaults)."""
    names = {f.name for f, meta in schema() if meta.section in ("modest", "dpsgd", "secagg")}
    return {k: v for k, v in config_fields(kw).items() if k in names}
