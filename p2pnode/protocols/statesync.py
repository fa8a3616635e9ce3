"""Late joiner state sync: a node that joins a run late fetches the current model from peers.

Serving (`StateSyncServer`): every node serves a snapshot of its model as of its last completed
round. A snapshot is the model's tensors as raw little-endian bytes laid end to end (in the order of
the manifest's tensor list), cut into chunks of ``chunk_bytes``; the manifest lists the tensors, one
SHA-256 per chunk, and ``model_sha256``, the SHA-256 of the concatenated chunk hashes, which names the
snapshot. Snapshots are built lazily, on the first request after a round, and the last `keep` are
kept so that a download that started on one snapshot can finish while the server moves on.

Fetching (`fetch_state`):

1. Ask the most advanced peers (by the round in their directory records, at most ``sources``) for
   their manifests, in parallel. Manifests of another run or config, or whose tensors differ from
   this node's model (names, dtypes, shapes, order), or that are inconsistent, are refused and counted.
2. Group the manifests by ``model_sha256``: peers in one group serve byte-identical models (equal
   snapshots hash equally), so their chunks are interchangeable. Take the group with the highest round
   (then the most peers).
3. Fetch the chunks with ``parallel`` requests in flight, spread over the group's peers; each chunk's
   SHA-256 is checked on arrival. A chunk that fails (timeout, refusal, wrong hash or size) is fetched
   again from another peer of the group; a peer that fails ``max_peer_failures`` times is dropped.
4. If the group runs out of peers, fall back to the next group. Chunks already verified are reused
   wherever another manifest lists the same hash at the same place (content addressing), so a switch
   of source resumes rather than restarts whenever the bytes are the same.
5. Assemble the tensors and check them against the model (names, shapes, dtypes, finiteness).

In a gossip run each peer's model differs from the others' (they are merged with different peers),
so groups usually hold one peer and the fetch is from the most advanced peer, falling back to the next
one; with protocols whose peers hold the same model after a round (an all-reduce, or the members of one
MoDeST sample), the chunks come from several peers at once.

The same code runs over the in-memory network in the simulator (off by default there).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from p2pnode.discovery import PeerInfo
from p2pnode.errors import BadMessage, TransportError
from p2pnode.proto import peer_pb2, statesync_pb2
from p2pnode.transport import Message, Transport
from p2pnode.transport.codec import DTYPE_NAMES, DTYPES, check_tensors

logger = logging.getLogger(__name__)

MANIFEST = "statesync.manifest"
CHUNK = "statesync.chunk"
#: Default chunk size, in bytes (1 MiB: large enough to amortize a request, small enough to retry).
DEFAULT_CHUNK_BYTES = 1 << 20
#: Most chunks a manifest may list (caps the memory a malicious manifest can make us reserve).
MAX_CHUNKS = 1 << 20

Spec = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape) if shape else 1


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return _numel(shape) * dtype.itemsize


def _raw(t: torch.Tensor) -> memoryview:
    """The raw (little-endian, on the hosts torch supports) bytes of `t`, without a copy when it is on the CPU."""
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else memoryview(b"")  # type: ignore[arg-type]


@dataclass
class Snapshot:
    """One served model version: its bytes, chunk hashes and name (`model_sha256`)."""

    round: int
    data: bytearray
    specs: list[tuple[str, str, tuple[int, ...]]]
    chunk_bytes: int
    chunk_sha256: list[bytes]
    model_sha256: bytes

    @classmethod
    def build(cls, round_: int, state: Mapping[str, torch.Tensor], chunk_bytes: int) -> Snapshot:
        # One copy of the model: each tensor's bytes go straight into their place in the buffer.
        data = bytearray(sum(t.numel() * t.element_size() for t in state.values()))
        offset = 0
        for t in state.values():
            raw = _raw(t)
            data[offset:offset + raw.nbytes] = raw
            offset += raw.nbytes
        hashes = [hashlib.sha256(memoryview(data)[i:i + chunk_bytes]).digest()
                  for i in range(0, len(data), chunk_bytes)]
        specs = [(name, DTYPE_NAMES[t.dtype], tuple(t.shape)) for name, t in state.items()]
        return cls(round_, data, specs, chunk_bytes, hashes, hashlib.sha256(b"".join(hashes)).digest())

    def manifest(self, run_id: str, config_hash: str) -> statesync_pb2.SyncManifest:
        return statesync_pb2.SyncManifest(
            run_id=run_id, config_hash=config_hash, round=self.round, total_bytes=len(self.data),
            chunk_bytes=self.chunk_bytes, chunk_sha256=self.chunk_sha256, model_sha256=self.model_sha256,
            tensors=[peer_pb2.TensorSpec(name=n, dtype=d, shape=list(s)) for n, d, s in self.specs])

    def chunk(self, index: int) -> memoryview:
        start = index * self.chunk_bytes
        return memoryview(self.data)[start:start + self.chunk_bytes]


class StateSyncServer:
    """Serves this node's model to joining peers (methods ``statesync.manifest`` and ``statesync.chunk``).

    :param transport: where to serve; the handlers are registered at once.
    :param run_id: the run; requests of another run or config are refused (``wrong_run``).
    :param config_hash: the run config hash.
    :param chunk_bytes: chunk size, in bytes (default 1 MiB).
    :param keep: snapshots kept for downloads in progress (default 2: the current and the previous one).
    """

    def __init__(self, transport: Transport, *, run_id: str, config_hash: str,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, keep: int = 2) -> None:
        self.transport = transport
        self.run_id = run_id
        self.config_hash = config_hash
        self.chunk_bytes = chunk_bytes
        self.keep = keep
        self._pending: tuple[int, Mapping[str, torch.Tensor]] | None = None
        self._snapshots: collections.OrderedDict[bytes, Snapshot] = collections.OrderedDict()
        #: Manifests and chunks served since start (for monitoring and tests).
        self.manifests_served = 0
        self.chunks_served = 0
        transport.register(MANIFEST, statesync_pb2.SyncManifestRequest, self._on_manifest)
        transport.register(CHUNK, statesync_pb2.SyncChunkRequest, self._on_chunk)

    def publish(self, round_: int, state: Mapping[str, torch.Tensor]) -> None:
        """Serve `state` as the model of round `round_` from now on.

        `state` must not change afterwards (pass copies, as `Trainer.state` returns). The snapshot's
        bytes and hashes are computed on the first request, so publishing costs nothing when nobody joins.
        """
        self._pending = (round_, state)

    def _current(self) -> Snapshot | None:
        if self._pending is not None:
            round_, state = self._pending
            self._pending = None
            snap = Snapshot.build(round_, state, self.chunk_bytes)
            self._snapshots.pop(snap.model_sha256, None)
            self._snapshots[snap.model_sha256] = snap
            while len(self._snapshots) > self.keep:
                self._snapshots.popitem(last=False)
        return next(reversed(self._snapshots.values())) if self._snapshots else None

    def _check_run(self, sender: str, run_id: str, config_hash: str) -> None:
        if run_id != self.run_id or config_hash != self.config_hash:
            raise BadMessage(f"{sender} asks for the model of run {run_id!r} config {config_hash!r}; this node is "
                             f"in run {self.run_id!r} config {self.config_hash!r}", code="wrong_run")

    async def _on_manifest(self, sender: str, msg: Message[statesync_pb2.SyncManifestRequest]
                           ) -> Message[statesync_pb2.SyncManifest]:
        self._check_run(sender, msg.body.run_id, msg.body.config_hash)
        snap = self._current()
        if snap is None:
            raise TransportError("this node has no model to serve yet", code="unavailable")
        self.manifests_served += 1
        return Message(snap.manifest(self.run_id, self.config_hash))

    async def _on_chunk(self, sender: str, msg: Message[statesync_pb2.SyncChunkRequest]
                        ) -> Message[statesync_pb2.SyncChunk]:
        body = msg.body
        self._check_run(sender, body.run_id, body.config_hash)
        self._current()  # a request may come right after a publish
        snap = self._snapshots.get(bytes(body.model_sha256))
        if snap is None:
            # Not the sender's fault: this node moved on and dropped that snapshot. Not counted as rejected.
            raise TransportError("snapshot no longer served; ask for a fresh manifest", code="stale")
        if body.index >= len(snap.chunk_sha256):
            raise BadMessage(f"chunk {body.index} asked; the snapshot has {len(snap.chunk_sha256)}",
                             code="malformed")
        view = snap.chunk(body.index)
        self.chunks_served += 1
        data = torch.frombuffer(view, dtype=torch.uint8) if view.nbytes else torch.empty(0, dtype=torch.uint8)
        return Message(statesync_pb2.SyncChunk(model_sha256=snap.model_sha256, index=body.index), {"data": data})


# ------------------------------------------------------------------------------------------- fetching
@dataclass
class SyncResult:
    """A fetched model.

    :param round: the round of the model (the serving peers' completed rounds).
    :param state: the model's tensors, checked against the local model.
    :param sources: peers whose manifest named this model.
    :param chunks_from: chunks fetched from each peer (reused chunks are not counted).
    :param model_sha256: hex name of the model.
    :param bytes_fetched: chunk bytes received, in bytes (retries included).
    :param failed_chunks: chunk requests that failed and were retried.
    :param seconds: how long the fetch took, in seconds.
    """

    round: int
    state: dict[str, torch.Tensor]
    sources: list[str]
    chunks_from: dict[str, int]
    model_sha256: str
    bytes_fetched: int = 0
    failed_chunks: int = 0
    seconds: float = 0.0


@dataclass
class _Candidate:
    peers: list[str]
    manifest: statesync_pb2.SyncManifest
    layout: list[tuple[str, torch.dtype, tuple[int, ...]]] = field(default_factory=list)


def check_manifest(m: statesync_pb2.SyncManifest, *, run_id: str, config_hash: str, spec: Spec
                   ) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """Check a manifest against this run and this node's model; return its tensor layout.

    :raises BadMessage: another run (``wrong_run``), other tensors (``bad_shape``), or inconsistent sizes
        or hashes (``malformed``).
    """
    if m.run_id != run_id or m.config_hash != config_hash:
        raise BadMessage(f"manifest of run {m.run_id!r} config {m.config_hash!r}", code="wrong_run")
    layout: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    for t in m.tensors:
        if t.dtype not in DTYPES:
            raise BadMessage(f"manifest tensor {t.name!r} has unknown dtype {t.dtype!r}", code="bad_shape")
        layout.append((t.name, DTYPES[t.dtype], tuple(int(d) for d in t.shape)))
    expected = [(name, dtype, tuple(shape)) for name, (shape, dtype) in spec.items()]
    if sorted(layout, key=lambda x: x[0]) != sorted(expected, key=lambda x: x[0]):
        raise BadMessage("manifest tensors differ from this node's model", code="bad_shape")
    total = sum(_nbytes(shape, dtype) for _, dtype, shape in layout)
    if m.total_bytes != total:
        raise BadMessage(f"manifest says {m.total_bytes} bytes, its tensors need {total}", code="malformed")
    if m.chunk_bytes < 1 or (total and math.ceil(total / m.chunk_bytes) > MAX_CHUNKS):
        raise BadMessage(f"manifest chunk size {m.chunk_bytes} is unusable", code="malformed")
    if len(m.chunk_sha256) != math.ceil(total / m.chunk_bytes) or any(len(h) != 32 for h in m.chunk_sha256):
        raise BadMessage("manifest chunk hashes do not match its size", code="malformed")
    if m.model_sha256 != hashlib.sha256(b"".join(m.chunk_sha256)).digest():
        raise BadMessage("manifest model hash does not match its chunk hashes", code="malformed")
    return layout


async def _manifest(transport: Transport, peer: str, run_id: str, config_hash: str, spec: Spec,
                    timeout: float) -> _Candidate | None:
    try:
        resp = await transport.call(peer, MANIFEST, Message(statesync_pb2.SyncManifestRequest(
            run_id=run_id, config_hash=config_hash)), statesync_pb2.SyncManifest, timeout=timeout)
        layout = check_manifest(resp.body, run_id=run_id, config_hash=config_hash, spec=spec)
    except BadMessage as e:
        transport.reject(peer, e.code, f"state sync manifest: {e}")
        return None
    except TransportError as e:
        logger.info("state sync: %s did not give a manifest: %s", peer[-8:], e)
        return None
    return _Candidate([peer], resp.body, layout)


class _Download:
    """Fetches the chunks of one manifest from the peers of its group (see the module doc, step 3)."""

    def __init__(self, transport: Transport, cand: _Candidate, run_id: str, config_hash: str, *,
                 parallel: int, timeout: float, max_peer_failures: int, have: dict[bytes, memoryview]) -> None:
        self.transport, self.cand, self.run_id, self.config_hash = transport, cand, run_id, config_hash
        self.m = cand.manifest
        self.parallel, self.timeout, self.max_peer_failures = parallel, timeout, max_peer_failures
        self.have = have
        self.data = bytearray(self.m.total_bytes)
        self.peer_failures: collections.Counter[str] = collections.Counter()
        self.chunks_from: collections.Counter[str] = collections.Counter()
        self.bytes_fetched = 0
        self.failed_chunks = 0
        self._next_peer = 0

    def _size(self, index: int) -> int:
        return min(self.m.chunk_bytes, self.m.total_bytes - index * self.m.chunk_bytes)

    def _live_peers(self) -> list[str]:
        return [p for p in self.cand.peers if self.peer_failures[p] < self.max_peer_failures]

    def _pick(self, tried: set[str]) -> str | None:
        live = self._live_peers()
        fresh = [p for p in live if p not in tried] or live
        if not fresh:
            return None
        # Round-robin spreads the chunks over the group's peers.
        peer = fresh[self._next_peer % len(fresh)]
        self._next_peer += 1
        return peer

    async def _fetch(self, index: int, peer: str) -> bool:
        want = bytes(self.m.chunk_sha256[index])
        try:
            resp = await self.transport.call(peer, CHUNK, Message(statesync_pb2.SyncChunkRequest(
                run_id=self.run_id, config_hash=self.config_hash, model_sha256=self.m.model_sha256, index=index)),
                statesync_pb2.SyncChunk, timeout=self.timeout)
        except TransportError as e:
            logger.info("state sync: chunk %d from %s failed: %s", index, peer[-8:], e)
            return False
        data = resp.tensors.get("data")
        size = self._size(index)
        if (data is None or len(resp.tensors) != 1 or data.dtype != torch.uint8 or data.dim() != 1
                or data.numel() != size or resp.body.index != index):
            self.transport.reject(peer, "malformed", f"state sync chunk {index} has the wrong layout")
            return False
        raw = memoryview(data.numpy()) if size else memoryview(b"")  # type: ignore[arg-type]
        self.bytes_fetched += size
        if hashlib.sha256(raw).digest() != want:
            self.transport.reject(peer, "bad_hash", f"state sync chunk {index} does not match its SHA-256")
            return False
        start = index * self.m.chunk_bytes
        self.data[start:start + size] = raw
        # Verified bytes, by hash, for a later manifest that lists the same chunk (a view: no copy).
        self.have[want] = memoryview(self.data)[start:start + size]
        self.chunks_from[peer] += 1
        return True

    async def run(self, deadline: float) -> bool:
        """Fetch every chunk; True when all arrived verified before `deadline` (loop time)."""
        todo: collections.deque[int] = collections.deque()
        for index, h in enumerate(self.m.chunk_sha256):
            cached = self.have.get(bytes(h))
            if cached is not None and cached.nbytes == self._size(index):
                start = index * self.m.chunk_bytes
                self.data[start:start + cached.nbytes] = cached
            else:
                todo.append(index)
        tried: dict[int, set[str]] = collections.defaultdict(set)
        loop = asyncio.get_running_loop()

        async def worker() -> None:
            while todo:
                if not self._live_peers() or loop.time() >= deadline:
                    return
                index = todo.popleft()
                peer = self._pick(tried[index])
                if peer is None:
                    todo.appendleft(index)
                    return
                tried[index].add(peer)
                if not await self._fetch(index, peer):
                    self.failed_chunks += 1
                    self.peer_failures[peer] += 1
                    todo.append(index)  # retried, by preference from a peer that has not failed it

        workers = [asyncio.ensure_future(worker()) for _ in range(max(1, min(self.parallel, len(todo))))]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
        return not todo

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        offset = 0
        view = memoryview(self.data)
        for name, dtype, shape in self.cand.layout:
            n = _nbytes(shape, dtype)
            if n:
                chunk = view[offset:offset + n]
                out[name] = torch.frombuffer(chunk, dtype=torch.uint8).view(dtype).reshape(shape).clone()
            else:
                out[name] = torch.empty(shape, dtype=dtype)
            offset += n
        return out


async def fetch_state(transport: Transport, peers: Sequence[PeerInfo], *, run_id: str, config_hash: str,
                      spec: Spec, min_round: int = 0, sources: int = 4, parallel: int = 4,
                      request_timeout_s: float = 15.0, timeout_s: float = 300.0, max_peer_failures: int = 3,
                      rng: random.Random | None = None) -> SyncResult | None:
    """Fetch the model of the most advanced peers (see the module doc); None when no peer could give one.

    :param peers: candidate peers (directory records); only those whose record round is above `min_round`
        are asked.
    :param spec: this node's model (`Trainer.spec`): the fetched tensors must match it exactly.
    :param min_round: this node's own round: a model of that round or older is not fetched.
    :param sources: most peers asked for a manifest, most advanced first (default 4).
    :param parallel: chunk requests in flight at once (default 4).
    :param request_timeout_s: time allowed for one manifest or chunk request, in seconds (default 15).
    :param timeout_s: time allowed for the whole fetch, in seconds (default 300).
    :param max_peer_failures: failed chunk requests after which a peer is no longer asked (default 3).
    """
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    deadline = t0 + timeout_s
    rng = rng or random.Random()
    ahead = sorted((p for p in peers if p.round > min_round), key=lambda p: (-p.round, p.peer_id))[:sources]
    if not ahead:
        return None
    found = await asyncio.gather(*(_manifest(transport, p.peer_id, run_id, config_hash, spec, request_timeout_s)
                                   for p in ahead))
    groups: dict[bytes, _Candidate] = {}
    for cand in found:
        if cand is None or cand.manifest.round <= min_round:
            continue
        key = bytes(cand.manifest.model_sha256)
        if key in groups:
            groups[key].peers.extend(cand.peers)
        else:
            groups[key] = cand
    ordered = sorted(groups.values(), key=lambda c: (-c.manifest.round, -len(c.peers)))
    have: dict[bytes, memoryview] = {}
    fetched = failed = 0
    for cand in ordered:
        if loop.time() >= deadline:
            break
        rng.shuffle(cand.peers)
        dl = _Download(transport, cand, run_id, config_hash, parallel=parallel, timeout=request_timeout_s,
                       max_peer_failures=max_peer_failures, have=have)
        complete = await dl.run(deadline)
        fetched += dl.bytes_fetched
        failed += dl.failed_chunks
        if not complete:
            logger.warning("state sync: the model %s of round %d could not be fetched from %d peer(s); trying the "
                           "next one", cand.manifest.model_sha256.hex()[:12], cand.manifest.round, len(cand.peers))
            continue
        state = dl.tensors()
        try:
            check_tensors(state, spec)
        except BadMessage as e:  # e.g. NaN in a peer's model: hashes only prove we got what it holds
            for p in cand.peers:
                transport.reject(p, e.code, f"state sync model: {e}")
            continue
        return SyncResult(round=int(cand.manifest.round), state={k: state[k] for k in spec},
                          sources=sorted(cand.peers), chunks_from=dict(dl.chunks_from),
                          model_sha256=cand.manifest.model_sha256.hex(), bytes_fetched=fetched,
                          failed_chunks=failed, seconds=loop.time() - t0)
    return None


__all__ = ["CHUNK", "MANIFEST", "Snapshot", "StateSyncServer", "SyncResult", "check_manifest", "fetch_state"]
