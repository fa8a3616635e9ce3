"""`p2pnode`: start and join nodes, run local swarms and simulations."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from p2pnode import __version__
from p2pnode.cli.config_cmds import config
from p2pnode.cli.control_cmds import register
from p2pnode.cli.daemon_options import run_options, settings_from_options
from p2pnode.cli.doctor import doctor
from p2pnode.cli.invite import TOKEN_PREFIX, Invite, decode_token, differences, encode_token, make_invite, option_values
from p2pnode.cli.layered import LayeredCommand, explain_config_error
from p2pnode.cli.options import config_from_options, training_options
from p2pnode.cli.serve import serve
from p2pnode.cli.sim_options import sim_config_from_options, sim_options
from p2pnode.errors import ConfigError, P2PNodeError
from p2pnode.log import setup_logging

#: Exit codes: 0 clean stop, 2 bad usage or config, 3 start-up failure.
EXIT_CONFIG = 2
EXIT_STARTUP = 3


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="p2pnode")
def cli() -> None:
    """Train one model together across machines, with no central server."""


def _run(kw: dict[str, Any], invite: Invite | None = None) -> None:
    try:
        config = config_from_options(kw)
        settings = settings_from_options(kw)
    except ConfigError as e:
        raise explain_config_error(click.get_current_context(), e) from e
    except P2PNodeError as e:
        raise click.UsageError(str(e)) from e
    if invite is not None and config.config_hash != invite.config_hash:
        diff = "; ".join(differences(config, invite)) or "run-wide options differ"
        raise click.UsageError(f"these options give config hash {config.config_hash}, but the invite's run uses "
                               f"{invite.config_hash}: {diff} (drop the flags, file keys or P2PNODE_* variables "
                               "that change them)")
    setup_logging(kw["log_level"], kw["json_logs"])
    try:
        asyncio.run(serve(config, settings))
    except P2PNodeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_STARTUP)


@cli.command(cls=LayeredCommand)
@run_options
def run(**kw: Any) -> None:
    """Start a node in the foreground; Ctrl-C or SIGTERM stops it cleanly.

    It prints one line when it is ready:
    `p2pnode ready peer_id=<id> maddrs=<multiaddrs> control=<addr>`.

    Every option can also be set in a TOML file (--config) or a P2PNODE_* environment variable;
    `p2pnode config show` prints the effective values and where each came from.
    """
    _run(kw)


@cli.command(cls=LayeredCommand)
@click.argument("target", nargs=-1, required=True, metavar="TOKEN | MULTIADDR...")
@run_options
@click.pass_context
def join(ctx: click.Context, target: tuple[str, ...], **kw: Any) -> None:
    """Start a node that joins a run: with an invite TOKEN (`p2pnode invite`), or the swarm of MULTIADDR
    (same as `run --initial-peer MULTIADDR`).

    A token brings the run id, the run-wide options, bootstrap addresses and the admission key; flags
    still override it (and the node refuses to start if they change the run's config hash).
    """
    tokens = [t for t in target if t.startswith(TOKEN_PREFIX)]
    if len(tokens) > 1:
        raise click.UsageError("give one invite token")
    invite = None
    if tokens:
        try:
            invite = decode_token(tokens[0])
        except ConfigError as e:
            raise click.UsageError(str(e)) from e
        apply_invite(ctx, kw, invite)
    addrs = tuple(t for t in target if not t.startswith(TOKEN_PREFIX))
    kw["initial_peers"] = tuple(kw["initial_peers"]) + addrs + (invite.peers if invite else ())
    _run(kw, invite)


def apply_invite(ctx: click.Context, kw: dict[str, Any], invite: Invite) -> None:
    """Put the invite's values into `kw` wherever the command line did not set the option (the token ranks
    above file and environment, below flags). A token's key replaces a secret from the file or environment."""
    for key, value in option_values(invite).items():
        if key in kw and ctx.get_parameter_source(key) == ParameterSource.COMMANDLINE:
            continue
        kw[key] = value
    if invite.key is not None:
        for key in ("run_secret", "run_secret_file"):
            if ctx.get_parameter_source(key) != ParameterSource.COMMANDLINE:
                kw[key] = None


@cli.command(cls=LayeredCommand, unlayered=("bootstrap",))
@run_options
@click.option("--bootstrap", multiple=True, metavar="MULTIADDR",
              help="Address to put in the token (repeatable) [default: the running node's addresses and its "
                   "initial peers].")
@click.pass_context
def invite(ctx: click.Context, bootstrap: tuple[str, ...], **kw: Any) -> None:
    """Print an invite token (one line) with which `p2pnode join TOKEN` joins this run.

    Takes the options of `p2pnode run` (the same config file, environment and flags as the node); the
    bootstrap addresses come from the node running in the state dir, unless --bootstrap is given. In a run
    with a secret the token admits whoever holds it: keep it like a password.
    """
    from p2pnode.cli.control_cmds import ControlClient, ControlError
    from p2pnode.proto import control_pb2

    try:
        config = config_from_options(kw)
    except ConfigError as e:
        raise explain_config_error(ctx, e) from e
    peers, inviter = list(bootstrap), None
    if not peers:
        try:
            with ControlClient(Path(kw["state_dir"]).expanduser()) as client:
                reply = client.call(client.stub.Status, control_pb2.StatusRequest())
            if reply.run_id != config.run_id:
                raise click.UsageError(f"the node in {kw['state_dir']} runs {reply.run_id!r}, not {config.run_id!r}; "
                                       "give the node's options (or --bootstrap)")
            peers, inviter = list(reply.maddrs), reply.peer_id
        except ControlError as e:
            click.echo(f"warning: no running node to take addresses from ({e})", err=True)
        peers += config.initial_peers
    if not peers:
        raise click.UsageError("no bootstrap address: start the node first (`p2pnode run`) or give --bootstrap")
    if all("/127.0.0.1/" in p or "/ip6/::1/" in p for p in peers):
        click.echo("warning: every bootstrap address is a loopback one: the token works on this machine only",
                   err=True)
    click.echo(encode_token(make_invite(config, peers, inviter=inviter)))
    if config.admission == "secret":
        click.echo("keep this token like a password: it admits whoever holds it to the run", err=True)
    elif config.admission == "open":
        click.echo("this run is open: its models are public, anyone who knows the run id can fetch and push models",
                   err=True)


@cli.command(cls=LayeredCommand, unlayered=("out", "plot", "quiet", "show_config"),
             also_accept_env_of=lambda: [cli.commands["run"], cli.commands["join"]])
@sim_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write results JSON here.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Draw the task's metric (accuracy, perplexity) and bytes per round to this PNG.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--show-config", is_flag=True,
              help="Print the run's settings as JSON (each option's value and where it came from) and exit.")
@click.pass_context
def sim(ctx: click.Context, out: Path | None, plot: Path | None, quiet: bool, show_config: bool, **kw: Any) -> None:
    """Simulate NODES nodes in one process over an in-memory network on a virtual clock.

    Every node runs with the settings of `p2pnode run` (the same options and defaults, generated from one
    schema; the simulator sets each node's shard and the fl server itself), plus the simulator's own: the
    network model, churn, attackers and recording. Options are layered as for `run`: defaults < TOML file
    (--config or $P2PNODE_CONFIG) < P2PNODE_* environment < flags.

    For gossip and dpsgd a round is one step of every live node, in lockstep; for modest and fl it is one
    model version (one completed aggregation). The same seed gives the same results file, byte for byte.
    Wall-clock time goes to stdout only.
    """
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from p2pnode.cli.layered import source_of
    from p2pnode.cli.sim_options import sim_value
    from p2pnode.config import MASK
    from simulator.settings import results_config, sim_schema

    try:
        cfg = sim_config_from_options(kw, validate=False)
        error = None
        try:
            cfg.validate()
        except ConfigError as e:
            error = e
    except P2PNodeError as e:
        raise click.UsageError(str(e)) from e
    if show_config:
        # Like `config show --json`: each option's value in the SimConfig and its source; printed even when the
        # settings are invalid (then with the error, and exit 2).
        options: dict[str, Any] = {}
        for section, f, meta in sim_schema():
            value = sim_value(cfg, section, f.name)
            source = source_of(ctx, meta.param)
            options[meta.param] = {"value": MASK if meta.secret and value else
                                   list(value) if isinstance(value, tuple) else value,
                                   "source": source.kind, "origin": source.origin}
        shown: dict[str, Any] = {"options": options}
        if error is None:
            shown["config"] = results_config(cfg)
        else:
            shown["error"] = str(error)
        click.echo(json.dumps(shown, sort_keys=True, default=str))
        if error is not None:
            ctx.exit(EXIT_CONFIG)
        return
    if error is not None:
        raise explain_config_error(ctx, error)
    for name in cfg.ignored_settings():
        click.echo(f"warning: {name} has no effect in the simulator (in-memory network)", err=True)
    from simulator import run_simulation

    rounds, nodes, byzantine = cfg.rounds, cfg.nodes, cfg.attackers.byzantine
    setup_logging("WARNING")
    t0 = time.perf_counter()
    with Progress(TextColumn("[bold]sim"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), disable=quiet) as progress:
        bar = progress.add_task("", total=rounds)

        from p2pnode.daemon.node_status import metric_text
        from p2pnode.training import get_task

        # The results name the task's metric: "accuracy" for the image tasks, "perplexity" for tiny-lm.
        metric = get_task(cfg.config.task, **cfg.config.task_options).metric

        def on_round(row: dict[str, Any]) -> None:
            progress.update(bar, advance=1, description=f"{metric_text(metric, row.get(metric))} "
                                                        f"MB={row['bytes'] / 1e6:.2f}")

        results = run_simulation(cfg, on_round)
    wall = time.perf_counter() - t0
    last = results["rounds"][-1] if results["rounds"] else {}
    stalled = " STALLED (no new model version for a long while)" if results.get("stalled") else ""
    byz = f" byzantine={byzantine} attack={cfg.config.attack}" if byzantine else ""
    click.echo(f"sim done: nodes={nodes}{byz} rounds={len(results['rounds'])} "
               f"final_{metric}={results[f'final_{metric}']} total_MB={results['total_bytes'] / 1e6:.2f} "
               f"KB_per_node_round={(results['bytes_per_node_per_round'] or 0) / 1e3:.1f} "
               f"virtual_s={last.get('time_s', 0):.2f} wall_s={wall:.1f}{stalled}")
    if out is not None:
        out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        click.echo(f"results written to {out}")
    if plot is not None:
        from simulator.plot import plot_results

        plot_results(results, plot)
        click.echo(f"plot written to {plot}")


@cli.command()
@click.option("--nodes", default=4, show_default=True, type=int, help="Number of daemons to start.")
@click.option("--rounds", default=30, show_default=True, type=int, help="Rounds every node runs.")
@training_options
@click.option("--min-round-time", default=0.5, show_default=True, type=float,
              help="Shortest round of each node, in seconds.")
@click.option("--run-id", default="local-swarm", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="Device of every node.")
def swarm(**kw: Any) -> None:
    """Start a local swarm of real daemons on 127.0.0.1 and show their progress live.

    Each node is a separate process with its own hivemind DHT and libp2p daemon; node 0 is started
    first and the others join it. Ends with a summary table.
    """
    from p2pnode.cli.swarm import run_swarm

    sys.exit(run_swarm(kw))


register(cli)
cli.add_command(doctor)
cli.add_command(config)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except P2PNodeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_CONFIG)


if __name__ == "__main__":
    main()
