"""Read and write model bundles: one uncompressed tar holding `manifest.json` and its files.

A plain tar keeps bundles inspectable with `tar tvf`. Writing is byte-reproducible (fixed order,
mtime 0, no owner names; `manifest.json` first). Reading is one forward pass that verifies
before it unpacks: the manifest comes first and, given a trust store, its signature is checked
before any other member is read; each member must be a plain regular file of exactly the size
the manifest gives it, inside the archive, and is read in bounded chunks and hashed. Links,
devices, sparse members (a few KB standing for gigabytes), unlisted, duplicate and oversized
members are refused, and nothing touches the file system beyond the archive.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import orjson
from numpy.typing import NDArray
from pydantic import ValidationError

from common.errors import BundleError
from common.signing import Trust, verify_manifest
from schemas.errors import describe_validation_error
from schemas.limits import CHANNELS, LATENT_DIM, WINDOW_LENGTH
from schemas.manifest import FileEntry, Manifest
from schemas.messages import ModelRef

MANIFEST_NAME = "manifest.json"
DEFAULT_MAX_BUNDLE_BYTES = 256 * 1024 * 1024
"""Largest bundle a node accepts unless configured otherwise."""
MAX_MANIFEST_BYTES = 1024 * 1024
"""Largest manifest.json read (a real one is a few KB)."""
READ_CHUNK = 1024 * 1024


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def file_entries(files: dict[str, bytes]) -> dict[str, FileEntry]:
    """Manifest `files` entries (sha256 and size) for the given contents."""
    return {
        name: FileEntry(sha256=sha256_hex(data), size=len(data)) for name, data in files.items()
    }


def npy_bytes(array: NDArray[np.float32]) -> bytes:
    """Serialise an array in `.npy` format (deterministic, no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def manifest_bytes(manifest: Manifest) -> bytes:
    """The manifest as stored in a bundle: sorted keys, indented for people."""
    return orjson.dumps(
        manifest.model_dump(mode="json"), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
    )


@dataclass(frozen=True, eq=False)
class Bundle:
    """A verified bundle in memory."""

    manifest: Manifest
    files: dict[str, bytes]
    path: Path | None = None

    @property
    def ref(self) -> ModelRef:
        """Name and version, as results report them."""
        return ModelRef(name=self.manifest.name, version=self.manifest.version)

    @property
    def onnx(self) -> bytes | None:
        """The ONNX model, when the bundle has one."""
        return self.files.get("model.onnx")

    @property
    def hef(self) -> bytes | None:
        """The compiled Hailo HEF, when the bundle has one."""
        return self.files.get("model.hef")

    def golden(self) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """Golden raw input windows (k, 100, 9) and expected latents (k, 64)."""
        spec = self.manifest.golden
        inputs = _load_npy(self.files[spec.inputs], spec.inputs)
        latents = _load_npy(self.files[spec.latents], spec.latents)
        if inputs.shape != (spec.count, WINDOW_LENGTH, CHANNELS) or latents.shape != (
            spec.count,
            LATENT_DIM,
        ):
            msg = (
                f"golden vectors have shapes {inputs.shape} and {latents.shape}; expected "
                f"({spec.count}, {WINDOW_LENGTH}, {CHANNELS}) and ({spec.count}, {LATENT_DIM})"
            )
            raise BundleError(msg)
        return inputs, latents


def write_bundle(out: Path, manifest: Manifest, files: dict[str, bytes]) -> None:
    """Write a bundle; the manifest's `files` must describe `files` exactly."""
    if manifest.files != file_entries(files):
        msg = "manifest.files does not match the files being written"
        raise BundleError(msg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [(MANIFEST_NAME, manifest_bytes(manifest)), *sorted(files.items())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(out)


def read_bundle(
    path: Path, *, max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES, trust: Trust | None = None
) -> Bundle:
    """Read and verify a bundle file; raises BundleError saying what is wrong.

    With `trust`, the manifest's signature is checked before any other member is read."""
    try:
        size = path.stat().st_size
        stream = path.open("rb")
    except OSError as exc:
        msg = f"cannot read bundle {path}: {exc.strerror}"
        raise BundleError(msg) from exc
    if size > max_bytes:
        stream.close()
        msg = f"bundle {path} is {size} bytes, over the {max_bytes}-byte limit"
        raise BundleError(msg)
    with stream:
        return _read(stream, size, str(path), trust, path)


def parse_bundle(
    data: bytes,
    *,
    path: Path | None = None,
    max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
    trust: Trust | None = None,
) -> Bundle:
    """Verify a bundle held in memory (the same checks as `read_bundle`)."""
    where = str(path) if path else "bundle"
    if len(data) > max_bytes:
        msg = f"{where} is {len(data)} bytes, over the {max_bytes}-byte limit"
        raise BundleError(msg)
    return _read(io.BytesIO(data), len(data), where, trust, path)


def _read(
    stream: BinaryIO, size: int, where: str, trust: Trust | None, path: Path | None
) -> Bundle:
    """One pass over the archive: the manifest first (and its signature, with `trust`), then
    each member streamed within the size its manifest gives it, never past the file's end."""
    manifest: Manifest | None = None
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                _check_member(info, size, where)
                if manifest is None:
                    manifest = _first_manifest(tar, info, where)
                    if trust is not None:
                        verify_manifest(manifest, trust)
                    continue
                entry = manifest.files.get(info.name)
                if entry is None:
                    msg = f"{where} holds files its manifest does not list: [{info.name!r}]"
                    raise BundleError(msg)
                if info.name in files:
                    msg = f"{where}: member {info.name!r} appears twice"
                    raise BundleError(msg)
                if info.size != entry.size:
                    msg = f"{where}: {info.name} does not match its manifest sha256/size"
                    raise BundleError(msg)
                content = _content(tar, info)
                if sha256_hex(content) != entry.sha256:
                    msg = f"{where}: {info.name} does not match its manifest sha256/size (corrupt"
                    msg += " or altered)"
                    raise BundleError(msg)
                files[info.name] = content
    except tarfile.TarError as exc:
        msg = f"{where} is not a readable bundle archive: {exc}"
        raise BundleError(msg) from exc
    if manifest is None:
        msg = f"{where} has no {MANIFEST_NAME}; is it a model bundle?"
        raise BundleError(msg)
    for name in manifest.files:
        if name not in files:
            msg = f"{where} is missing {name}, which its manifest lists"
            raise BundleError(msg)
    return Bundle(manifest=manifest, files=files, path=path)


def _check_member(info: tarfile.TarInfo, size: int, where: str) -> None:
    """Only flat, plain regular files whose data lies inside the archive: no link, device,
    directory, sparse or continued member (a 30 KB sparse member can stand for gigabytes)."""
    plain = info.type in (tarfile.REGTYPE, tarfile.AREGTYPE) and not info.issparse()
    if not plain or "/" in info.name or info.name.startswith("."):
        msg = f"{where}: unexpected member {info.name!r} (only flat regular files)"
        raise BundleError(msg)
    if info.offset_data + info.size > size:
        msg = f"{where}: member {info.name!r} claims {info.size} bytes the archive does not hold"
        raise BundleError(msg)


def _first_manifest(tar: tarfile.TarFile, info: tarfile.TarInfo, where: str) -> Manifest:
    if info.name != MANIFEST_NAME:
        msg = (
            f"{where} has no {MANIFEST_NAME} as its first member (found {info.name!r}); is it a "
            "model bundle?"
        )
        raise BundleError(msg)
    if info.size > MAX_MANIFEST_BYTES:
        msg = f"{where}: {MANIFEST_NAME} is {info.size} bytes, over {MAX_MANIFEST_BYTES}"
        raise BundleError(msg)
    try:
        return Manifest.model_validate_json(_content(tar, info))
    except ValidationError as exc:
        msg = f"{where}: {describe_validation_error(exc, 'manifest')}"
        raise BundleError(msg) from exc


def _content(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    """A member's bytes, read in bounded chunks (never more than its checked size)."""
    extracted = tar.extractfile(info)
    if extracted is None:
        return b""
    chunks = []
    left = info.size
    while left > 0 and (chunk := extracted.read(min(left, READ_CHUNK))):
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _load_npy(data: bytes, name: str) -> NDArray[np.float32]:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        msg = f"{name} is not a valid .npy array: {exc}"
        raise BundleError(msg) from exc
    return np.asarray(array, dtype=np.float32)
