"""Metrics (Prometheus endpoint of a real node against `p2pnode status`), the merge quorum, the daemon
settings and their options, and the resource limits (upload token bucket, CPU threads, GPU memory)."""

from __future__ import annotations

import asyncio
import json
import math
import urllib.request
from pathlib import Path
from typing import Any

import click
import pytest
import torch
from click.testing import CliRunner

from p2pnode.cli.daemon_options import daemon_options, settings_from_options
from p2pnode.config import NodeConfig
from p2pnode.daemon.build import build_trainer
from p2pnode.daemon.limits import ThrottledTransport, TokenBucket, apply_cpu_threads, apply_gpu_memory_limit
from p2pnode.daemon.metrics import parse_exposition
from p2pnode.daemon.node import Node
from p2pnode.daemon.settings import DaemonSettings, parse_gpu_memory
from p2pnode.discovery.base import PeerInfo
from p2pnode.discovery.memory import MemoryRegistry
from p2pnode.errors import ConfigError, RemoteError
from p2pnode.proto import peer_pb2
from p2pnode.transport import Message
from p2pnode.transport.clock import run_virtual
from p2pnode.transport.memory import LinkModel, MemoryNetwork, NetworkModel
from simutil import make_config, memory_node, running_nodes


def _scrape(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        return parse_exposition(resp.read().decode())


# ------------------------------------------------------------------------------------------ metrics
@pytest.mark.network
@pytest.mark.slow
async def test_scraped_metrics_match_status_of_a_real_node(tmp_path: Path) -> None:
    """Two real nodes train 3 rounds; one refuses a message of another run. Then the Prometheus
    endpoint and `p2pnode status --json` of node 0 show the same numbers."""
    from daemonutil import invoke_control

    from netutil import NetworkGuard, start_real_nodes
    from p2pnode.daemon.control import start_control

    with NetworkGuard() as guard:
        nodes: list[Node] = []
        control = server = None
        try:
            await start_real_nodes(nodes, 2, lambda i, initial: NodeConfig(
                run_id="metrics", seed=2, shard=(i, 2), device="cpu", initial_peers=initial, exchange_timeout_s=10.0,
                local_steps=5), lambda i: DaemonSettings(state_dir=tmp_path / f"n{i}", metrics_port=0))
            node = nodes[0]
            control = await start_control(node, tmp_path / "n0", on_leave=node.stop)
            server = node.metrics.serve("127.0.0.1", 0)
            for _ in range(20):  # until the DHT lists the peers to each other
                if all([await n.directory.peers() for n in nodes]):
                    break
                await asyncio.sleep(0.3)
            for _ in range(3):
                await asyncio.gather(*(n.run_round() for n in nodes))
            bad = Message(peer_pb2.ModelExchange(run_id="another-run", config_hash="x"))
            with pytest.raises(RemoteError):
                await nodes[1].transport.call(node.peer_id, "gossip.exchange", bad, peer_pb2.ModelExchange, 10.0)
            await node.wait_for_checkpoint()

            result = await invoke_control(["status", "--json", "--state-dir", str(tmp_path / "n0")])
            assert result.exit_code == 0, result.output
            status = json.loads(result.stdout)
            m = await asyncio.to_thread(_scrape, server.address)
        finally:
            if server is not None:
                server.close()
            if control is not None:
                await control.stop()
            for n in nodes:
                await n.shutdown()
    assert not guard.leaked_processes, guard.leaked_processes

    assert m["p2pnode_round"] == status["round"] == 3
    assert m["p2pnode_rounds_total"] == 3
    assert m["p2pnode_peers"] == status["peers"] == 1
    assert m["p2pnode_bytes_sent_total"] == status["bytes_sent"] > 0
    assert m["p2pnode_bytes_received_total"] == status["bytes_received"] > 0
    assert m["p2pnode_accuracy"] == pytest.approx(status["accuracy"], abs=1e-12)
    assert status["metric"] == "accuracy" and status["metric_value"] == status["accuracy"]
    assert m['p2pnode_eval_metric{metric="accuracy"}'] == pytest.approx(status["accuracy"], abs=1e-12)
    assert m["p2pnode_train_loss"] == pytest.approx(status["loss"], abs=1e-12)
    assert status["rejected"] == {"wrong_run": 1}
    assert m['p2pnode_rejected_messages_total{reason="wrong_run"}'] == 1
    assert m["p2pnode_round_duration_seconds_count"] == 3
    assert not [k for k in m if k.startswith("p2pnode_partial_rounds_total")]  # no partial round
    assert m["p2pnode_checkpoints_written_total"] == 3 and m["p2pnode_last_checkpoint_round"] == 3
    assert m["p2pnode_merge_combined"] >= 2 and m["p2pnode_merge_fraction"] == 1.0
    info = [k for k in m if k.startswith("p2pnode_info{")]
    assert len(info) == 1 and f'peer_id="{status["peer_id"]}"' in info[0] and 'run_id="metrics"' in info[0]


def test_nodes_in_one_process_have_separate_registries() -> None:
    async def main() -> None:
        net, registry = MemoryNetwork(seed=0), MemoryRegistry()
        nodes = [memory_node(net, registry, i, 2) for i in range(2)]
        async with running_nodes(nodes):
            await nodes[0].run_round()
            a, b = (parse_exposition(n.metrics.exposition().decode()) for n in nodes)
            assert a["p2pnode_rounds_total"] == 1 and b["p2pnode_rounds_total"] == 0
            assert a["p2pnode_round"] == 1 and b["p2pnode_round"] == 0

    run_virtual(main())


def test_language_model_exports_perplexity_not_accuracy() -> None:
    async def main() -> dict[str, float]:
        net, registry = MemoryNetwork(seed=0), MemoryRegistry()
        nodes = [memory_node(net, registry, i, 2, task="tiny-lm", task_options={"size": "tiny"}, batch_size=8,
                             local_steps=3) for i in range(2)]
        async with running_nodes(nodes):
            await asyncio.gather(*(n.run_round() for n in nodes))
            m = parse_exposition(nodes[0].metrics.exposition().decode())
        return m

    m = run_virtual(main())
    assert "p2pnode_accuracy" not in m
    assert m["p2pnode_test_loss"] > 0
    assert m['p2pnode_eval_metric{metric="perplexity"}'] == pytest.approx(math.exp(m["p2pnode_test_loss"]), rel=1e-6)


def test_directory_rejections_are_exported_by_reason() -> None:
    """Records the directory refused appear as ``directory_rejected_total{reason}``; the older
    ``directory_invalid`` / ``directory_mismatched`` counters are their sums."""
    async def main() -> None:
        net, registry = MemoryNetwork(seed=0), MemoryRegistry()
        nodes = [memory_node(net, registry, i, 2) for i in range(2)]
        async with running_nodes(nodes):
            run = nodes[0].config.run_id
            registry.put(run, PeerInfo(peer_id="other", config_hash="another config"), 60.0)
            registry.put(run, PeerInfo(peer_id="bad", round=-1, config_hash=nodes[0].config.config_hash), 60.0)
            await nodes[0].directory.peers()
            m = parse_exposition(nodes[0].metrics.exposition().decode())
            assert m['p2pnode_directory_rejected_total{reason="other_config"}'] == 1
            assert m['p2pnode_directory_rejected_total{reason="bad_record"}'] == 1
            assert m["p2pnode_directory_mismatched_total"] == 1 and m["p2pnode_directory_invalid_total"] == 1

    run_virtual(main())


# ------------------------------------------------------------------------------------------ quorum
def test_round_below_quorum_is_partial_counted_and_its_merge_undone() -> None:
    """Two gossip nodes with --min-merge 5 can never reach the quorum: every round is reported partial,
    counted, and the merge is undone, so each model is exactly the one it would train alone."""
    quorum = DaemonSettings.in_memory(min_merge=5)
    rounds = 3

    async def main() -> None:
        net, registry = MemoryNetwork(seed=0), MemoryRegistry()
        nodes = [memory_node(net, registry, i, 2, quorum, model_seed_mode="independent") for i in range(2)]
        async with running_nodes(nodes):
            for _ in range(rounds):
                reports = await asyncio.gather(*(n.run_round() for n in nodes))
                for r in reports:
                    assert r.extra["partial"] == "quorum" and r.extra["merge_applied"] is False
                    assert r.extra["offered"] >= 2 and (r.combined, r.fraction) == (1, 0.0)
            for i, n in enumerate(nodes):
                alone = build_trainer(make_config(i, 2, model_seed_mode="independent"))
                for _ in range(rounds):
                    alone.train(n.config.local_steps or 1)
                got, want = n.trainer.state(), alone.state()
                assert all(torch.equal(got[k], want[k]) for k in want)
                # What the node serves to peers is the kept model, not the undone merge.
                published = n.protocol._published  # type: ignore[attr-defined]
                assert all(torch.equal(published[k], want[k]) for k in want)
                assert n.last_report is not None and n.last_report.accuracy == pytest.approx(alone.evaluate()[1])
                assert n.status().partial_rounds == rounds
                m = parse_exposition(n.metrics.exposition().decode())
                assert m['p2pnode_partial_rounds_total{reason="quorum"}'] == rounds
                assert n.transport.stats.bytes_received > 0  # models did arrive; they were not merged

    run_virtual(main())


def test_quorum_met_merges_as_usual() -> None:
    async def main() -> None:
        net, registry = MemoryNetwork(seed=0), MemoryRegistry()
        nodes = [memory_node(net, registry, i, 2, DaemonSettings.in_memory(min_merge=2)) for i in range(2)]
        async with running_nodes(nodes):
            reports = await asyncio.gather(*(n.run_round() for n in nodes))
            assert all(r.combined >= 2 and "partial" not in r.extra for r in reports)
            assert all(n.partial_rounds == 0 for n in nodes)

    run_virtual(main())


# ------------------------------------------------------------------------------------------ settings
def test_settings_validation_names_key_and_allowed_values() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"checkpoint_every": -1}, "checkpoint_every=-1"),
        ({"keep_checkpoints": 0}, "keep_checkpoints=0"),
        ({"min_merge": 0}, "min_merge=0"),
        ({"metrics_port": 70000}, "metrics_port=70000"),
        ({"max_gpu_memory_fraction": 1.5}, "max_gpu_memory_fraction=1.5"),
        ({"max_gpu_memory_gib": 2.0, "max_gpu_memory_fraction": 0.5}, "one of them"),
        ({"cpu_threads": 0}, "cpu_threads=0"),
        ({"max_upload_mbps": -3.0}, "max_upload_mbps=-3.0"),
        ({"progress": "loud"}, "allowed: auto, on, off"),
        ({"sync_chunk_bytes": 10}, "sync_chunk_bytes=10"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            DaemonSettings(**kwargs).validate()
    assert parse_gpu_memory("8GiB") == (8.0, None) and parse_gpu_memory("6") == (6.0, None)
    assert parse_gpu_memory("0.5") == (None, 0.5) and parse_gpu_memory("25%") == (None, 0.25)
    with pytest.raises(ConfigError, match="max_gpu_memory='lots'"):
        parse_gpu_memory("lots")


def test_daemon_options_build_settings(tmp_path: Path) -> None:
    seen: list[DaemonSettings] = []

    @click.command()
    @click.option("--state-dir", type=click.Path(path_type=Path))
    @click.option("--json-logs", is_flag=True)
    @daemon_options
    def cmd(**kw: Any) -> None:
        seen.append(settings_from_options(kw))

    result = CliRunner().invoke(cmd, ["--state-dir", str(tmp_path), "--no-resume", "--checkpoint-every", "5",
                                      "--min-merge", "3", "--metrics-port", "0", "--max-gpu-memory", "40%",
                                      "--cpu-threads", "2", "--max-upload-mbps", "20", "--no-sync", "--json-logs"])
    assert result.exit_code == 0, result.output
    s = seen[-1]
    assert (s.state_dir, s.resume, s.checkpoint_every, s.min_merge, s.metrics_port) == (tmp_path, False, 5, 3, 0)
    assert (s.max_gpu_memory_fraction, s.cpu_threads, s.max_upload_mbps, s.sync_on_join) == (0.4, 2, 20.0, False)
    assert s.progress == "off" and s.upload_bytes_per_s == 2.5e6  # JSON logs turn the live display off
    assert CliRunner().invoke(cmd, []).exit_code == 0
    assert seen[-1] == DaemonSettings().validate()
    # Keys a command does not declare take their defaults (run/join before they get the options).
    assert settings_from_options({"state_dir": tmp_path}).checkpoint_every == 1


# ------------------------------------------------------------------------------------------ limits
def test_upload_cap_holds_requests_and_responses_to_the_rate() -> None:
    """A node capped at 8 Mbit/s (1 MB/s, 1 MB burst) sends 10 requests of 0.5 MB and answers 10
    requests with 0.5 MB: about 9 s of virtual time; uncapped it takes well under a second."""
    payload = {"x": torch.zeros(125_000)}  # 0.5 MB

    async def main(capped: bool) -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        net = MemoryNetwork(NetworkModel(LinkModel(latency_s=0.001, bandwidth_bytes_per_s=1e9)))
        inner = net.transport("volunteer")
        t = ThrottledTransport(inner, TokenBucket(1e6, clock=loop.time)) if capped else inner
        other = net.transport("other")

        async def echo(sender: str, msg: Message[Any]) -> Message[Any]:
            return Message(peer_pb2.Pong(round=1))

        async def big(sender: str, msg: Message[Any]) -> Message[Any]:
            return Message(peer_pb2.Pong(round=2), payload)

        other.register("echo", peer_pb2.Ping, echo)
        t.register("big", peer_pb2.Ping, big)
        t0 = loop.time()
        for _ in range(10):
            await t.call("other", "echo", Message(peer_pb2.Ping(), payload), peer_pb2.Pong, timeout=60)
        sent_s = loop.time() - t0
        t0 = loop.time()
        for _ in range(10):
            resp = await other.call("volunteer", "big", Message(peer_pb2.Ping()), peer_pb2.Pong, timeout=60)
            assert resp.body.round == 2
        return sent_s, loop.time() - t0

    sent_s, served_s = run_virtual(main(True))
    # 5 MB at 1 MB/s with a 1 MB burst: >= 4 s; each direction on its own.
    assert 4.0 <= sent_s <= 5.5, sent_s
    assert 4.5 <= served_s <= 5.5, served_s  # the bucket was drained by the requests: no burst left
    fast_sent, fast_served = run_virtual(main(False))
    assert fast_sent < 0.5 and fast_served < 0.5


def test_token_bucket_average_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(100.0, burst_bytes=50.0, clock=lambda: now[0])
    assert bucket.delay_for(50) == 0.0  # the burst
    assert bucket.delay_for(100) == pytest.approx(1.0)  # debt of 100 bytes at 100 B/s
    now[0] = 1.0
    assert bucket.delay_for(0) == 0.0  # paid back
    assert bucket.delay_for(500) == pytest.approx(5.0)  # larger than the burst: allowed, at the rate


def test_cpu_threads_applied() -> None:
    before = torch.get_num_threads()
    try:
        assert apply_cpu_threads(1) == 1 == torch.get_num_threads()
        assert apply_cpu_threads(None) == 1  # None leaves it alone
    finally:
        torch.set_num_threads(before)


def test_gpu_cap_is_ignored_on_the_cpu() -> None:
    assert apply_gpu_memory_limit(torch.device("cpu"), gib=1.0) is None
    assert apply_gpu_memory_limit(torch.device("cpu")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cap_refuses_allocations_beyond_it() -> None:
    device = torch.device("cuda:0")
    fraction = apply_gpu_memory_limit(device, gib=1.0)
    try:
        assert fraction is not None and 0 < fraction < 1
        small = torch.empty(256 << 20, dtype=torch.uint8, device=device)  # 256 MiB: fits
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(2 << 30, dtype=torch.uint8, device=device)  # 2 GiB: over the cap
        del small
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ progress
def test_live_display_only_on_a_terminal_and_logs_go_above_it() -> None:
    import io
    import logging

    from rich.console import Console

    from p2pnode.cli.serve import ProgressDisplay, live_display_wanted

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert not live_display_wanted(DaemonSettings(), io.StringIO())  # a pipe or a file: plain log lines
    assert live_display_wanted(DaemonSettings(), Tty())
    assert not live_display_wanted(DaemonSettings(progress="off"), Tty())

    async def main() -> None:
        net, registry = MemoryNetwork(seed=0), MemoryRegistry()
        nodes = [memory_node(net, registry, i, 2) for i in range(2)]
        async with running_nodes(nodes):
            await asyncio.gather(*(n.run_round() for n in nodes))
            out = Tty()
            console = Console(file=out, force_terminal=True, width=100)
            root = logging.getLogger("p2pnode")
            before = list(root.handlers)
            display = ProgressDisplay(nodes[0], console, target_rounds=10)
            display.start()
            logging.getLogger("p2pnode.test").warning("a log line while the display runs")
            display.stop()
            assert root.handlers == before
            text = out.getvalue()
            assert "a log line while the display runs" in text and "1/10" in text and "last merge" in text

    run_virtual(main())
