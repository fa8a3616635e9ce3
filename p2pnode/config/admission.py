"""Who may fetch and push the run's models, and the run key that proves it (`AdmissionSettings`;
`p2pnode.transport.admission` enforces it)."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path

from p2pnode.config.choices import ADMISSION_MODES
from p2pnode.config.run import RunSettings
from p2pnode.config.schema import setting
from p2pnode.errors import ConfigError


@dataclass
class AdmissionSettings(RunSettings):
    """Section ``admission`` (local: never hashed; the secret never leaves this node).

    A `RunSettings`: the run key is derived from the secret and the run id (`admission_key_bytes`).
    """

    #: Who may fetch and push this run's models: ``open`` (default: the run's models are public; anyone who
    #: knows the run id can fetch and push models), ``secret`` (only peers holding the run's secret) or
    #: ``allowlist`` (only the peers in `allow_peers`; may be combined with a secret). See docs/daemon.md.
    admission: str = setting(
        default="open", section="admission",
        help="Who may fetch and push the run's models. open: the run's models are public: anyone who knows the run id "
             "can fetch and push models. secret: only peers holding the run's secret. allowlist: only the peers of "
             "--allow-peers (may be combined with a secret).",
        choices=ADMISSION_MODES)
    #: The run's secret (at least 16 bytes), for ``admission = "secret"``; prefer `run_secret_file`, since a
    #: command line is visible to other users of the machine. Never printed, never sent.
    run_secret: str | None = setting(
        default=None, repr=False, section="admission",
        help="The run's secret itself (visible to other users in the process list: prefer --run-secret-file or the "
             "P2PNODE_RUN_SECRET environment variable).",
        metavar="SECRET", secret=True)
    #: File holding the run's secret (surrounding whitespace ignored).
    run_secret_file: str | None = setting(
        default=None, section="admission",
        help="File holding the run's secret (at least 16 bytes; preferred over --run-secret).", metavar="FILE")
    #: Peer ids admitted with ``admission = "allowlist"`` (or in addition to a secret).
    allow_peers: list[str] = setting(
        default_factory=list, section="admission",
        help="Peer ids admitted with --admission allowlist (comma-separated, repeatable).", metavar="ID1,ID2")
    #: The run key itself (URL-safe base64 of 32 bytes), as an invite token carries it, instead of a secret.
    admission_key: str | None = setting(
        default=None, repr=False, section="admission",
        help="The run key itself (URL-safe base64 of 32 bytes), as an invite token carries it; instead of a secret.",
        metavar="KEY", secret=True)

    def _validate_admission(self) -> None:
        if self.admission not in ADMISSION_MODES:
            raise ConfigError(f"admission={self.admission!r}; allowed: {', '.join(ADMISSION_MODES)}")
        given = [k for k in ("run_secret", "run_secret_file", "admission_key") if getattr(self, k)]
        if len(given) > 1:
            raise ConfigError(f"{' and '.join(given)} are both set; allowed: one source of the run's secret")
        if self.admission == "open" and (given or self.allow_peers):
            what = given[0] if given else "allow_peers"
            raise ConfigError(f"{what} is set but admission=open serves everyone; use --admission "
                              f"{'secret' if given else 'allowlist'} (or drop {what})")
        if self.admission == "secret" and not given:
            raise ConfigError("admission=secret needs the run's secret: --run-secret-file FILE (preferred) or "
                              "--run-secret (or join with an invite token)")
        if self.admission == "allowlist" and not self.allow_peers:
            raise ConfigError("admission=allowlist needs --allow-peers ID1,ID2,... (the peer ids it serves)")
        if any(not isinstance(p, str) or not p.strip() for p in self.allow_peers):
            raise ConfigError(f"allow_peers={self.allow_peers}: every entry must be a peer id")
        if given:
            self.admission_key_bytes()  # reads the file and checks the secret now, not at the first request

    def admission_key_bytes(self) -> bytes | None:
        """The run key (32 bytes) derived from the secret (or given by an invite token); None without one.

        Raises:
            ConfigError: the secret file cannot be read, the secret is too short, or the key is malformed.
        """
        from p2pnode.transport.admission import KEY_BYTES, MIN_SECRET_BYTES, derive_key

        if self.admission_key:
            try:
                key = base64.urlsafe_b64decode(self.admission_key + "=" * (-len(self.admission_key) % 4))
            except (binascii.Error, ValueError) as e:
                raise ConfigError(f"admission_key is not URL-safe base64: {e}") from None
            if len(key) != KEY_BYTES:
                raise ConfigError(f"admission_key holds {len(key)} bytes, expected {KEY_BYTES}")
            return key
        secret: bytes | None = None
        if self.run_secret_file:
            path = Path(self.run_secret_file).expanduser()
            try:
                secret = path.read_bytes().strip()
            except OSError as e:
                raise ConfigError(f"run_secret_file={str(path)!r}: cannot read it: {e.strerror or e}") from None
            where = f"the file {path}"
        elif self.run_secret:
            secret = self.run_secret.encode()
            where = "run_secret"
        if secret is None:
            return None
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(f"the run secret in {where} has {len(secret)} bytes; at least {MIN_SECRET_BYTES} are "
                              f"needed (records' MACs are public, so a short secret can be guessed): make one with "
                              f"`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        return derive_key(secret, self.run_id)
