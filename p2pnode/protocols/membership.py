"""MoDeST's population view: who is in the run, whether they joined or left, and when they were last heard.

Spec: ``algorithms.md`` section 3.2 (de Vos et al. 2023, "MoDeST", and the authors' latest code).

Each node keeps a map ``peer_id -> (last_active_round, membership_index, status)``:

- ``last_active_round``: the last round in which the peer was heard from (``-1``: never). A peer counts
  as active for round ``k`` when it has not left and ``last_active_round >= k - inactivity_threshold``;
  the node itself always counts.
- ``membership_index``: the peer's own counter, incremented on every join or leave it announces.
- ``status``: ``JOIN`` or ``LEAVE``.

Merge rule (for views piggybacked on model transfers): unknown peers are adopted as they are; for known
peers ``last_active_round`` takes the maximum, and ``(index, status)`` is replaced only by a strictly
larger index. When two views carry the same index with different statuses (only possible through a bug
or a forged view), ``LEAVE`` wins, so that the merge is a join on a semilattice: commutative,
associative and idempotent, and it never lowers ``last_active_round``.

Joins are not applied on receipt: they wait in a *pending* buffer and are applied just before this node
next sends a model (`flush_pending`), so that a newcomer enters the views of a sample together with the
model and the view it carries, never in the middle of a round. Leaves are applied at once.

Views are plain data; they never talk to the network. `to_proto` / `from_proto` convert them to the wire
form (`p2pnode.proto.peer_pb2.MembershipView`), and `from_proto` refuses malformed input with
`BadMessage` (oversized, duplicate or invalid ids, out-of-range numbers).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from p2pnode.errors import BadMessage
from p2pnode.proto import peer_pb2

JOIN = peer_pb2.MEMBER_JOIN
LEAVE = peer_pb2.MEMBER_LEAVE

#: Most entries a received view may hold.
MAX_VIEW_ENTRIES = 100_000
#: Longest peer id accepted in a view, in characters (libp2p ids are about 52).
MAX_PEER_ID_CHARS = 128
#: Largest round or membership index accepted on the wire (2^48: far beyond any real run).
MAX_WIRE_NUMBER = 1 << 48


@dataclass(frozen=True, order=True)
class Entry:
    """What a view knows about one peer.

    :param last_active_round: last round the peer was heard from (-1: never).
    :param index: the peer's membership counter (see the module docstring).
    :param status: ``JOIN`` or ``LEAVE`` (`peer_pb2.MemberStatus`).
    """

    last_active_round: int
    index: int
    status: int

    def merged(self, other: Entry) -> Entry:
        """The merge of two entries for the same peer (commutative, associative, idempotent)."""
        active = max(self.last_active_round, other.last_active_round)
        # (index, status) with LEAVE (1) above JOIN (0) at equal index: a total order, so max() is a join.
        index, status = max((self.index, self.status), (other.index, other.status))
        return Entry(active, index, status)


class View:
    """A population view with a pending-join buffer.

    :param owner: this node's peer id; it always counts as active.
    :param inactivity_threshold: rounds without activity after which a peer leaves the active set
        (default 50, the authors' default; their simulations used 1000).
    """

    def __init__(self, owner: str, inactivity_threshold: int = 50) -> None:
        self.owner = owner
        self.inactivity_threshold = inactivity_threshold
        self._entries: dict[str, Entry] = {}
        self._pending: dict[str, Entry] = {}
        self._max_active = -1  # kept incrementally: activity never decreases

    # -- reading ------------------------------------------------------------------------------------
    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._entries

    def knows(self, peer_id: str) -> bool:
        """Whether `peer_id` is in the view or has a join pending (held until the next model send)."""
        return peer_id in self._entries or peer_id in self._pending

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def get(self, peer_id: str) -> Entry | None:
        return self._entries.get(peer_id)

    def entries(self) -> dict[str, Entry]:
        """A copy of the applied entries, keyed by peer id."""
        return dict(self._entries)

    @property
    def pending(self) -> dict[str, Entry]:
        """A copy of the joins received but not yet applied."""
        return dict(self._pending)

    def max_active_round(self) -> int:
        """The largest ``last_active_round`` in the view (-1 when empty)."""
        return self._max_active

    def active(self, round_: int) -> list[str]:
        """Peers active for round `round_`, sorted: not left, heard from within the inactivity threshold.

        The owner is always included.
        """
        floor = round_ - self.inactivity_threshold
        out = {p for p, e in self._entries.items() if e.status != LEAVE and e.last_active_round >= floor}
        out.add(self.owner)
        return sorted(out)

    def joined(self) -> list[str]:
        """Peers whose latest known status is JOIN (any activity), sorted."""
        return sorted(p for p, e in self._entries.items() if e.status != LEAVE)

    # -- writing ------------------------------------------------------------------------------------
    def set(self, peer_id: str, entry: Entry) -> None:
        """Merge `entry` for `peer_id` into the applied view."""
        old = self._entries.get(peer_id)
        new = entry if old is None else old.merged(entry)
        self._entries[peer_id] = new
        self._max_active = max(self._max_active, new.last_active_round)

    def heard_from(self, peer_id: str, round_: int) -> None:
        """Record activity of `peer_id` in round `round_` (never lowers it; unknown peers are not added)."""
        old = self._entries.get(peer_id)
        if old is not None and round_ > old.last_active_round:
            self._entries[peer_id] = Entry(round_, old.index, old.status)
            self._max_active = max(self._max_active, round_)

    def merge(self, other: Mapping[str, Entry] | View) -> None:
        """Merge another view (or entries) into this one, by the rule in the module docstring."""
        items = other.entries() if isinstance(other, View) else other
        for peer_id in sorted(items):
            self.set(peer_id, items[peer_id])

    def receive_join(self, peer_id: str, entry: Entry) -> None:
        """Hold a JOIN until the next `flush_pending` (the next model send)."""
        old = self._pending.get(peer_id)
        self._pending[peer_id] = entry if old is None else old.merged(entry)

    def receive_leave(self, peer_id: str, entry: Entry) -> None:
        """Apply a LEAVE at once (a pending join of the same peer with a lower index is dropped)."""
        self.set(peer_id, entry)
        pending = self._pending.get(peer_id)
        if pending is not None and (pending.index, pending.status) <= (entry.index, entry.status):
            del self._pending[peer_id]

    def flush_pending(self) -> list[str]:
        """Apply the pending joins; return the peers they concerned, sorted."""
        applied = sorted(self._pending)
        for peer_id in applied:
            self.set(peer_id, self._pending[peer_id])
        self._pending.clear()
        return applied

    # -- wire ---------------------------------------------------------------------------------------
    def to_proto(self) -> peer_pb2.MembershipView:
        """The applied view as a protobuf message, entries sorted by peer id."""
        msg = peer_pb2.MembershipView()
        for peer_id in sorted(self._entries):
            e = self._entries[peer_id]
            msg.entries.add(peer_id=peer_id, last_active_round=e.last_active_round, index=e.index,
                            status=e.status)  # type: ignore[arg-type]
        return msg


def check_peer_id(peer_id: str) -> None:
    """Refuse an empty, oversized or non-printable peer id (`BadMessage`, code ``malformed``)."""
    if not peer_id or len(peer_id) > MAX_PEER_ID_CHARS or not peer_id.isprintable():
        raise BadMessage(f"invalid peer id {peer_id[:40]!r} in a membership view", code="malformed")


def from_proto(msg: peer_pb2.MembershipView, *, max_round: int | None = None) -> dict[str, Entry]:
    """Entries of a received view, checked.

    :param max_round: when given, ``last_active_round`` values above it are clamped to it: a peer cannot
        vouch for activity in rounds it has not reached itself (its claimed round estimate).

    Raises `BadMessage` (code ``malformed``) for too many entries, duplicate or invalid ids, unknown
    statuses, or numbers out of range.
    """
    if len(msg.entries) > MAX_VIEW_ENTRIES:
        raise BadMessage(f"membership view of {len(msg.entries)} entries; the limit is {MAX_VIEW_ENTRIES}",
                         code="malformed")
    out: dict[str, Entry] = {}
    for e in msg.entries:
        check_peer_id(e.peer_id)
        if e.peer_id in out:
            raise BadMessage(f"peer {e.peer_id[:40]!r} appears twice in a membership view", code="malformed")
        if e.status not in (JOIN, LEAVE):
            raise BadMessage(f"unknown membership status {e.status}", code="malformed")
        if not -1 <= e.last_active_round < MAX_WIRE_NUMBER or e.index >= MAX_WIRE_NUMBER:
            raise BadMessage("membership view entry out of range", code="malformed")
        active = e.last_active_round if max_round is None else min(e.last_active_round, max_round)
        out[e.peer_id] = Entry(int(active), int(e.index), int(e.status))
    return out


def initial_view(owner: str, peers: Iterable[str], *, round_: int = 0, inactivity_threshold: int = 50) -> View:
    """A bootstrap view: `owner` and every peer in `peers` as ``(round_, 0, JOIN)``."""
    view = View(owner, inactivity_threshold)
    for p in sorted({*peers, owner}):
        view.set(p, Entry(round_, 0, JOIN))
    return view
