"""Ed25519 signatures over bundle manifests and control-plane messages.

The manifest lists the sha256 and size of every file in the bundle, so signing the manifest
signs the whole bundle. What is signed is the canonical manifest: its JSON with `signature` set
to null, keys sorted, no whitespace. Desired states, artifact manifests and rollout records are
signed the same way (`sign_message`, `verify_message`). Keys are PEM files (PKCS#8 private,
SubjectPublicKeyInfo public); a key id is the first 16 hex digits of the sha256 of the raw
32-byte public key.

A node trusts one key or several (`TrustStore`: a PEM file, or a folder of `*.pub` files), so a
fleet can rotate its key without touching every node twice: add the new public key to the nodes,
sign with the new key, then remove the old one (docs/security.md).
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.errors import BundleError
from schemas.control import DesiredModel
from schemas.manifest import Manifest, Signature

M = TypeVar("M", bound="SignedMessage")
PRIVATE_NAME = "fleet.key"
PUBLIC_NAME = "fleet.pub"


class SignatureError(BundleError):
    """A bundle is unsigned where a signature is required, or its signature does not verify."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    """Paths of a generated key pair and its id."""

    private: Path
    public: Path
    key_id: str


def canonical_manifest(manifest: Manifest) -> bytes:
    """The bytes a signature covers."""
    body = manifest.model_copy(update={"signature": None}).model_dump(mode="json")
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def key_id(public: Ed25519PublicKey) -> str:
    """First 16 hex digits of sha256 over the raw public key."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keys(directory: Path, *, overwrite: bool = False) -> KeyPair:
    """Write a new key pair (private key readable by the owner only)."""
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / PRIVATE_NAME, directory / PUBLIC_NAME
    if not overwrite and (private_path.exists() or public_path.exists()):
        msg = f"{directory} already holds a key pair; refusing to overwrite it"
        raise FileExistsError(msg)
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    public = private.public_key()
    public_path.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return KeyPair(private_path, public_path, key_id(public))


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        msg = f"cannot read the signing key {path}: {exc}"
        raise SignatureError(msg) from exc
    if not isinstance(key, Ed25519PrivateKey):
        msg = f"{path} is not an Ed25519 private key (make one with `imu-fleet keys generate`)"
        raise SignatureError(msg)
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        msg = f"cannot read the trusted key {path}: {exc}"
        raise SignatureError(msg) from exc
    if not isinstance(key, Ed25519PublicKey):
        msg = f"{path} is not an Ed25519 public key"
        raise SignatureError(msg)
    return key


@dataclass(frozen=True, slots=True)
class TrustStore:
    """The public keys a node accepts signatures from, by key id."""

    keys: dict[str, Ed25519PublicKey]

    @classmethod
    def of(cls, *keys: Ed25519PublicKey) -> TrustStore:
        """A store holding `keys`."""
        return cls({key_id(key): key for key in keys})

    def get(self, wanted: str | None) -> Ed25519PublicKey | None:
        """The trusted key with id `wanted`, if there is one."""
        return self.keys.get(wanted) if wanted else None

    def ids(self) -> str:
        """The trusted key ids, for messages."""
        return ", ".join(sorted(self.keys)) or "none"


Trust = Ed25519PublicKey | TrustStore


def load_trust(path: Path) -> TrustStore:
    """Trusted keys from a public key file or a folder of `*.pub` files (key rotation)."""
    files = sorted(path.glob("*.pub")) if path.is_dir() else [path]
    if not files:
        msg = f"{path} holds no *.pub key files"
        raise SignatureError(msg)
    return TrustStore.of(*(load_public_key(file) for file in files))


def trust_store(trusted: Trust) -> TrustStore:
    """`trusted` as a store (one key, or already a store)."""
    return trusted if isinstance(trusted, TrustStore) else TrustStore.of(trusted)


def sign_manifest(manifest: Manifest, private: Ed25519PrivateKey) -> Manifest:
    """The manifest with its signature filled in."""
    value = base64.b64encode(private.sign(canonical_manifest(manifest))).decode()
    signature = Signature(key_id=key_id(private.public_key()), value=value)
    return manifest.model_copy(update={"signature": signature})


def verify_manifest(manifest: Manifest, trusted: Trust) -> None:
    """Raise SignatureError unless the manifest is signed by a trusted key."""
    if manifest.signature is None:
        msg = f"{manifest.name} {manifest.version} is unsigned and this node requires signatures"
        raise SignatureError(msg)
    store = trust_store(trusted)
    key = store.get(manifest.signature.key_id)
    if key is None:
        msg = (
            f"{manifest.name} {manifest.version} is signed by key {manifest.signature.key_id}, "
            f"not by a trusted key ({store.ids()})"
        )
        raise SignatureError(msg)
    try:
        key.verify(base64.b64decode(manifest.signature.value), canonical_manifest(manifest))
    except (InvalidSignature, ValueError) as exc:
        msg = f"{manifest.name} {manifest.version}: bad signature (manifest altered after signing)"
        raise SignatureError(msg) from exc


class SignedMessage(Protocol):
    """A control-plane message the fleet signs: desired states, artifact manifests, rollout
    records. The signature covers the canonical message (JSON, sorted keys, with `signature`
    and `key_id` null)."""

    signature: str | None
    key_id: str | None

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy with fields replaced (pydantic)."""
        ...

    def model_dump(self, *, mode: str = "python") -> dict[str, Any]:
        """The fields as plain data (pydantic)."""
        ...


def _canonical(message: SignedMessage) -> bytes:
    body = message.model_copy(update={"signature": None, "key_id": None}).model_dump(mode="json")
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def sign_message(message: M, private: Ed25519PrivateKey) -> M:
    """`message` signed by the fleet key `private`."""
    value = base64.b64encode(private.sign(_canonical(message))).decode()
    return message.model_copy(update={"signature": value, "key_id": key_id(private.public_key())})


def verify_message(message: SignedMessage, trusted: Trust, what: str) -> None:
    """Raise SignatureError (naming `what`) unless `message` is signed by a trusted key."""
    key = trust_store(trusted).get(message.key_id)
    if message.signature is None or key is None:
        msg = f"{what} is not signed by the fleet key"
        raise SignatureError(msg)
    try:
        key.verify(base64.b64decode(message.signature), _canonical(message))
    except (InvalidSignature, ValueError) as exc:
        msg = f"{what} has a bad signature (altered after signing)"
        raise SignatureError(msg) from exc


def sign_desired(desired: DesiredModel, private: Ed25519PrivateKey) -> DesiredModel:
    """The desired-state message signed by the fleet (required for rollbacks on strict nodes)."""
    return sign_message(desired, private)


def verify_desired(desired: DesiredModel, trusted: Trust) -> None:
    """Raise SignatureError unless the desired state is signed by a trusted key."""
    verify_message(desired, trusted, f"desired state for {desired.name} {desired.version}")


def trust_of(private: Ed25519PrivateKey, extra: Path | None = None) -> TrustStore:
    """What a holder of `private` trusts: its own public key, plus the keys at `extra` (a
    file, or a folder of `*.pub` during a key rotation)."""
    keys = [private.public_key()]
    if extra is not None:
        keys.extend(load_trust(extra).keys.values())
    return TrustStore.of(*keys)
