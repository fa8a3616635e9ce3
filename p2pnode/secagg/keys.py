"""Key agreement, seed derivation, share encryption and the binding of keys to identity and instance.

- **Key agreement:** X25519. Each user draws two ephemeral key pairs per instance: a *cipher* pair
  (its agreements encrypt the Shamir shares between users) and a *mask* pair (its agreements seed
  the pairwise masks). A public key whose agreement fails (a low-order point) is refused.
- **Seeds:** HKDF-SHA256 over the raw agreement, salted with the instance digest, with an ``info``
  naming the purpose and the two users' indices. So one agreement never seeds two things, and a
  seed of one instance is useless in any other.
- **Share encryption:** ChaCha20-Poly1305. The key is derived per direction (sender, recipient), and
  each such key encrypts exactly one message, so the all-zero nonce is never reused with a key. The
  associated data is the digest and both indices: a ciphertext cannot be moved to another instance
  or another pair, and only the two ends of a pair can produce a valid one (the aggregator that
  relays it cannot forge or alter it).
- **Binding to identity and instance:** a user signs (Ed25519, with its long-term identity key when
  the instance has identity keys) the instance digest (run, round, aggregator, sample, parameters),
  its index, its peer id, both public keys and its self-mask commitment. A signed advertisement
  therefore cannot be replayed into another round or instance, and a peer outside the sample cannot
  inject keys in a member's name. Without identity keys, the transport's authenticated sender id
  (libp2p's channel) is the binding.
- **Commitment:** ``SHA-256(domain, digest, index, b_u)`` lets the aggregator check a reconstructed
  self-mask seed; a corrupt share is detected instead of silently corrupting the sum.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from p2pnode.secagg import shamir
from p2pnode.secagg.randomness import Randomness

DOMAIN = b"p2pnode/secagg/v1"
KEY_BYTES = 32
SIGNATURE_BYTES = 64
COMMITMENT_BYTES = 32
#: Plaintext of one encrypted share pair: sender (4) | recipient (4) | mask-key share | self-mask share.
PLAINTEXT_BYTES = 8 + 2 * shamir.SHARE_BYTES
#: Ciphertext length: the plaintext plus Poly1305's 16-byte tag.
CIPHERTEXT_BYTES = PLAINTEXT_BYTES + 16
_NONCE = bytes(12)


def _u32(v: int) -> bytes:
    return v.to_bytes(4, "big")


def generate(rnd: Randomness) -> tuple[X25519PrivateKey, bytes]:
    """A fresh X25519 key pair from `rnd`: (private key, raw 32-byte public key)."""
    sk = X25519PrivateKey.from_private_bytes(rnd.token_bytes(KEY_BYTES))
    return sk, sk.public_key().public_bytes_raw()


def private_to_int(sk: X25519PrivateKey) -> int:
    """The private key's 32 raw bytes as an integer (a Shamir secret below `shamir.PRIME`)."""
    return int.from_bytes(sk.private_bytes_raw(), "big")


def int_to_private(v: int) -> X25519PrivateKey:
    """The X25519 private key whose raw bytes are `v` (raises `ValueError` when `v` needs > 32 bytes)."""
    if not 0 <= v < 2 ** (8 * KEY_BYTES):
        raise ValueError("not a 32-byte private key")
    return X25519PrivateKey.from_private_bytes(v.to_bytes(KEY_BYTES, "big"))


def public_of(sk: X25519PrivateKey) -> bytes:
    """Raw public key of a private key."""
    return sk.public_key().public_bytes_raw()


def check_public_key(pk: bytes) -> None:
    """Raise `ValueError` unless `pk` is a usable X25519 public key (32 bytes, not of low order)."""
    if len(pk) != KEY_BYTES:
        raise ValueError(f"an X25519 public key has {KEY_BYTES} bytes, got {len(pk)}")
    # An agreement with a low-order point is all-zero; OpenSSL refuses it. Try one with a throwaway key.
    X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(pk))


def agree(sk: X25519PrivateKey, pk: bytes) -> bytes:
    """Raw X25519 agreement (raises `ValueError` for a bad public key)."""
    return sk.exchange(X25519PublicKey.from_public_bytes(pk))


def _hkdf(shared: bytes, digest: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=digest, info=DOMAIN + b" " + info).derive(shared)


def mask_seed(shared: bytes, digest: bytes, a: int, b: int) -> bytes:
    """The 32-byte seed of the pairwise mask of users `a` and `b` (symmetric in a, b)."""
    lo, hi = min(a, b), max(a, b)
    return _hkdf(shared, digest, b"mask" + _u32(lo) + _u32(hi))


def share_key(shared: bytes, digest: bytes, sender: int, recipient: int) -> bytes:
    """The 32-byte AEAD key for shares sent from `sender` to `recipient` (one per direction)."""
    return _hkdf(shared, digest, b"share" + _u32(sender) + _u32(recipient))


def _aad(digest: bytes, sender: int, recipient: int) -> bytes:
    return DOMAIN + b" shares" + digest + _u32(sender) + _u32(recipient)


def encrypt_shares(key: bytes, digest: bytes, sender: int, recipient: int, mask_key_share: int,
                   self_mask_share: int) -> bytes:
    """Encrypt one (mask-key share, self-mask share) pair for `recipient`; `CIPHERTEXT_BYTES` long."""
    plain = _u32(sender) + _u32(recipient) + shamir.encode(mask_key_share) + shamir.encode(self_mask_share)
    return ChaCha20Poly1305(key).encrypt(_NONCE, plain, _aad(digest, sender, recipient))


def decrypt_shares(key: bytes, digest: bytes, sender: int, recipient: int, ciphertext: bytes) -> tuple[int, int]:
    """Decrypt and check a share pair; returns (mask-key share, self-mask share).

    Raises `ValueError` when the ciphertext has the wrong length, fails authentication, or names
    other users than `sender` and `recipient`.
    """
    if len(ciphertext) != CIPHERTEXT_BYTES:
        raise ValueError(f"a share ciphertext has {CIPHERTEXT_BYTES} bytes, got {len(ciphertext)}")
    try:
        plain = ChaCha20Poly1305(key).decrypt(_NONCE, ciphertext, _aad(digest, sender, recipient))
    except InvalidTag as e:
        raise ValueError(f"the shares from user {sender} fail authentication") from e
    if plain[:8] != _u32(sender) + _u32(recipient):
        raise ValueError(f"the shares from user {sender} name another pair of users")
    k = 8 + shamir.SHARE_BYTES
    return shamir.decode(plain[8:k]), shamir.decode(plain[k:])


def commitment(digest: bytes, index: int, seed: bytes) -> bytes:
    """Commitment to a self-mask seed: SHA-256 over the domain, the digest, the index and the seed."""
    return hashlib.sha256(DOMAIN + b" commit" + digest + _u32(index) + seed).digest()


def commitment_matches(expected: bytes, digest: bytes, index: int, seed: bytes) -> bool:
    """Whether `seed` opens `expected` (compared in constant time)."""
    return hmac.compare_digest(expected, commitment(digest, index, seed))


def advertise_payload(digest: bytes, index: int, peer_id: str, cipher_pk: bytes, mask_pk: bytes,
                      commit: bytes) -> bytes:
    """The bytes a user signs when it advertises its keys (length-prefixed, unambiguous)."""
    pid = peer_id.encode()
    return (DOMAIN + b" advertise" + digest + _u32(index) + _u32(len(pid)) + pid + cipher_pk + mask_pk + commit)


def sign(identity: Ed25519PrivateKey, payload: bytes) -> bytes:
    """Ed25519 signature (64 bytes) of `payload`."""
    return identity.sign(payload)


def identity_from_bytes(secret: bytes) -> Ed25519PrivateKey:
    """The Ed25519 identity key whose 32-byte private seed is `secret` (raises `ValueError` otherwise)."""
    if len(secret) != KEY_BYTES:
        raise ValueError(f"an Ed25519 private key has {KEY_BYTES} bytes, got {len(secret)}")
    return Ed25519PrivateKey.from_private_bytes(secret)


def public_identity_key(identity: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key of an Ed25519 identity key (what `verify` and ``identity_keys`` take)."""
    return identity.public_key().public_bytes_raw()


def verify(identity_public: bytes, signature: bytes, payload: bytes) -> bool:
    """Whether `signature` is a valid Ed25519 signature of `payload` by `identity_public` (raw 32 bytes)."""
    if len(signature) != SIGNATURE_BYTES or len(identity_public) != KEY_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(identity_public).verify(signature, payload)
    except (InvalidSignature, ValueError):
        return False
    return True
