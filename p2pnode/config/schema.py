"""The settings schema: a `Setting` attached to every field of `NodeConfig` (and of the daemon's and the
simulator's settings), from which the CLI options, TOML keys, ``P2PNODE_*`` variables, the docs and the
run-wide keys of the config hash are generated."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: Fields never printed: `NodeConfig.as_dict` and ``p2pnode config show`` show them as `MASK`.
SECRET_KEYS = ("run_secret", "admission_key")
MASK = "***"
#: Sections of `NodeConfig`, in the order `p2pnode run --help` and the docs list them.
SECTIONS = ("run", "training", "diloco", "node", "network", "modest", "dpsgd", "secagg", "byzantine", "admission",
            "limits", "daemon")
_KEY = "p2pnode"
_UNSET: Any = object()


@dataclass(frozen=True)
class Setting:
    """What the schema knows of one `NodeConfig` field, besides its type and default.

    The click options of ``run``/``join``/``config``/``sim``/``swarm``, the TOML keys and the ``P2PNODE_*``
    variables are generated from this (`p2pnode.cli.options`), so adding an option means adding one field.

    Args:
        section: one of `SECTIONS`.
        help: the option's help text.
        param: option key, TOML key and environment suffix (default: the field name without a ``_s`` unit
            suffix, so ``min_round_time_s`` is ``min_round_time`` / ``--min-round-time`` /
            ``P2PNODE_MIN_ROUND_TIME``).
        flag: the click declaration when it is not ``--<param with dashes>`` (``--secagg/--no-secagg``).
        hashed: run-wide: hashed into `NodeConfig.config_hash` (for `topologies` only, when given).
        topologies: the topologies that use the field (empty: all).
        choices: allowed values, when they are a fixed set.
        metavar: the value's name in ``--help``.
        secret: never printed (``config show`` and `NodeConfig.as_dict` show `MASK`).
        flag_default: default of the option when it must differ from the field's (documented in `help`).
        hash_when: with `hashed`: the name of a field (often this one) that decides whether this one is hashed:
            only when that field is not at its default, so that the hash of runs made before the field
            existed (or without the feature) stays as it was. Empty (default): hashed whenever `hashed`.
        hash_always: with `hash_when`: topologies for which the field is hashed whatever its value (those
            that hashed it before `hash_when` applied).
    """

    section: str
    help: str
    param: str = ""
    flag: str = ""
    hashed: bool = False
    topologies: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    secret: bool = False
    flag_default: Any = _UNSET
    #: False: no generated option (the field is set through a hand-written one, named in `help`).
    option: bool = True
    hash_when: str = ""
    hash_always: tuple[str, ...] = ()


def setting(*, section: str, help: str, sections: tuple[str, ...] = SECTIONS, **kw: Any) -> Any:
    """A dataclass field of `NodeConfig` with its `Setting` attached (``default``/``default_factory``/``repr``
    go to `dataclasses.field`, the rest to `Setting`). `sections`: the allowed sections (default `SECTIONS`;
    the simulator's own settings, `simulator.settings`, have theirs)."""
    field_kw = {k: kw.pop(k) for k in ("default", "default_factory", "repr") if k in kw}
    meta = Setting(section=section, help=help, **kw)
    if meta.section not in sections:
        raise ValueError(f"section {meta.section!r} is not one of {sections}")
    return field(metadata={_KEY: meta}, **field_kw)


def setting_of(f: dataclasses.Field[Any]) -> Setting:
    """The `Setting` of a `NodeConfig` field, with `Setting.param` filled in."""
    meta: Setting = f.metadata[_KEY]
    if not meta.param:
        param = f.name[:-2] if f.name.endswith("_s") else f.name
        meta = dataclasses.replace(meta, param=param)
    return meta


def schema(cls: Any = None) -> list[tuple[dataclasses.Field[Any], Setting]]:
    """Every field of `cls` (default `NodeConfig`; also `DaemonSettings`) with its `Setting`, in order."""
    if cls is None:
        from p2pnode.config.node_config import NodeConfig  # local: NodeConfig is built from this module

        cls = NodeConfig
    return [(f, setting_of(f)) for f in dataclasses.fields(cls)]


def field_default(f: dataclasses.Field[Any]) -> Any:
    """The default value of field `f` (a fresh one for a ``default_factory``)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default
