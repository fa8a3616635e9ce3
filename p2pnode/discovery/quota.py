"""A per-key quota of subkeys in a hivemind DHT node's local storage (runs inside the DHT process).

hivemind stores every record that passes its validators, and a read of a key returns (and a replica
serves) the whole dictionary under it, so an outsider who stores thousands of subkeys under a run's
directory key makes every replica store them and every read carry them. A record validator cannot bound
that by itself: hivemind also runs validators on the dictionaries other nodes return to a search, and
one refused record there drops the whole reply. So the quota sits where records are stored:
`install_quota` wraps the storage's ``store_subkey`` (which both ``rpc_store`` and a node's own stores
go through) and refuses, under a limited key, a *new* subkey once the key holds ``limit`` live subkeys.

- A subkey already stored always passes: an honest peer re-storing its own record (every ``ttl / 3``) is
  never refused, nor is its tombstone.
- Subkeys leave by expiration only (hivemind prunes expired entries when the dictionary is counted), so
  the room that junk takes is given back at most ``2 * ttl`` after the junk stops being re-stored.
- While a flood keeps a key full, a *new* peer's record is refused on that replica too (the first
  ``limit`` subkeys are kept, whoever stored them); the limit should leave room for the swarm's growth.

Refusals are counted in `refusals` (``over_quota``), read from the DHT process like the validator's
(`p2pnode.discovery.dht_process.dht_refusals`).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Mapping
from typing import Any

from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue

#: Default most subkeys kept under one run's directory key on one DHT node. A record is at most 16 KiB,
#: so this bounds one run's records on a replica to 8 MiB and a read to 512 records; it fits swarms of a
#: few hundred peers with room for withdrawn (tombstoned) and restarted identities until they expire.
DEFAULT_MAX_SUBKEYS = 512

#: Subkeys refused for the quota in this process, by reason (``over_quota``).
refusals: collections.Counter[str] = collections.Counter()
os.register_at_fork(after_in_child=refusals.clear)  # a DHT process counts its own

_ATTR = "_p2pnode_subkey_quota"


class SubkeyQuota:
    """The quota installed on one `DHTLocalStorage` (see the module doc).

    :param storage: the DHT node's ``protocol.storage``.
    """

    def __init__(self, storage: Any) -> None:
        self.storage = storage
        #: DHT key id -> most live subkeys under it.
        self.limits: dict[DHTID, int] = {}
        self._store_subkey: Callable[..., bool] = storage.store_subkey

    def store_subkey(self, key: DHTID, subkey: Any, value: bytes, expiration_time: float) -> bool:
        limit = self.limits.get(key)
        if limit is not None:
            current = self.storage.get(key)
            if current is not None and isinstance(current.value, DictionaryDHTValue):
                held = current.value
                # `in` and `len` prune expired subkeys first: expiration is what frees room.
                if subkey not in held and len(held) >= limit:
                    refusals["over_quota"] += 1
                    return False
        return self._store_subkey(key, subkey, value, expiration_time)

    def count(self, key: DHTID) -> int:
        """Live subkeys under `key` in the storage now."""
        current = self.storage.get(key)
        return len(current.value) if current is not None and isinstance(current.value, DictionaryDHTValue) else 0


def install_quota(storage: Any, limits: Mapping[bytes, int]) -> SubkeyQuota:
    """Limit the subkeys of `storage` under each key id (bytes) of `limits` (idempotent: installed once
    per storage; limits of several runs merge, the larger one winning for a key)."""
    quota = getattr(storage, _ATTR, None)
    if quota is None:
        quota = SubkeyQuota(storage)
        setattr(storage, _ATTR, quota)
        storage.store_subkey = quota.store_subkey  # the instance attribute shadows the method for every caller
    for key, limit in limits.items():
        key_id = DHTID.from_bytes(key)
        quota.limits[key_id] = max(limit, quota.limits.get(key_id, 0))
    assert isinstance(quota, SubkeyQuota)
    return quota
