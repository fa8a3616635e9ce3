"""Layered configuration of `run`, `join` and `config`: defaults < TOML file < ``P2PNODE_*`` environment < flags.

Every option of a `LayeredCommand` is configurable from four sources, and the later one wins:

1. the option's default (``p2pnode run --help`` shows it);
2. a TOML file: ``--config PATH``, else ``$P2PNODE_CONFIG``, else ``<state dir>/config.toml`` when that
   file exists (the state dir from ``--state-dir``, ``$P2PNODE_STATE_DIR`` or ``~/.p2pnode``);
3. the environment: ``P2PNODE_<NAME>`` where NAME is the option's key or its flag in upper snake case
   (``--port``: ``P2PNODE_PORT``; ``--initial-peer``: ``P2PNODE_INITIAL_PEERS`` or ``P2PNODE_INITIAL_PEER``);
4. the command line.

Nothing here is specific to one option: the layering is applied to whatever options a command declares
when it is built, so an option added later is configurable from the file and the environment at once.

Layers 1, 3 and 4 are click's own (an option's ``envvar`` and `click.ParameterSource`); the file is
fed to click as the context's ``default_map``, which click ranks between the environment and the
option's default. The file is read before click parses the command line for real, because the file
must be known before any option is resolved.

TOML format (see ``docs/config.example.toml``): keys are option keys in snake case (``min_round_time``)
or flag names (``min-round-time``). Tables only group keys for the reader and are flattened, with one
exception: a table whose name is an option key (``[rule_params]``) is that option's value. A repeatable
option takes an array (or a string of items separated by commas or whitespace); a ``KEY=VALUE`` option
such as ``rule_params`` also takes a table.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from p2pnode.errors import ConfigError

#: Prefix of every environment variable of an option.
ENV_PREFIX = "P2PNODE_"
#: Environment variable naming the config file (same as ``--config``).
CONFIG_ENV = "P2PNODE_CONFIG"
#: Name of the config file looked up in the state dir when neither ``--config`` nor `CONFIG_ENV` is set.
DEFAULT_CONFIG_NAME = "config.toml"
#: Key of the ``--config`` option in the command's parameters.
CONFIG_PARAM = "config_file"
#: ``P2PNODE_*`` variables that belong to no option and are not errors: the config file itself, and the
#: prefixes of variables read by helper scripts (the Docker swarm script, CI) that share the environment.
RESERVED_ENV = frozenset({CONFIG_ENV})
RESERVED_ENV_PREFIXES = ("P2PNODE_SWARM_", "P2PNODE_CI_")
#: Separators of the items of a repeatable option given as one string (environment or file).
_LIST_SPLIT = re.compile(r"[\s,]+")
#: Where `LayeredCommand` keeps what it learned about the file in ``ctx.meta``.
_META = "p2pnode.layered"


def env_names(param: click.Option) -> list[str]:
    """The ``P2PNODE_*`` variables of `param`: from its key first, then from each of its long flags."""
    return [ENV_PREFIX + key.upper() for key in option_keys(param)]


def option_keys(param: click.Option) -> list[str]:
    """The keys that name `param` in a file: its parameter name, then each long flag in snake case."""
    keys = [param.name] if param.name else []
    for opt in param.opts:
        if opt.startswith("--"):
            key = opt[2:].replace("-", "_")
            if key not in keys:
                keys.append(key)
    return keys


def split_items(text: str) -> list[str]:
    """Items of a list given as one string, separated by commas and/or whitespace (empty items dropped)."""
    return [item for item in _LIST_SPLIT.split(text) if item]


@dataclass
class FileLayer:
    """What the config file contributed: its path, why it was read, its values and their line numbers."""

    #: The file read, or None when there is none.
    path: Path | None = None
    #: How it was found: ``flag --config``, ``env P2PNODE_CONFIG`` or ``default (in the state dir)``.
    found_by: str = ""
    #: Option name -> value, as handed to click.
    values: dict[str, Any] = field(default_factory=dict)
    #: Option name -> 1-based line of the key in the file (absent when it could not be located).
    lines: dict[str, int] = field(default_factory=dict)

    def where(self, name: str) -> str:
        """``PATH:LINE`` of option `name` (or ``PATH`` when the line is unknown)."""
        line = self.lines.get(name)
        return f"{self.path}:{line}" if line else str(self.path)


class LayeredCommand(click.Command):
    """A click command whose options also read a TOML file and ``P2PNODE_*`` environment variables.

    :param unlayered: names of parameters that stay command-line only (for example ``--json`` of
        ``config show``): no environment variable, not allowed in the file, not part of the config.
    """

    def __init__(self, *args: Any, unlayered: Iterable[str] = (),
                 also_accept_env_of: Callable[[], Iterable[click.Command]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Commands whose ``P2PNODE_*`` variables are accepted (and ignored) too: `sim` shares the environment
        #: of `run`, whose variables (``P2PNODE_PORT`` ...) are then not typos.
        self.also_accept_env_of = also_accept_env_of
        self.unlayered = frozenset(unlayered) | {CONFIG_PARAM}
        self.params.insert(0, click.Option(
            ["--config", CONFIG_PARAM], type=click.Path(dir_okay=False, path_type=Path), envvar=CONFIG_ENV,
            show_envvar=True, default=None,
            help=f"TOML file of option values [default: <state dir>/{DEFAULT_CONFIG_NAME} if it exists]. "
                 "Precedence: defaults < file < P2PNODE_* environment < flags."))
        claimed: set[str] = set()
        for param in self.layered_params():
            current = param.envvar
            names = [current] if isinstance(current, str) else list(current or [])
            for name in env_names(param):
                # Two options never share a variable: the first declared keeps it.
                if name not in names and name not in claimed:
                    names.append(name)
            claimed.update(names)
            param.envvar = names
            param.show_envvar = True

    # ------------------------------------------------------------------------------ parameters
    def layered_params(self) -> list[click.Option]:
        """The options that take part in the layering (all but ``--config``, ``--help`` and `unlayered`)."""
        return [p for p in self.params if isinstance(p, click.Option) and p.name
                and p.name not in self.unlayered]

    def _key_index(self) -> dict[str, click.Option]:
        index: dict[str, click.Option] = {}
        for param in self.layered_params():
            for key in option_keys(param):
                index.setdefault(key, param)
        return index

    # ------------------------------------------------------------------------------ parsing
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        layer = FileLayer()
        ctx.meta[_META] = layer
        if not ctx.resilient_parsing and not any(a in ctx.help_option_names for a in args):
            try:
                opts, _, _ = self.make_parser(ctx).parse_args(list(args))
            except click.UsageError:
                opts = None  # the real parse below reports it
            if opts is not None:
                self._check_environment(ctx)
                self._load_file(ctx, opts, layer)
                if layer.values:
                    ctx.default_map = {**(ctx.default_map or {}), **layer.values}
        try:
            rest = super().parse_args(ctx, args)
        except click.BadParameter as e:
            raise self._explain_bad_value(ctx, e) from e
        self._split_env_lists(ctx)
        if layer.path is not None and ctx.get_parameter_source(CONFIG_PARAM) == ParameterSource.DEFAULT:
            ctx.params[CONFIG_PARAM] = layer.path
        return rest

    def _check_environment(self, ctx: click.Context) -> None:
        """Refuse ``P2PNODE_*`` variables that match no option: a typo would otherwise be ignored silently."""
        known: set[str] = set(RESERVED_ENV)
        others = list(self.also_accept_env_of()) if self.also_accept_env_of is not None else []
        for param in [*self.params, *(p for c in others for p in c.params)]:
            if isinstance(param, click.Option) and param.envvar:
                known.update([param.envvar] if isinstance(param.envvar, str) else param.envvar)
        unknown = sorted(name for name in os.environ
                         if name.startswith(ENV_PREFIX) and name not in known
                         and not name.startswith(RESERVED_ENV_PREFIXES))
        if unknown:
            raise click.UsageError(_join(
                f"environment variable {name} matches no option of `{ctx.command_path}`{_suggest(name, known)}"
                for name in unknown), ctx)

    def _config_path(self, ctx: click.Context, opts: Mapping[str, Any]) -> tuple[Path | None, str]:
        """The config file to read and how it was named (flag, environment, or the state dir's default)."""
        if opts.get(CONFIG_PARAM):
            return Path(opts[CONFIG_PARAM]).expanduser(), "flag --config"
        if os.environ.get(CONFIG_ENV):
            return Path(os.environ[CONFIG_ENV]).expanduser(), f"env {CONFIG_ENV}"
        state_dir = opts.get("state_dir")
        if not state_dir:
            param = next((p for p in self.params if p.name == "state_dir"), None)
            if param is None:
                return None, ""
            state_dir = param.resolve_envvar_value(ctx) or param.get_default(ctx, call=True)
            if not state_dir:
                return None, ""
        candidate = Path(str(state_dir)).expanduser() / DEFAULT_CONFIG_NAME
        # Only an existing file counts: most nodes have none.
        return (candidate, "default (in the state dir)") if candidate.is_file() else (None, "")

    def _load_file(self, ctx: click.Context, opts: Mapping[str, Any], layer: FileLayer) -> None:
        path, found_by = self._config_path(ctx, opts)
        if path is None:
            return
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise click.UsageError(f"config file {path} ({found_by}) cannot be read: {e.strerror or e}",
                                   ctx) from e
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise click.UsageError(f"config file {path} is not valid TOML: {e}", ctx) from e
        layer.path, layer.found_by = path, found_by
        index = self._key_index()
        lines = text.splitlines()
        errors: list[str] = []
        for raw_key, value, section in _flatten(data, index):
            line = _line_of(lines, raw_key, section)
            where = f"{path}:{line}" if line else str(path)
            param = index.get(raw_key.replace("-", "_"))
            if param is None:
                shown = f"{section}.{raw_key}" if section else raw_key
                errors.append(f"unknown key {shown!r} in {where}{_suggest(raw_key.replace('-', '_'), index)}")
                continue
            assert param.name is not None
            if param.name in layer.values:
                errors.append(f"{where}: {raw_key!r} sets {param.name}, which the file already sets")
                continue
            try:
                layer.values[param.name] = _file_value(param, value)
            except ConfigError as e:
                errors.append(f"invalid value for {param.name} in {where}: {e}")
                continue
            if line:
                layer.lines[param.name] = line
        if errors:
            raise click.UsageError(_join(errors), ctx)

    def _split_env_lists(self, ctx: click.Context) -> None:
        """Split the items of repeatable options read from the environment on commas too (click splits on
        whitespace only), so that ``P2PNODE_INITIAL_PEERS=/ip4/a,/ip4/b`` gives two peers."""
        for param in self.layered_params():
            assert param.name is not None
            value = ctx.params.get(param.name)
            if (param.multiple and isinstance(value, tuple)
                    and ctx.get_parameter_source(param.name) == ParameterSource.ENVIRONMENT
                    and all(isinstance(v, str) for v in value)):
                ctx.params[param.name] = tuple(item for v in value for item in split_items(v))

    def _explain_bad_value(self, ctx: click.Context, e: click.BadParameter) -> click.UsageError:
        """Name the source of a value that click refused: the file and line, or the environment variable."""
        param = e.param
        if param is None or param.name is None:
            return e
        source = ctx.get_parameter_source(param.name)
        if source == ParameterSource.ENVIRONMENT and isinstance(param, click.Option):
            var = env_var_used(param)
            return click.UsageError(f"invalid value for {param.name} from env {var}={os.environ.get(var or '', '')!r}: "
                                    f"{e.message}", ctx)
        if source == ParameterSource.DEFAULT_MAP:
            layer = file_layer(ctx)
            return click.UsageError(f"invalid value for {param.name} in {layer.where(param.name)}: {e.message}",
                                    ctx)
        return e


# ---------------------------------------------------------------------------------- sources

def file_layer(ctx: click.Context) -> FileLayer:
    """What the config file contributed to `ctx` (an empty layer when none was read)."""
    layer = ctx.meta.get(_META)
    return layer if isinstance(layer, FileLayer) else FileLayer()


def env_var_used(param: click.Option) -> str | None:
    """The first of `param`'s environment variables that is set and not empty (the one click read)."""
    names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or [])
    return next((name for name in names if os.environ.get(name)), None)


@dataclass(frozen=True)
class Source:
    """Where an option's value came from: ``kind`` is default, file, env or flag; ``origin`` names it
    (``PATH:LINE``, ``P2PNODE_PORT``, ``--port``) and is None for a default."""

    kind: str
    origin: str | None = None

    def __str__(self) -> str:
        return self.kind if self.origin is None else f"{self.kind} {self.origin}"


def source_of(ctx: click.Context, name: str) -> Source:
    """Where option `name` of `ctx`'s command got its value."""
    source = ctx.get_parameter_source(name)
    param = next((p for p in ctx.command.params if p.name == name), None)
    if source == ParameterSource.COMMANDLINE:
        flag = param.opts[0] if isinstance(param, click.Option) and param.opts else name
        return Source("flag", flag)
    if source == ParameterSource.ENVIRONMENT and isinstance(param, click.Option):
        return Source("env", env_var_used(param))
    if source == ParameterSource.DEFAULT_MAP:
        return Source("file", file_layer(ctx).where(name))
    if name == CONFIG_PARAM and file_layer(ctx).path is not None:
        return Source("default", "<state dir>/" + DEFAULT_CONFIG_NAME)
    return Source("default")


#: `ConfigError` keys (field names of NodeConfig and DaemonSettings) that differ from the option's key.
_FIELD_ALIASES = {"model_seed_mode": "init", "max_gpu_memory_gib": "max_gpu_memory",
                  "max_gpu_memory_fraction": "max_gpu_memory"}


def option_for_field(ctx: click.Context, key: str) -> str | None:
    """The option of `ctx`'s command that sets config field `key` (``min_round_time_s`` -> ``min_round_time``)."""
    names = {p.name for p in ctx.command.params if isinstance(p, click.Option)}
    for candidate in (key, _FIELD_ALIASES.get(key, ""), key.removesuffix("_s")):
        if candidate in names:
            return candidate
    return None


def explain_config_error(ctx: click.Context, error: ConfigError) -> click.UsageError:
    """`error` (from NodeConfig or DaemonSettings validation) with the source of each key it names."""
    message = str(error)
    notes: list[str] = []
    for key in dict.fromkeys(re.findall(r"\b([a-z][a-z0-9_]*)=", message)):
        option = option_for_field(ctx, key)
        if option is not None:
            notes.append(f"{option} from {source_of(ctx, option)}")
    return click.UsageError(message + (f" [{'; '.join(notes)}]" if notes else ""), ctx)


# ---------------------------------------------------------------------------------- file helpers

def _flatten(data: Mapping[str, Any], index: Mapping[str, click.Option]) -> list[tuple[str, Any, str]]:
    """``(key, value, section)`` of each entry: top-level keys, and the keys of tables one level down.

    A table whose name is an option key is that option's value (``[rule_params]``), not a group.
    """
    out: list[tuple[str, Any, str]] = []
    for key, value in data.items():
        if isinstance(value, dict) and key.replace("-", "_") not in index:
            out.extend((inner, v, key) for inner, v in value.items())
        else:
            out.append((key, value, ""))
    return out


def _line_of(lines: Sequence[str], key: str, section: str) -> int | None:
    """1-based line where `key` is assigned (in table `section` when given), or a table ``[key]`` starts."""
    assign = re.compile(rf"""^\s*["']?{re.escape(key)}["']?\s*=""")
    header = re.compile(rf"""^\s*\[\s*["']?{re.escape(key)}["']?\s*\]""")
    section_header = re.compile(rf"""^\s*\[\s*["']?{re.escape(section)}["']?\s*\]""")
    in_section = not section
    for number, line in enumerate(lines, start=1):
        if line.strip().startswith("["):
            if header.match(line):
                return number
            in_section = not section or section_header.match(line) is not None
            continue
        if in_section and assign.match(line):
            return number
    return None


def _scalar_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        raise ConfigError(f"expected a plain value in the list, got {json.dumps(value, default=str)}")
    return json.dumps(value, default=str)


def _file_value(param: click.Option, value: Any) -> Any:
    """A TOML value as click expects it for `param` (click converts and checks it afterwards).

    :raises ConfigError: the shape does not fit the option (a table for a plain option, a float for an
        integer), with the allowed form.
    """
    if param.multiple or param.nargs != 1:
        if isinstance(value, dict):  # KEY=VALUE options: a table reads better
            return [f"{k}={_scalar_text(v) if isinstance(v, str) else json.dumps(v)}" for k, v in value.items()]
        if isinstance(value, list):
            return [_scalar_text(v) for v in value]
        if isinstance(value, str):
            return split_items(value)
        return [_scalar_text(value)]
    if isinstance(value, (dict, list)):
        raise ConfigError(f"expected one value, got {'a table' if isinstance(value, dict) else 'an array'}")
    # click would turn 1.5 into 1 and true into 1 without a word; a config file deserves a clear refusal.
    if isinstance(param.type, click.types.IntParamType) and (isinstance(value, (bool, float))):
        raise ConfigError(f"{value!r} is not an integer")
    if isinstance(param.type, click.types.FloatParamType) and isinstance(value, bool):
        raise ConfigError(f"{value!r} is not a number")
    if isinstance(param.type, click.types.BoolParamType) and not isinstance(value, (bool, str)):
        raise ConfigError(f"{value!r} is not a boolean; allowed: true, false")
    if not isinstance(value, (str, int, float, bool)):
        return str(value)  # TOML dates and times: the option decides what it accepts
    return value


def _suggest(name: str, known: Iterable[str]) -> str:
    """``" (did you mean X or Y?)"`` for the closest of `known` to `name`, or an empty string."""
    close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _join(errors: Iterable[str]) -> str:
    """One error as is; several as an indented list under a count, one per line."""
    items = list(errors)
    if len(items) == 1:
        return items[0]
    return f"{len(items)} problems:\n" + "\n".join(f"  - {item}" for item in items)


__all__ = ["CONFIG_ENV", "CONFIG_PARAM", "ENV_PREFIX", "FileLayer", "LayeredCommand", "Source", "env_names",
           "explain_config_error", "file_layer", "option_for_field", "option_keys", "source_of", "split_items"]
