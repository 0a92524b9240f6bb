"""Build a model bundle from an ONNX file: contract check, normalisation, motif head, goldens.

Steps: read the model's input/output contract from the file itself (names, batch); take the
per-channel normalisation from a JSON (the exporter's `model_config.json` works as is) or derive it
from the calibration set; run the calibration windows through ONNX Runtime; when the model gives
only a latent, fit 12 k-means prototypes on the calibration latents for the motif head; store a
few golden windows with their expected latents; write the bundle.
"""

from __future__ import annotations

import datetime as dt
import getpass
import logging
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
from numpy.typing import NDArray
from pydantic import TypeAdapter, ValidationError

from common.bundle import Bundle, file_entries, npy_bytes, write_bundle
from common.errors import BundleError, ModelContractError
from common.signing import load_private_key, sign_manifest
from fleet.bundles.calibration import CalibrationSet, load_calibration, simulated_calibration
from fleet.bundles.kmeans import kmeans
from runtime.backend import BackendOptions
from runtime.motif_head import squared_distances
from runtime.normalize import Normalizer
from runtime.onnx_backend import OnnxBackend
from schemas.errors import describe_validation_error
from schemas.limits import CHANNEL_ORDER, CHANNELS, LATENT_DIM, MOTIF_COUNT, WINDOW_LENGTH
from schemas.manifest import (
    NAME,
    SEMVER,
    Golden,
    HefInfo,
    InputSpec,
    Manifest,
    MotifLabels,
    Normalization,
    Outputs,
    OutputSpec,
    PrototypeHead,
)

logger = logging.getLogger(__name__)

GOLDEN_COUNT = 8
PROTOTYPE_SEED = 0

FloatArray = NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class ModelContract:
    """What an ONNX file declares: its input and outputs, read from the file."""

    input: InputSpec
    outputs: Outputs


def read_contract(onnx_bytes: bytes) -> ModelContract:
    """Read input name/shape and identify the latent (and motif logits) outputs by size."""
    try:
        session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    except Exception as exc:
        msg = f"ONNX Runtime cannot load the model: {exc}"
        raise ModelContractError(msg) from exc
    inputs = session.get_inputs()
    if len(inputs) != 1:
        msg = f"model has {len(inputs)} inputs; the contract is one [1, 100, 9] float32 input"
        raise ModelContractError(msg)
    shape = list(inputs[0].shape)
    if (
        inputs[0].type != "tensor(float)"
        or len(shape) != 3
        or shape[1:] != [WINDOW_LENGTH, CHANNELS]
    ):
        msg = f"model input is {inputs[0].type} {shape}; the contract is [1, 100, 9] float32"
        raise ModelContractError(msg)
    batch = shape[0] if isinstance(shape[0], int) else None
    by_dim: dict[int, str] = {}
    for out in session.get_outputs():
        dims = [d for d in out.shape[1:] if d != 1]
        if len(dims) == 1 and isinstance(dims[0], int):
            by_dim.setdefault(dims[0], out.name)
    if LATENT_DIM not in by_dim:
        names = [f"{o.name} {o.shape}" for o in session.get_outputs()]
        msg = f"model has no [batch, {LATENT_DIM}] latent output; it has {names}"
        raise ModelContractError(msg)
    logits = by_dim.get(MOTIF_COUNT)
    return ModelContract(
        input=InputSpec(name=inputs[0].name, shape=[batch, WINDOW_LENGTH, CHANNELS]),
        outputs=Outputs(
            latent=OutputSpec(name=by_dim[LATENT_DIM], dim=LATENT_DIM),
            motif_logits=OutputSpec(name=logits, dim=MOTIF_COUNT) if logits else None,
        ),
    )


def load_normalization(path: Path) -> Normalization:
    """Read `{"mean": [9], "std": [9]}`, or the same under a `normalization` key."""
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        msg = f"cannot read normalisation file {path}: {exc}"
        raise BundleError(msg) from exc
    if isinstance(data, dict) and isinstance(data.get("normalization"), dict):
        data = data["normalization"]
    if not isinstance(data, dict) or "mean" not in data or "std" not in data:
        msg = f"{path} needs 'mean' and 'std' (9 numbers each), at the top or under 'normalization'"
        raise BundleError(msg)
    order = data.get("channel_order")
    if order is not None and (not isinstance(order, list) or tuple(order) != CHANNEL_ORDER):
        msg = f"{path} channel_order {order} differs from the contract's ax..mz order"
        raise BundleError(msg)
    method = data.get("method", "z_score_per_channel")
    if method != "z_score_per_channel":
        msg = (
            f"{path}: normalisation method {method!r} is not supported; nodes apply "
            "z_score_per_channel, (x - mean) / std per channel"
        )
        raise BundleError(msg)
    try:
        return Normalization(
            method=method,
            mean=data["mean"],
            std=data["std"],
            source=path.name,
        )
    except ValidationError as exc:
        msg = f"{path}: {describe_validation_error(exc, 'normalization')}"
        raise BundleError(msg) from exc


def normalization_from(calibration: CalibrationSet) -> Normalization:
    """Per-channel mean and std of the calibration windows."""
    flat = calibration.windows.reshape(-1, CHANNELS).astype(np.float64)
    std = np.maximum(flat.std(axis=0), 1e-6)
    return Normalization(
        mean=flat.mean(axis=0).tolist(),
        std=std.tolist(),
        source=f"calibration:{calibration.source}",
    )


def fit_prototype_head(latents: FloatArray, labels: list[str] | None) -> PrototypeHead:
    """12 k-means prototypes; temperature = median squared distance to the nearest prototype."""
    centroids, assignment = kmeans(latents, MOTIF_COUNT, seed=PROTOTYPE_SEED)
    nearest = squared_distances(latents, centroids).min(axis=1)
    temperature = float(max(np.median(nearest), 1e-6))
    names = None
    if labels is not None:
        names = []
        for cluster in range(MOTIF_COUNT):
            members = [labels[i] for i in np.flatnonzero(assignment == cluster)]
            names.append(max(set(members), key=members.count) if members else "")
    return PrototypeHead(prototypes=centroids.tolist(), temperature=temperature, labels=names)


_MOTIF_LABELS: TypeAdapter[list[str]] = TypeAdapter(MotifLabels)


DURATION = re.compile(r"^(\d+(?:\.\d+)?)([dhm])$")
_UNIT_S = {"d": 86400, "h": 3600, "m": 60}


def parse_expiry(value: str, now: float | None = None) -> str:
    """`--expires`: a duration from now (`90d`, `12h`, `30m`) or an ISO 8601 time (a date means
    its midnight UTC); the manifest's `expires_at` (UTC, seconds). Refuses the past."""
    now = time.time() if now is None else now
    if match := DURATION.match(value.strip()):
        stamp = now + float(match[1]) * _UNIT_S[match[2]]
    else:
        try:
            parsed = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            msg = f"--expires {value!r}: give a duration (90d, 12h, 30m) or a time (2027-06-30)"
            raise BundleError(msg) from None
        stamp = (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)).timestamp()
    if stamp <= now:
        msg = f"--expires {value!r} is in the past: nodes would refuse the bundle at once"
        raise BundleError(msg)
    return dt.datetime.fromtimestamp(stamp, dt.UTC).isoformat(timespec="seconds")


def parse_motif_labels(value: str | Path) -> list[str]:
    """Motif names from `--motif-labels`: comma-separated, or a file (one name per line, or
    comma-separated; blank lines and `#` comments skipped). Exactly 12 non-empty short names."""
    path = Path(value)
    source = "--motif-labels"
    if isinstance(value, Path) or path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            msg = f"cannot read motif labels from {path}: {exc}"
            raise BundleError(msg) from exc
        lines = [line.split("#", 1)[0] for line in text.splitlines()]
        raw = [part for line in lines for part in line.split(",") if line.strip()]
        source = str(path)
    else:
        raw = str(value).split(",")
    return validate_motif_labels([part.strip() for part in raw], source)


def validate_motif_labels(names: list[str], source: str = "motif labels") -> list[str]:
    """`names` checked as a manifest's `motif_labels`; BundleError says what is wrong."""
    try:
        return _MOTIF_LABELS.validate_python(names)
    except ValidationError as exc:
        problems = "; ".join(
            f"label {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"] else e["msg"]
            for e in exc.errors()[:3]
        )
        msg = (
            f"{source}: need exactly {MOTIF_COUNT} non-empty names of at most 32 characters "
            f"(got {len(names)}): {problems}"
        )
        raise BundleError(msg) from None


def sign_bundle(bundle: Bundle, key: Path, out: Path, *, expires_at: str | None = None) -> Bundle:
    """A copy of `bundle` signed with the private key at `key`, written to `out`; with
    `expires_at` (see `parse_expiry`) the signed manifest carries that expiry."""
    manifest = bundle.manifest
    if expires_at is not None:
        manifest = manifest.model_copy(update={"expires_at": expires_at})
    manifest = sign_manifest(manifest, load_private_key(key))
    write_bundle(out, manifest, bundle.files)
    return Bundle(manifest=manifest, files=bundle.files, path=out)


def with_hef(bundle: Bundle, hef: bytes, info: HefInfo, out: Path) -> Bundle:
    """A copy of `bundle` with `model.hef` (replacing any) and its `hef` section, written to out.

    Name, version, normalisation, head and golden vectors stay: the HEF is the same model
    compiled for an accelerator, proven against the same goldens.
    """
    files = {**bundle.files, "model.hef": hef}
    manifest = bundle.manifest.model_copy(
        update={"files": file_entries(files), "hef": info, "signature": None}
    )
    manifest = Manifest.model_validate(manifest.model_dump())
    write_bundle(out, manifest, files)
    return Bundle(manifest=manifest, files=files, path=out)


def golden_indices(count: int, total: int) -> list[int]:
    """Evenly spread indices into the calibration set (covers every activity)."""
    return sorted({int(i) for i in np.linspace(0, total - 1, num=min(count, total))})


def build_bundle(
    *,
    onnx_path: Path,
    name: str,
    version: str,
    out: Path,
    normalization: Path | Normalization | None = None,
    calibration: Path | None = None,
    description: str = "",
    hef: Path | None = None,
    hef_info: HefInfo | None = None,
    sign_key: Path | None = None,
    motif_labels: list[str] | None = None,
    expires_at: str | None = None,
) -> Bundle:
    """Build, verify and write a bundle; returns it as a node would read it.

    `expires_at` (see `parse_expiry`): nodes refuse the bundle after it.

    `motif_labels` names the 12 motifs for dashboards (see `parse_motif_labels`).

    With `hef`, the compiled HEF goes beside its ONNX twin; `hef_info` says what it was compiled
    for (default: Hailo-8, quantised, no recorded parity).
    """
    if not NAME.match(name):
        msg = f"model name {name!r} must be lowercase letters, digits, '.', '_' or '-' (max 64)"
        raise BundleError(msg)
    if not SEMVER.match(version):
        msg = f"version {version!r} is not semantic: use MAJOR.MINOR.PATCH, e.g. 1.4.0"
        raise BundleError(msg)
    try:
        onnx_bytes = onnx_path.read_bytes()
    except OSError as exc:
        msg = f"cannot read {onnx_path}: {exc.strerror}"
        raise BundleError(msg) from exc
    if motif_labels is not None:
        motif_labels = validate_motif_labels(motif_labels)
    contract = read_contract(onnx_bytes)
    calib = load_calibration(calibration) if calibration else simulated_calibration()
    norm = load_normalization(normalization) if isinstance(normalization, Path) else normalization
    if norm is None:
        norm = normalization_from(calib)
        logger.warning(
            "no --normalization given: derived mean/std from the calibration set (%s). Pass the "
            "exporter's model_config.json to use the training statistics.",
            calib.source,
        )
    files = {"model.onnx": onnx_bytes}
    if hef is not None:
        try:
            files["model.hef"] = hef.read_bytes()
        except OSError as exc:
            msg = f"cannot read {hef}: {exc.strerror}"
            raise BundleError(msg) from exc
        hef_info = hef_info or HefInfo(hw_arch="hailo8")
    else:
        hef_info = None
    backend = OnnxBackend(onnx_bytes, contract.outputs, BackendOptions(threads=2))
    try:
        output = backend.infer(Normalizer(norm).apply(calib.windows))
    finally:
        backend.close()
    head = None
    if contract.outputs.motif_logits is None:
        head = fit_prototype_head(output.latent, calib.labels)
    picks = golden_indices(GOLDEN_COUNT, len(calib.windows))
    golden = Golden(count=len(picks))
    files[golden.inputs] = npy_bytes(calib.windows[picks])
    files[golden.latents] = npy_bytes(output.latent[picks])
    manifest = Manifest(
        name=name,
        version=version,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        created_by=f"{getpass.getuser()}@{socket.gethostname()}",
        description=description,
        files=file_entries(files),
        input=contract.input,
        normalization=norm,
        outputs=contract.outputs,
        motif_head=head,
        golden=golden,
        hef=hef_info,
        motif_labels=motif_labels,
        expires_at=expires_at,
    )
    if sign_key is not None:
        manifest = sign_manifest(manifest, load_private_key(sign_key))
    write_bundle(out, manifest, files)
    logger.info("wrote %s (%s %s, %d calibration windows)", out, name, version, len(calib.windows))
    return Bundle(manifest=manifest, files=files, path=out)
