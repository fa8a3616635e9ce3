"""Talking to hivemind's DHT process: the coroutines a `DHTDirectory` runs inside it, and the wait for
an answer that notices when the process has died.

hivemind runs the DHT node in a forked child process; ``dht.run_coroutine(fn)`` runs ``fn(dht, node)``
there and sends the result back. The functions named ``Runs inside the DHT process`` below are such
``fn``: they see the child's `DHTNode` and its module state (for example the refusal counters of
`msgpack_guard`, `validator` and `quota`, which each process counts on its own).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import hivemind
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.dht.validation import RecordValidatorBase

from p2pnode.discovery import msgpack_guard, quota
from p2pnode.discovery.quota import install_quota
from p2pnode.discovery.validator import RunRecordValidator, validator_refusals

T = TypeVar("T")

#: How often a request in flight checks that the DHT process is still alive, in seconds.
DEAD_CHECK_S = 0.5


async def add_validator(_dht: hivemind.DHT, node: Any, validator: RecordValidatorBase) -> None:
    """Runs inside the DHT process: add `validator` to the node's validators (merging duplicates), and
    install the subkey quota of a `RunRecordValidator` in the node's storage."""
    node.protocol.record_validator.extend([validator])
    if isinstance(validator, RunRecordValidator):
        install_quota(node.protocol.storage, validator.quotas)


async def stored_subkeys(_dht: hivemind.DHT, node: Any, key: str) -> int:
    """Runs inside the DHT process (``dht.run_coroutine(partial(stored_subkeys, key=...))``): how many
    live subkeys the node stores under `key`."""
    current = node.protocol.storage.get(DHTID.generate(source=key))
    value = None if current is None else current.value
    return len(value) if isinstance(value, DictionaryDHTValue) else 0


async def dht_refusals(_dht: hivemind.DHT, node: Any) -> dict[str, int]:
    """Runs inside the DHT process (``dht.run_coroutine(dht_refusals)``): what it refused, by reason.

    ``dht_decoder_<reason>``: values kept away from the msgpack decoder (`msgpack_guard`);
    ``dht_refused_<reason>``: records refused by `RunRecordValidator` and by the subkey quota
    (``dht_refused_over_quota``, `quota`).
    """
    out = {f"dht_decoder_{k}": v for k, v in msgpack_guard.refusals.items()}
    out.update({f"dht_refused_{k}": v for k, v in validator_refusals.items()})
    out.update({f"dht_refused_{k}": v for k, v in quota.refusals.items()})
    return out


async def dht_peer_id(_dht: hivemind.DHT, node: Any) -> str:
    """Runs inside the DHT process: this node's base58 peer id."""
    return str(node.peer_id.to_base58())


async def routing_peers(_dht: hivemind.DHT, node: Any) -> list[str]:
    """Runs inside the DHT process: the base58 peer ids of the node's routing table (the DHT servers it
    routes through, replacements included)."""
    return [str(peer.to_base58()) for peer in node.protocol.routing_table.peer_id_to_uid]


def process_alive(dht: hivemind.DHT) -> bool:
    """Whether the process of `dht` runs (True when this process cannot tell: not its parent)."""
    try:
        return bool(dht.is_alive())
    except (AssertionError, ValueError):
        return True


async def wait_for_dht(dht: hivemind.DHT, future: Awaitable[T], what: str, timeout: float) -> T:
    """Await a request to the process of `dht` for at most `timeout` seconds.

    A request sent to a DHT process that has died is never answered: it fails within `DEAD_CHECK_S` of
    the death instead of running into the timeout (the daemon restarts the process). On the way out
    (timeout, death, cancellation) the request is cancelled.

    :param what: what is asked, for the error message (``"get under run/peers"``).
    :raises TimeoutError: no answer within `timeout`.
    :raises ConnectionError: the DHT process died.
    """
    waiter = asyncio.ensure_future(future)
    try:
        async with asyncio.timeout(timeout):
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=DEAD_CHECK_S)
                if done:
                    return waiter.result()
                if not process_alive(dht):
                    raise ConnectionError(f"DHT {what}: the DHT process is gone")
    except TimeoutError:
        raise TimeoutError(f"DHT {what} took over {timeout} s") from None
    finally:
        if not waiter.done():
            waiter.cancel()
            cancel = getattr(future, "cancel", None)
            if cancel is not None:
                cancel()
