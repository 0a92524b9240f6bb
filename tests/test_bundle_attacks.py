"""A hostile bundle costs nothing to refuse: verify before unpacking, on every path that reads one.

The attack of the red-team report: a 10-30 KB tar whose manifest lists `model.onnx` at 2 GiB and
whose member is a GNU or PAX sparse file of that size. tarfile expands sparse members into
zeros on read; the bundle reader refuses them from their header, before reading any data. Each
path runs in a fresh process that reports its peak RSS (ru_maxrss) before and after the refusal.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from common.bundle import MANIFEST_NAME, BundleError, manifest_bytes, parse_bundle, read_bundle
from common.signing import generate_keys, load_trust

SPARSE_SIZE = 2 * 1024**3
EXTRA_RSS_LIMIT_MB = 50

pytestmark = pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")


def sparse_bundle(reference: Path, folder: Path, tar_format: str) -> Path:
    """The reference bundle's members, but model.onnx is a 2 GiB sparse file its (unsigned)
    manifest lists at that size."""
    good = read_bundle(reference)
    files = dict(good.manifest.files)
    files["model.onnx"] = files["model.onnx"].model_copy(update={"size": SPARSE_SIZE})
    manifest = good.manifest.model_copy(update={"files": files, "signature": None})
    work = folder / f"members-{tar_format}"
    work.mkdir()
    (work / MANIFEST_NAME).write_bytes(manifest_bytes(manifest))
    for name, data in good.files.items():
        if name != "model.onnx":
            (work / name).write_bytes(data)
    with (work / "model.onnx").open("wb") as sparse:
        sparse.truncate(SPARSE_SIZE)
    out = folder / f"sparse-{tar_format}.tar"
    names = [MANIFEST_NAME, *sorted(n for n in good.files if n != "model.onnx"), "model.onnx"]
    subprocess.run(
        ["tar", "--sparse", f"--format={tar_format}", "-cf", str(out), "-C", str(work), *names],
        check=True,
    )
    return out


CHILD = """
import json, resource, sys
from pathlib import Path
from common.bundle import BundleError, parse_bundle, read_bundle
from fleet.cli import main as fleet_main
from node.app import NodeApp
from node.config import load_config
from node.errors import ConfigError
import runtime.registry, fleet.models.validate, fleet.bundles.inspect  # before the baseline
path, how = Path(sys.argv[1]), sys.argv[2]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
outcome = "accepted"
try:
    if how == "read":
        read_bundle(path)
    elif how == "parse":
        parse_bundle(path.read_bytes())
    elif how == "inspect":
        outcome = f"exit {fleet_main(['bundle', 'inspect', str(path)])}"
    elif how == "validate":
        outcome = f"exit {fleet_main(['model', 'validate', str(path)])}"
    elif how == "node":
        NodeApp.open(load_config(model=path, node_id="sparse", broker="mqtt://127.0.0.1:9"))
except (BundleError, ConfigError) as exc:
    outcome = f"refused: {exc}"
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "extra_mb": (after - before) / 1024}))
"""


@pytest.mark.parametrize("tar_format", ["gnu", "posix"])
@pytest.mark.parametrize("how", ["read", "parse", "inspect", "validate", "node"])
def test_a_sparse_bundle_is_refused_from_its_header_on_every_path(
    reference_bundle_path: Path, tmp_path: Path, tar_format: str, how: str
) -> None:
    bundle = sparse_bundle(reference_bundle_path, tmp_path, tar_format)
    assert bundle.stat().st_size < 128 * 1024
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(bundle), how],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\n{how} ({tar_format}): {report}")
    assert report["outcome"] != "accepted"
    assert (
        report["outcome"] in {"exit 1", "exit 2"} or "only flat regular files" in report["outcome"]
    )
    if how in {"inspect", "validate"}:
        assert "only flat regular files" in done.stderr
    assert report["extra_mb"] < EXTRA_RSS_LIMIT_MB


def test_the_signature_is_checked_before_any_other_member_is_read(
    reference_bundle_path: Path, tmp_path: Path
) -> None:
    """With a trust store, an unsigned (or foreign) manifest is refused at the first member:
    a sparse member after it is never even looked at."""
    bundle = sparse_bundle(reference_bundle_path, tmp_path, "gnu")
    keys = generate_keys(tmp_path / "keys")
    with pytest.raises(BundleError, match="unsigned"):
        read_bundle(bundle, trust=load_trust(keys.public))


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("symlink", "only flat regular files"),
        ("hardlink", "only flat regular files"),
        ("fifo", "only flat regular files"),
        ("dir", "only flat regular files"),
        ("truncated", "does not hold"),
    ],
)
def test_special_and_truncated_members_are_refused(
    reference_bundle_path: Path, kind: str, expected: str
) -> None:
    good = read_bundle(reference_bundle_path)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = manifest_bytes(good.manifest)
        info = tarfile.TarInfo(MANIFEST_NAME)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        bad = tarfile.TarInfo("model.onnx")
        if kind == "symlink":
            bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            bad.type, bad.linkname = tarfile.LNKTYPE, MANIFEST_NAME
        elif kind == "fifo":
            bad.type = tarfile.FIFOTYPE
        elif kind == "dir":
            bad.type = tarfile.DIRTYPE
        tar.addfile(bad)
    raw = buffer.getvalue()
    if kind == "truncated":  # a member header claiming a gigabyte the archive does not hold
        body = manifest_bytes(good.manifest)
        head = tarfile.TarInfo(MANIFEST_NAME)
        head.size = len(body)
        liar = tarfile.TarInfo("model.onnx")
        liar.size = 10**9
        raw = (
            head.tobuf(tarfile.USTAR_FORMAT)
            + body
            + b"\0" * (-len(body) % 512)
            + liar.tobuf(tarfile.USTAR_FORMAT)
            + b"x" * 512
        )
    with pytest.raises(BundleError, match=expected):
        parse_bundle(raw)
