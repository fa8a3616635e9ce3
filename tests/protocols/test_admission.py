"""Admission control: proofs, record MACs, invite tokens, the masked secret, and whole runs with an outsider.

Memory-network tests run on the virtual clock; the last test runs real hivemind nodes on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from p2pnode.cli.invite import decode_token, encode_token, make_invite
from p2pnode.cli.main import cli
from p2pnode.config import NodeConfig
from p2pnode.daemon.node import Node
from p2pnode.daemon.settings import DaemonSettings
from p2pnode.discovery import PeerInfo
from p2pnode.discovery.memory import MemoryDirectory, MemoryRegistry
from p2pnode.errors import ConfigError, RemoteError
from p2pnode.proto import peer_pb2, statesync_pb2
from p2pnode.protocols.gossip import EXCHANGE
from p2pnode.protocols.statesync import MANIFEST
from p2pnode.transport import Message
from p2pnode.transport.admission import Admission, derive_key
from p2pnode.transport.clock import run_virtual
from p2pnode.transport.memory import MemoryNetwork
from simutil import memory_node, running_nodes

SECRET = b"correct horse battery staple 42"
OTHER = b"another secret of the same length"


# -- proofs ---------------------------------------------------------------------------------------------------
def test_proof_verifies_and_is_bound_to_secret_run_sender_receiver_method_and_nonce() -> None:
    adm = Admission(derive_key(SECRET, "run"))
    nonce, other_nonce = bytes(16), bytes([1] * 16)
    proof = adm.proof("alice", "bob", EXCHANGE, nonce)
    assert adm.admits("alice", "bob", EXCHANGE, nonce, proof)
    assert not Admission(derive_key(OTHER, "run")).admits("alice", "bob", EXCHANGE, nonce, proof)  # wrong secret
    assert not Admission(derive_key(SECRET, "run2")).admits("alice", "bob", EXCHANGE, nonce, proof)  # other run
    assert not adm.admits("alice", "carol", EXCHANGE, nonce, proof)  # another receiver
    assert not adm.admits("mallory", "bob", EXCHANGE, nonce, proof)  # another sender replays it
    assert not adm.admits("alice", "bob", MANIFEST, nonce, proof)  # another method
    assert not adm.admits("alice", "bob", EXCHANGE, other_nonce, proof)  # on another message (its nonce)
    tampered = bytearray(proof)
    tampered[-1] ^= 1
    assert not adm.admits("alice", "bob", EXCHANGE, nonce, bytes(tampered))
    assert not adm.admits("alice", "bob", EXCHANGE, nonce, b"")
    assert not adm.admits("alice", "bob", EXCHANGE, nonce, proof[:-1])
    # A response's proof names the request it answers, and a request's proof is no response's.
    answer = adm.response_proof("bob", "alice", EXCHANGE, other_nonce, nonce)
    assert adm.admits_response("bob", "alice", EXCHANGE, other_nonce, nonce, answer)
    assert not adm.admits_response("bob", "alice", EXCHANGE, other_nonce, bytes([2] * 16), answer)
    assert not adm.admits_response("bob", "alice", EXCHANGE, other_nonce, nonce,
                                   adm.proof("bob", "alice", EXCHANGE, other_nonce))
    assert not adm.admits("bob", "alice", EXCHANGE, other_nonce, answer)


def test_short_secret_and_allowlist() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        derive_key(b"short", "run")
    adm = Admission.create(None, ["alice"])
    assert adm is not None and adm.mode == "allowlist"
    assert adm.admits("alice", "bob", EXCHANGE, b"n", b"") and not adm.admits("eve", "bob", EXCHANGE, b"n", b"")
    assert Admission.create(None, None) is None
    both = Admission(derive_key(SECRET, "run"), frozenset({"alice"}))
    assert not both.admits("eve", "bob", EXCHANGE, b"n", both.proof("eve", "bob", EXCHANGE, b"n"))  # not listed


def test_record_mac_drops_outsiders_and_tampered_records() -> None:
    async def main() -> None:
        registry = MemoryRegistry()

        def directory(pid: str, secret: bytes | None) -> MemoryDirectory:
            d = MemoryDirectory(registry, peer_id=pid, run_id="run", config_hash="cfg")
            d.admission = None if secret is None else Admission(derive_key(secret, "run"))
            return d

        a, b, eve, open_ = directory("a", SECRET), directory("b", SECRET), directory("eve", OTHER), directory("o", None)
        for d in (a, b, eve, open_):
            await d.announce(PeerInfo(peer_id=d.peer_id, round=3))
        assert [p.peer_id for p in await a.peers()] == ["b"]
        assert a.not_admitted == 2  # eve's record (other secret) and the open node's (no mac)
        # A record of b's, altered (its round raised) by someone without the key:
        [rec] = [p for p in registry.live("run") if p.peer_id == "b"]
        registry.put("run", PeerInfo(**{**rec.__dict__, "round": 99}), 30.0)
        assert await a.peers() == [] and a.not_admitted == 5
        # The proto round trip keeps the mac valid.
        assert a.admitted(PeerInfo.from_proto(rec.to_proto()))

    run_virtual(main())


# -- invite tokens --------------------------------------------------------------------------------------------
def test_token_round_trip_and_tamper_refusal(tmp_path: Path) -> None:
    secret_file = tmp_path / "run.secret"
    secret_file.write_bytes(SECRET + b"\n")
    config = NodeConfig(run_id="r", topology="modest", sample_size=4, admission="secret",
                        run_secret_file=str(secret_file)).validate()
    token = encode_token(make_invite(config, ["/ip4/10.1.2.3/tcp/4000/p2p/QmPeer"], inviter="QmPeer"))
    assert token.startswith("p2pn1:") and SECRET.decode() not in token
    invite = decode_token(token)
    assert invite.run_id == "r" and invite.config_hash == config.config_hash and invite.admission == "secret"
    assert invite.peers == ("/ip4/10.1.2.3/tcp/4000/p2p/QmPeer",) and invite.run["sample_size"] == 4
    # The joiner's config from the token alone has the run's hash and key.
    joined = NodeConfig(run_id=invite.run_id, topology="modest", sample_size=4, admission="secret",
                        admission_key=invite.key).validate()
    assert joined.config_hash == config.config_hash
    assert joined.admission_key_bytes() == config.admission_key_bytes() == derive_key(SECRET, "r")
    body = token[len("p2pn1:"):]
    flipped = body[:40] + ("A" if body[40] != "A" else "B") + body[41:]
    for bad in ("p2pn1:" + flipped, token[:-3], "p2pn2:" + body, "p2pn1:!!!"):
        with pytest.raises(ConfigError, match="token"):
            decode_token(bad)


def test_join_with_a_token_refuses_flags_that_change_the_run(tmp_path: Path) -> None:
    secret_file = tmp_path / "s"
    secret_file.write_bytes(SECRET)
    runner = CliRunner()
    state = ["--state-dir", str(tmp_path / "state")]
    made = runner.invoke(cli, ["invite", "--admission", "secret", "--run-secret-file", str(secret_file),
                               "--run-id", "r", "--bootstrap", "/ip4/10.0.0.1/tcp/1/p2p/QmX", *state])
    assert made.exit_code == 0, made.output
    token = made.stdout.strip().splitlines()[-1]
    refused = runner.invoke(cli, ["join", token, "--rule", "median", *state])
    assert refused.exit_code == 2 and "config hash" in refused.output and "rule='median'" in refused.output
    damaged = runner.invoke(cli, ["join", token[:-2], *state])
    assert damaged.exit_code == 2 and "checksum" in damaged.output


# -- the secret is never printed ------------------------------------------------------------------------------
def test_config_show_masks_the_secret(tmp_path: Path) -> None:
    runner = CliRunner()
    secret = SECRET.decode()
    args = ["config", "show", "--admission", "secret", "--run-secret", secret, "--state-dir", str(tmp_path)]
    table = runner.invoke(cli, args)
    assert table.exit_code == 0, table.output
    assert secret not in table.output and "***" in table.output
    as_json = runner.invoke(cli, [*args, "--json"])
    assert secret not in as_json.output
    assert json.loads(as_json.stdout)["options"]["run_secret"]["value"] == "***"
    config = NodeConfig(admission="secret", run_secret=secret).validate()
    assert secret not in repr(config) and config.as_dict()["run_secret"] == "***"
    assert "secret" not in json.dumps(NodeConfig().validate().as_dict()).replace("run_secret", "")


def test_config_refuses_inconsistent_admission(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="admission=secret needs"):
        NodeConfig(admission="secret").validate()
    with pytest.raises(ConfigError, match="use --admission secret"):
        NodeConfig(run_secret=SECRET.decode()).validate()
    with pytest.raises(ConfigError, match="allow-peers"):
        NodeConfig(admission="allowlist").validate()
    with pytest.raises(ConfigError, match="cannot read"):
        NodeConfig(admission="secret", run_secret_file=str(tmp_path / "missing")).validate()


# -- whole runs -----------------------------------------------------------------------------------------------
def _memory_node(network: MemoryNetwork, registry: MemoryRegistry, index: int, secret: bytes | None) -> Node:
    extra: dict[str, object] = {} if secret is None else {"admission": "secret", "run_secret": secret.decode()}
    return memory_node(network, registry, index, 3, DaemonSettings.in_memory(serve_state=True), **extra)


async def _outsider_is_refused(outsider: Node, admitted: list[Node]) -> None:
    """The outsider's exchange and statesync requests to each admitted node are refused as not_admitted."""
    for node in admitted:
        before = node.transport.stats.rejected["not_admitted"]
        exchange = outsider.protocol._request()  # type: ignore[attr-defined]
        with pytest.raises(RemoteError) as e:
            await outsider.transport.call(node.peer_id, EXCHANGE, exchange, peer_pb2.ModelExchange, timeout=10.0)
        assert e.value.code == "not_admitted"
        manifest = statesync_pb2.SyncManifestRequest(run_id=outsider.config.run_id,
                                                     config_hash=outsider.config.config_hash)
        with pytest.raises(RemoteError) as e:
            await outsider.transport.call(node.peer_id, MANIFEST, Message(manifest), statesync_pb2.SyncManifest,
                                          timeout=10.0)
        assert e.value.code == "not_admitted"
        assert node.transport.stats.rejected["not_admitted"] == before + 2


@pytest.mark.parametrize("outsider_secret", [OTHER, None], ids=["other-secret", "open"])
def test_outsider_is_refused_in_memory_and_admitted_nodes_train(outsider_secret: bytes | None) -> None:
    async def main() -> None:
        network, registry = MemoryNetwork(seed=0), MemoryRegistry()
        nodes = [_memory_node(network, registry, i, SECRET) for i in range(2)]
        outsider = _memory_node(network, registry, 2, outsider_secret)
        async with running_nodes([*nodes, outsider]):
            for _ in range(3):
                reports = await asyncio.gather(*(n.run_round() for n in [*nodes, outsider]))
            assert all(r.combined == 2 and r.peers == 1 for r in reports[:2]), reports
            assert reports[2].combined == 1 and reports[2].partner is None  # nobody talks to the outsider
            assert all(n.directory.not_admitted > 0 for n in nodes)
            await _outsider_is_refused(outsider, nodes)

    run_virtual(main())


@pytest.mark.network
@pytest.mark.slow
async def test_real_network_two_admitted_nodes_and_an_outsider(tmp_path: Path) -> None:
    """2 real nodes with the run's secret and 1 with another secret, all joined to one DHT on 127.0.0.1."""
    from netutil import NetworkGuard, start_real_nodes

    (tmp_path / "good").write_bytes(SECRET)
    (tmp_path / "bad").write_bytes(OTHER)
    with NetworkGuard() as guard:
        nodes: list[Node] = []
        try:
            secrets = ["good", "good", "bad"]
            await start_real_nodes(nodes, 3, lambda i, initial: NodeConfig(
                run_id="adm", seed=5, shard=(i, 3), device="cpu", initial_peers=initial, exchange_timeout_s=10.0,
                announce_ttl_s=20.0, local_steps=5, admission="secret", run_secret_file=str(tmp_path / secrets[i])),
                lambda i: DaemonSettings(state_dir=tmp_path / f"n{i}", sync_wait_s=1.0))
            admitted, outsider = nodes[:2], nodes[2]
            for _ in range(2):
                reports = await asyncio.gather(*(n.run_round() for n in nodes))
            assert [r.combined for r in reports[:2]] == [2, 2] and all(r.peers == 1 for r in reports[:2]), reports
            assert reports[2].peers == 0 and reports[2].combined == 1
            for n in admitted:  # the directories read in the background: one more read counts the record
                await n.directory.refresh()
            assert all(n.directory.not_admitted > 0 for n in admitted)
            await _outsider_is_refused(outsider, admitted)
        finally:
            for n in nodes:
                await n.shutdown()
    assert not guard.leaked_processes, guard.leaked_processes


def test_simulator_runs_admission_and_refuses_outsiders() -> None:
    """The simulator with ``admission = "secret"`` and two outsiders (the run id and every peer id, no
    secret): the outsiders' requests and records are refused and counted, and the run's own rows are those
    of the same run without them (nobody merged an outsider's model)."""
    from simulator.runner import SimConfig, run_simulation

    base = {"nodes": 4, "rounds": 3, "topology": "gossip", "admission": "secret", "run_secret": SECRET.decode()}
    with_outsiders = run_simulation(SimConfig.of(**base, outsiders=2))
    alone = run_simulation(SimConfig.of(**base))
    refused = with_outsiders["outsider_refusals"]
    assert refused["transport"] > 0 and refused["directory"] > 0, refused
    assert with_outsiders["outsiders"] == ["node-0004", "node-0005"]
    assert with_outsiders["config"]["run_secret"] == "***"
    assert [r["accuracy"] for r in with_outsiders["rounds"]] == [r["accuracy"] for r in alone["rounds"]]
    with pytest.raises(ConfigError, match="outsiders need admission=secret"):
        SimConfig.of(nodes=4, outsiders=1).outsider_config(0)
