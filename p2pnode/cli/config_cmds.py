"""`p2pnode config show` and `p2pnode config check`: the effective configuration of `run`, and its validation.

Both take every option of ``p2pnode run`` and resolve them exactly as ``run`` does (defaults < TOML file
< ``P2PNODE_*`` environment < flags, see `p2pnode.cli.layered`), so ``p2pnode config show`` with the
environment and flags of a node shows what that node would run with. Exit codes: 0 valid, 2 invalid
(unknown key, bad value, or an invalid combination such as ``--aggregators`` above ``--sample-size``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from p2pnode.cli.daemon_options import run_options, settings_from_options
from p2pnode.cli.layered import CONFIG_PARAM, LayeredCommand, explain_config_error, file_layer, source_of
from p2pnode.cli.options import config_from_options
from p2pnode.config import MASK, SECRET_KEYS
from p2pnode.errors import ConfigError

#: Exit code of an invalid configuration (click's usage-error code, as for `run`).
EXIT_INVALID = 2


def _text(value: Any) -> str:
    """One option value as `config show` prints it: ``-`` for unset, lists comma-separated."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ", ".join(str(v) for v in value) if value else "-"
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def effective(ctx: click.Context) -> list[tuple[str, Any, Any]]:
    """``(key, value, source)`` of every option of `ctx`'s command, in declaration order."""
    command = ctx.command
    assert isinstance(command, LayeredCommand)
    names = [CONFIG_PARAM] + [p.name for p in command.layered_params() if p.name]
    # The run's secret is never printed: its value shows as *** (its source still shows where it came from).
    return [(name, MASK if name in SECRET_KEYS and ctx.params.get(name) else ctx.params.get(name),
             source_of(ctx, name)) for name in names]


def _validate(ctx: click.Context, kw: dict[str, Any]) -> tuple[str | None, str | None]:
    """``(config_hash, None)`` when the options make a valid node, else ``(None, message)``."""
    try:
        node_config = config_from_options(kw)
        settings_from_options(kw)
    except ConfigError as e:
        return None, explain_config_error(ctx, e).message
    return node_config.config_hash, None


@click.group()
def config() -> None:
    """Show or check the configuration that `p2pnode run` would use.

    Sources, later wins: option defaults < TOML file (--config, $P2PNODE_CONFIG, or
    <state dir>/config.toml) < P2PNODE_* environment variables < command-line flags.
    """


@config.command(cls=LayeredCommand, unlayered=("as_json",))
@run_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.pass_context
def show(ctx: click.Context, as_json: bool, **kw: Any) -> None:
    """Print every option's effective value and where it came from (default, file, env or flag).

    Takes the same options as `p2pnode run`. Exits 2 (after printing) when the result is invalid.
    """
    rows = effective(ctx)
    config_hash, error = _validate(ctx, kw)
    layer = file_layer(ctx)
    if as_json:
        click.echo(json.dumps({
            "config_file": None if layer.path is None else str(layer.path),
            "config_hash": config_hash, "valid": error is None, "error": error,
            "options": {key: {"value": _jsonable(value), "source": source.kind, "origin": source.origin}
                        for key, value, source in rows},
        }, sort_keys=True))
    else:
        width = max(len(key) for key, _, _ in rows)
        values = [_text(value) for _, value, _ in rows]
        vwidth = min(max(len(v) for v in values), 48)
        for (key, _, source), value in zip(rows, values, strict=True):
            click.echo(f"{key:<{width}}  {value:<{vwidth}}  {source}".rstrip())
        if config_hash is not None:
            click.echo(f"{'config_hash':<{width}}  {config_hash:<{vwidth}}  (of the run-wide keys)".rstrip())
    if error is not None:
        click.echo(f"error: invalid configuration: {error}", err=True)
        ctx.exit(EXIT_INVALID)


@config.command(cls=LayeredCommand)
@run_options
@click.pass_context
def check(ctx: click.Context, **kw: Any) -> None:
    """Validate the configuration that `p2pnode run` would use with these options; exit 2 if invalid.

    Takes the same options as `p2pnode run`.
    """
    config_hash, error = _validate(ctx, kw)
    if error is not None:
        click.echo(f"error: invalid configuration: {error}", err=True)
        ctx.exit(EXIT_INVALID)
    layer = file_layer(ctx)
    origin = f" (file {layer.path})" if layer.path is not None else ""
    click.echo(f"configuration is valid{origin}: run {kw['run_id']}, task {kw['task']}, "
               f"{kw['topology']}/{kw['rule']}, config hash {config_hash}")


__all__ = ["config", "effective"]
