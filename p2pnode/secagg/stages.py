"""The closed set of stages of one instance, in their fixed order, and their wire methods."""

from __future__ import annotations

import enum


class Stage(enum.IntEnum):
    """A stage of the protocol. The order is fixed: advertise, share, masked, unmask."""

    #: Users send their ephemeral public keys; the aggregator broadcasts the list (U1).
    ADVERTISE = 0
    #: Users send encrypted Shamir shares for their neighbours; the aggregator relays them (U2).
    SHARE = 1
    #: Users send their masked input; the aggregator announces whose input counts (U3).
    MASKED = 2
    #: Users reveal self-mask shares of survivors and mask-key shares of dropped users (U5).
    UNMASK = 3

    @property
    def label(self) -> str:
        """Lower-case name used in messages, settings and `run_local`'s `drop` argument."""
        return self.name.lower()

    @property
    def method(self) -> str:
        """The transport method that carries this stage's user message."""
        return f"secagg.{self.label}"

    @classmethod
    def parse(cls, name: str) -> Stage:
        """The stage named `name` (``advertise``, ``share``, ``masked`` or ``unmask``)."""
        for s in cls:
            if s.label == name:
                return s
        raise ValueError(f"unknown secagg stage {name!r}; stages: {', '.join(s.label for s in cls)}")


#: The stages in protocol order.
STAGES: tuple[Stage, ...] = tuple(Stage)


class Status(enum.Enum):
    """Where an instance stands."""

    RUNNING = "running"
    DONE = "done"
    ABORTED = "aborted"
