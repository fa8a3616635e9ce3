"""Invite tokens: one line that carries what a new peer needs to join a run.

``p2pnode invite`` prints a token ``p2pn1:<base64url>``; ``p2pnode join <token>`` starts a node with
everything in it (flags still override). The token holds, as compact JSON followed by an 8-byte
SHA-256 checksum:

- the run id, the run-wide options (task, topology, rule, ... everything hashed into the config hash)
  and the config hash itself, so that the joiner's config is checked to be the run's;
- bootstrap multiaddrs (the inviting node's addresses and its initial peers);
- the admission mode, the run key derived from the secret (never the secret itself) and the allowlist.

A token of a run with a secret admits whoever holds it: keep it like a password. The checksum catches a
token that was cut or altered in transit (a clear refusal instead of a node that joins the wrong run);
it is no signature: whoever holds a token can make another.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from p2pnode.config import NodeConfig
from p2pnode.errors import ConfigError

#: Prefix of a token; the digit is the format's version.
TOKEN_PREFIX = "p2pn1:"
#: Bytes of the checksum after the JSON payload.
CHECKSUM_BYTES = 8
#: Longest token accepted, in characters (a token holds a few addresses and options).
MAX_TOKEN_CHARS = 16 * 1024
#: `NodeConfig` field -> option key of `p2pnode run`, where the two differ.
_OPTION_KEYS = {"model_seed_mode": "init", "aggregation_timeout_s": "aggregation_timeout"}


@dataclass(frozen=True)
class Invite:
    """What a token carries.

    Args:
        run_id: the run.
        config_hash: the run's config hash (`NodeConfig.config_hash`).
        run: the run-wide `NodeConfig` fields (those hashed into `config_hash`).
        peers: bootstrap multiaddrs.
        admission: ``open``, ``secret`` or ``allowlist``.
        key: the run key (URL-safe base64), or None in a run without a secret.
        allow: the allowlist (the inviter's list plus the inviter itself), empty without one.
    """

    run_id: str
    config_hash: str
    run: dict[str, Any]
    peers: tuple[str, ...]
    admission: str = "open"
    key: str | None = None
    allow: tuple[str, ...] = field(default_factory=tuple)


def run_fields(config: NodeConfig) -> dict[str, Any]:
    """The run-wide fields of `config`: exactly those that `NodeConfig.config_hash` hashes."""
    return config.run_fields()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_invite(config: NodeConfig, peers: list[str], *, inviter: str | None = None) -> Invite:
    """The invite of `config`'s run with bootstrap `peers`; `inviter` (a peer id) joins the allowlist."""
    key = config.admission_key_bytes()
    allow = list(config.allow_peers)
    if config.admission == "allowlist" or allow:
        allow += [inviter] if inviter and inviter not in allow else []
    return Invite(run_id=config.run_id, config_hash=config.config_hash, run=run_fields(config),
                  peers=tuple(dict.fromkeys(peers)), admission=config.admission,
                  key=None if key is None else _b64(key), allow=tuple(allow))


def encode_token(invite: Invite) -> str:
    """``p2pn1:`` + URL-safe base64 of the JSON payload and its checksum."""
    payload = json.dumps({"v": 1, "run_id": invite.run_id, "hash": invite.config_hash, "run": invite.run,
                          "peers": list(invite.peers), "admission": invite.admission, "key": invite.key,
                          "allow": list(invite.allow)}, sort_keys=True, separators=(",", ":"),
                         default=list).encode()
    return TOKEN_PREFIX + _b64(payload + hashlib.sha256(payload).digest()[:CHECKSUM_BYTES])


def decode_token(token: str) -> Invite:
    """Parse and check a token.

    Raises:
        ConfigError: the token is not one (prefix), was cut or altered (checksum), or is malformed.
    """
    text = token.strip()
    if not text.startswith(TOKEN_PREFIX):
        raise ConfigError(f"not an invite token: it must start with {TOKEN_PREFIX!r} (made by `p2pnode invite`)")
    if len(text) > MAX_TOKEN_CHARS:
        raise ConfigError(f"invite token of {len(text)} characters; the longest accepted is {MAX_TOKEN_CHARS}")
    try:
        raw = _unb64(text[len(TOKEN_PREFIX):])
    except (binascii.Error, ValueError):
        raise ConfigError("invite token is damaged: it is not URL-safe base64; copy it again in full") from None
    payload, checksum = raw[:-CHECKSUM_BYTES], raw[-CHECKSUM_BYTES:]
    if len(raw) <= CHECKSUM_BYTES or hashlib.sha256(payload).digest()[:CHECKSUM_BYTES] != checksum:
        raise ConfigError("invite token is damaged or was altered (checksum mismatch); copy it again in full")
    try:
        data = json.loads(payload)
        if not isinstance(data, dict) or data.get("v") != 1:
            raise ValueError(f"format version {data.get('v') if isinstance(data, dict) else '?'}, expected 1")
        run = data["run"]
        peers, allow, key = data["peers"], data.get("allow", []), data.get("key")
        if not isinstance(run, dict) or not all(isinstance(p, str) for p in [*peers, *allow]):
            raise ValueError("run options or addresses of the wrong type")
        if key is not None and not isinstance(key, str):
            raise ValueError("key of the wrong type")
        return Invite(run_id=str(data["run_id"]), config_hash=str(data["hash"]), run=run, peers=tuple(peers),
                      admission=str(data["admission"]), key=key, allow=tuple(allow))
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"invite token is malformed: {e}") from None


def option_values(invite: Invite) -> dict[str, Any]:
    """The invite as option values of `p2pnode run` (option key -> value as click would give it)."""
    out: dict[str, Any] = {"run_id": invite.run_id, "admission": invite.admission}
    for name, value in invite.run.items():
        if name in ("rule_params", "task_options"):
            out[name] = tuple(f"{k}={json.dumps(v)}" for k, v in dict(value).items())
        else:
            out[_OPTION_KEYS.get(name, name)] = value
    if invite.key is not None:
        out["admission_key"] = invite.key
    if invite.allow:
        out["allow_peers"] = tuple(invite.allow)
    return out


def differences(config: NodeConfig, invite: Invite) -> list[str]:
    """Run-wide fields where `config` differs from the invite's run, as ``key=ours (run: theirs)``."""
    ours = run_fields(config)
    keys = sorted(set(ours) | set(invite.run))
    return [f"{k}={ours.get(k)!r} (run: {invite.run.get(k)!r})" for k in keys
            if json.dumps(ours.get(k), default=list, sort_keys=True)
            != json.dumps(invite.run.get(k), default=list, sort_keys=True)]


__all__ = ["TOKEN_PREFIX", "Invite", "decode_token", "differences", "encode_token", "make_invite",
           "option_values", "run_fields"]
