"""Motif labels: the optional manifest field, `bundle create --motif-labels`, the model state."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.bundle import manifest_bytes, read_bundle, write_bundle
from common.errors import BundleError
from common.signing import (
    canonical_manifest,
    generate_keys,
    load_private_key,
    load_public_key,
    sign_manifest,
    verify_manifest,
)
from fleet.bundles.builder import parse_motif_labels, validate_motif_labels
from fleet.cli import main
from schemas.codec import encode
from schemas.manifest import Manifest
from schemas.messages import ModelLifecycle, ModelRef, NodeModelState

NAMES = [f"m{i}" for i in range(12)]


def test_comma_separated_and_file_forms(tmp_path: Path) -> None:
    assert parse_motif_labels(" rest, walk ," + ",".join(NAMES[2:])) == ["rest", "walk", *NAMES[2:]]
    path = tmp_path / "labels.txt"
    path.write_text("# one per line\n" + "\n".join(NAMES) + "\n\n")
    assert parse_motif_labels(str(path)) == NAMES


@pytest.mark.parametrize(
    "bad",
    [",".join(NAMES[:11]), ",".join([*NAMES, "x"]), ",".join(["", *NAMES[1:]]),
     ",".join(["x" * 33, *NAMES[1:]]), ",".join(["a\tb", *NAMES[1:]])],
    ids=["eleven", "thirteen", "empty", "too-long", "control-char"],
)  # fmt: skip
def test_invalid_labels_are_refused_with_the_reason(bad: str) -> None:
    with pytest.raises(BundleError, match="exactly 12 non-empty names"):
        parse_motif_labels(bad)


@given(st.lists(st.text(max_size=40), min_size=0, max_size=14))
def test_validation_accepts_exactly_the_contract(names: list[str]) -> None:
    ok = len(names) == 12 and all(
        0 < len(n.strip()) <= 32 and not any(ord(c) < 32 or ord(c) == 127 for c in n.strip())
        for n in names
    )
    try:
        validate_motif_labels(names)
    except BundleError:
        assert not ok
    else:
        assert ok


def test_old_bundles_keep_their_bytes_and_signatures(
    reference_bundle_path: Path, tmp_path: Path
) -> None:
    bundle = read_bundle(reference_bundle_path)
    assert bundle.manifest.motif_labels is None
    assert b"motif_labels" not in manifest_bytes(bundle.manifest)  # absent, not null
    keys = generate_keys(tmp_path / "keys")
    signed = sign_manifest(bundle.manifest, load_private_key(keys.private))
    # what is signed has no trace of the field, so signatures made before it existed verify
    assert b"motif_labels" not in canonical_manifest(bundle.manifest)
    reparsed = Manifest.model_validate_json(manifest_bytes(signed))
    verify_manifest(reparsed, load_public_key(keys.public))
    labelled = Manifest.model_validate({**bundle.manifest.model_dump(), "motif_labels": NAMES})
    write_bundle(tmp_path / "l.tar", labelled, bundle.files)
    assert read_bundle(tmp_path / "l.tar").manifest.motif_labels == NAMES


def test_model_state_carries_labels_only_when_set() -> None:
    base = {"node_id": "n1", "ts": time.time(), "state": ModelLifecycle.ACTIVE,
            "active": ModelRef(name="m", version="1.0.0")}  # fmt: skip
    assert "motif_labels" not in orjson.loads(encode(NodeModelState(**base)))
    assert orjson.loads(encode(NodeModelState(**base, motif_labels=NAMES)))["motif_labels"] == NAMES


def test_cli_bundle_create_with_motif_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fleet.bundles.reference import build_reference_bundle

    source = read_bundle(build_reference_bundle(tmp_path / "ref.tar"))
    onnx = tmp_path / "model.onnx"
    assert source.onnx is not None
    onnx.write_bytes(source.onnx)
    out = tmp_path / "out.tar"
    code = main(["bundle", "create", "--onnx", str(onnx), "--name", "tcn", "--version", "1.0.0",
                 "--out", str(out), "--motif-labels", ",".join(NAMES),
                 "--normalization-from-calibration"])  # fmt: skip
    assert code == 0
    assert "motif names m0, m1" in capsys.readouterr().out
    assert read_bundle(out).manifest.motif_labels == NAMES
    bad = main(["bundle", "create", "--onnx", str(onnx), "--name", "tcn", "--version", "1.0.0",
                "--out", str(tmp_path / "bad.tar"), "--motif-labels", "a,b",
                "--normalization-from-calibration"])  # fmt: skip
    assert bad == 1
    assert "exactly 12" in capsys.readouterr().err
