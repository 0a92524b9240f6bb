"""Ed25519 bundle signatures: keys, signing, verification, and a node that requires them."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from common.bundle import Bundle, read_bundle, write_bundle
from common.signing import (
    SignatureError,
    canonical_manifest,
    generate_keys,
    load_public_key,
    verify_manifest,
)
from fleet.bundles.builder import sign_bundle
from node.app import NodeApp
from node.config import load_config
from node.tools.local_broker import LocalBroker


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    generate_keys(folder)
    return folder


@pytest.fixture(scope="module")
def signed(
    reference_bundle: Bundle, keys: Path, tmp_path_factory: pytest.TempPathFactory
) -> Bundle:
    out = tmp_path_factory.mktemp("signed") / "signed.tar"
    return sign_bundle(reference_bundle, keys / "fleet.key", out)


def test_private_key_is_readable_by_its_owner_only(keys: Path) -> None:
    assert stat.S_IMODE((keys / "fleet.key").stat().st_mode) == 0o600


def test_generate_refuses_to_overwrite(keys: Path) -> None:
    with pytest.raises(FileExistsError):
        generate_keys(keys)


def test_signed_bundle_verifies_and_round_trips(signed: Bundle, keys: Path) -> None:
    again = read_bundle(signed.path) if signed.path else signed
    assert again.manifest.signature is not None
    verify_manifest(again.manifest, load_public_key(keys / "fleet.pub"))


def test_signature_covers_every_manifest_field(signed: Bundle, keys: Path, tmp_path: Path) -> None:
    altered = signed.manifest.model_copy(update={"version": "9.9.9"})
    assert canonical_manifest(altered) != canonical_manifest(signed.manifest)
    with pytest.raises(SignatureError, match="bad signature"):
        verify_manifest(altered, load_public_key(keys / "fleet.pub"))
    # the file hashes are in the manifest, so swapping a file needs a new manifest: same failure
    write_bundle(tmp_path / "x.tar", altered, signed.files)
    with pytest.raises(SignatureError):
        verify_manifest(
            read_bundle(tmp_path / "x.tar").manifest, load_public_key(keys / "fleet.pub")
        )


def test_other_key_and_unsigned_are_refused(
    signed: Bundle, reference_bundle: Bundle, tmp_path: Path
) -> None:
    other = generate_keys(tmp_path / "other")
    with pytest.raises(SignatureError, match="not by a trusted key"):
        verify_manifest(signed.manifest, load_public_key(other.public))
    with pytest.raises(SignatureError, match="unsigned"):
        verify_manifest(reference_bundle.manifest, load_public_key(other.public))


def test_node_with_a_trust_key_refuses_unsigned_and_serves_signed(
    broker: LocalBroker, reference_bundle_path: Path, signed: Bundle, keys: Path
) -> None:
    strict = {"broker": broker.url, "trust_key": keys / "fleet.pub", "backend": "onnx"}
    with pytest.raises(SignatureError, match="unsigned"):
        NodeApp.open(load_config(model=reference_bundle_path, **strict))
    app = NodeApp.open(load_config(model=signed.path, **strict))
    assert app.worker.pipeline.ref.version == "1.0.0"
    app.worker.pipeline.close()
