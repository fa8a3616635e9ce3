"""The RSA libp2p identity that signs a node's DHT records (see `p2pnode.discovery.dht`, signed records).

hivemind's `RSASignatureValidator` signs each value a node stores under a subkey that names its RSA
public key (``"<peer id>[owner:<key>]"``), and makes every DHT node refuse values under that subkey that
the key's owner did not sign. The directory also checks that the libp2p peer id derived from the owner
key (`peer_id_of_public_key`) is the record's peer id; that needs the node's libp2p identity to be the
same RSA key (`signed_dht_options` arranges it).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import base58
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey


def peer_id_of_public_key(ssh_public_key: bytes) -> str:
    """The base58 libp2p peer id of an RSA public key given in OpenSSH format.

    Follows the libp2p peer-id spec: sha2-256 multihash of the protobuf `PublicKey` holding the DER
    SubjectPublicKeyInfo (RSA keys are too long for the identity multihash).
    """
    key = serialization.load_ssh_public_key(ssh_public_key)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("owner key is not an RSA key")
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    proto = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = hashlib.sha256(proto).digest()
    return base58.b58encode(bytes([0x12, len(digest)]) + digest).decode()


def load_or_create_identity(identity_path: str) -> RSAPrivateKey:
    """Load the RSA libp2p identity at `identity_path`, creating it (mode 0400) if missing.

    The file is the private key in the format p2pd reads (hivemind's `P2P.generate_identity`).
    """
    if not os.path.isfile(identity_path):
        P2P.generate_identity(identity_path)
    with open(identity_path, "rb") as f:
        proto = crypto_pb2.PrivateKey.FromString(f.read())
    if proto.key_type != crypto_pb2.RSA:
        raise ValueError(f"{identity_path} holds a non-RSA key; signed records need an RSA identity")
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": proto.data})  # the documented pickling path of hivemind's key
    return key


def signed_dht_options(identity_path: str, *, check_if_identity_free: bool = True) -> dict[str, Any]:
    """Keyword arguments for `hivemind.DHT` that make its libp2p identity the RSA key at `identity_path`
    and install the signature validator; pass ``signer=options["record_validators"][0]`` to
    `DHTDirectory`.

    :param check_if_identity_free: let p2pd check that no other peer uses this identity (slower start).
    """
    validator = RSASignatureValidator(load_or_create_identity(identity_path))
    return {"identity_path": identity_path, "record_validators": [validator],
            "check_if_identity_free": check_if_identity_free}
