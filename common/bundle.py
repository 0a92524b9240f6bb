"""Read and write model bundles: one uncompressed tar holding `manifest.json` and its files.

A plain tar keeps bundles inspectable with `tar tvf`. Writing is byte-reproducible (fixed order,
mtime 0, no owner names). Reading verifies every listed file's size and sha256, refuses unlisted
members, links and oversized archives, and never touches the file system beyond the archive.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
from numpy.typing import NDArray
from pydantic import ValidationError

from common.errors import BundleError
from schemas.errors import describe_validation_error
from schemas.limits import CHANNELS, LATENT_DIM, WINDOW_LENGTH
from schemas.manifest import FileEntry, Manifest
from schemas.messages import ModelRef

MANIFEST_NAME = "manifest.json"
DEFAULT_MAX_BUNDLE_BYTES = 256 * 1024 * 1024
"""Largest bundle a node accepts unless configured otherwise."""


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


def read_bundle(path: Path, *, max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES) -> Bundle:
    """Read and verify a bundle file; raises BundleError saying what is wrong."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        msg = f"cannot read bundle {path}: {exc.strerror}"
        raise BundleError(msg) from exc
    if size > max_bytes:
        msg = f"bundle {path} is {size} bytes, over the {max_bytes}-byte limit"
        raise BundleError(msg)
    return parse_bundle(path.read_bytes(), path=path)


def parse_bundle(data: bytes, *, path: Path | None = None) -> Bundle:
    """Verify a bundle held in memory."""
    where = str(path) if path else "bundle"
    members = _tar_members(data, where)
    if MANIFEST_NAME not in members:
        msg = f"{where} has no {MANIFEST_NAME}; is it a model bundle?"
        raise BundleError(msg)
    try:
        manifest = Manifest.model_validate_json(members.pop(MANIFEST_NAME))
    except ValidationError as exc:
        msg = f"{where}: {describe_validation_error(exc, 'manifest')}"
        raise BundleError(msg) from exc
    unlisted = members.keys() - manifest.files.keys()
    if unlisted:
        msg = f"{where} holds files its manifest does not list: {sorted(unlisted)}"
        raise BundleError(msg)
    for name, entry in manifest.files.items():
        content = members.get(name)
        if content is None:
            msg = f"{where} is missing {name}, which its manifest lists"
            raise BundleError(msg)
        if len(content) != entry.size or sha256_hex(content) != entry.sha256:
            msg = f"{where}: {name} does not match its manifest sha256/size (corrupt or altered)"
            raise BundleError(msg)
    return Bundle(manifest=manifest, files=members, path=path)


def _tar_members(data: bytes, where: str) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if not info.isfile() or "/" in info.name or info.name.startswith("."):
                    msg = f"{where}: unexpected member {info.name!r} (only flat regular files)"
                    raise BundleError(msg)
                if info.name in members:
                    msg = f"{where}: member {info.name!r} appears twice"
                    raise BundleError(msg)
                extracted = tar.extractfile(info)
                members[info.name] = extracted.read() if extracted else b""
    except tarfile.TarError as exc:
        msg = f"{where} is not a readable bundle archive: {exc}"
        raise BundleError(msg) from exc
    return members


def _load_npy(data: bytes, name: str) -> NDArray[np.float32]:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        msg = f"{name} is not a valid .npy array: {exc}"
        raise BundleError(msg) from exc
    return np.asarray(array, dtype=np.float32)
