"""The Hailo Dataflow Compiler's Python API (`hailo_sdk_client`), as this project calls it.

Each function wraps one DFC call or convention; the ones marked ⚠ rest on third-party and
model-zoo code rather than Hailo's guide (hailo-notes.md section 8) and are the first places to
look when a real DFC disagrees. `hailo_dfc.py` orchestrates them.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import numpy as np

from common.errors import BundleError, MissingExtraError
from runtime.backend import FloatArray
from schemas.limits import CHANNELS, LATENT_DIM, WINDOW_LENGTH

try:
    import onnx
except ModuleNotFoundError as missing:
    raise MissingExtraError("onnx", extra="fleet", needed_for="compiling for Hailo") from missing

CALIBRATION_BATCH: Final = 8
INSTALL_HINT: Final = (
    "install the Hailo Dataflow Compiler (hailo_sdk_client, DFC 3.x for Hailo-8/8L; 3.33 pairs "
    "with HailoRT 4.23) from the Hailo Developer Zone; it needs an x86-64 Ubuntu 22.04/24.04 "
    "machine with Python 3.10-3.12 (an NVIDIA GPU is recommended) and does not run on the Pi"
)
DFC_DISTRIBUTION: Final = "hailo_dataflow_compiler"
"""The DFC wheel's distribution name, used for the version when the module has none."""


class CompileError(BundleError):
    """Compiling a bundle for Hailo failed; the message says at which step and why."""


class CompilerUnavailableError(CompileError):
    """The Hailo Dataflow Compiler (`hailo_sdk_client`) is not installed here."""


class CompileValidationError(CompileError):
    """The translated or quantised model does not reproduce the ONNX model closely enough."""


def import_dfc() -> ModuleType:
    """`hailo_sdk_client`, or CompilerUnavailableError saying what to install."""
    try:
        dfc = importlib.import_module("hailo_sdk_client")
    except ImportError as exc:
        msg = f"compiling for Hailo needs the hailo_sdk_client package ({exc}); {INSTALL_HINT}"
        raise CompilerUnavailableError(msg) from exc
    if not hasattr(dfc, "ClientRunner") or not hasattr(dfc, "InferenceContext"):
        msg = (
            f"hailo_sdk_client ({getattr(dfc, '__file__', None) or 'no file'}) has no "
            f"ClientRunner/InferenceContext (not the Dataflow Compiler?); {INSTALL_HINT}"
        )
        raise CompilerUnavailableError(msg)
    return dfc


def dfc_version(dfc: ModuleType) -> str:
    """The DFC's version string.

    ⚠ Where the DFC keeps its version is unverified: try the module's `__version__`, then the
    installed distribution's metadata, else "unknown".
    """
    version = getattr(dfc, "__version__", None)
    if isinstance(version, str) and version:
        return version
    try:
        return importlib.metadata.version(DFC_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def net_name_for(bundle_name: str) -> str:
    """The DFC network name for a bundle: letters, digits and '_' (HEF streams are `<net>/...`)."""
    name = re.sub(r"[^a-z0-9_]", "_", bundle_name.lower())
    return name if re.match(r"^[a-z_]", name) else f"net_{name}"


def model_script(calibration_size: int, optimization_level: int | None) -> str:
    """The model script (.alls) for our models.

    No `normalization(...)` line: nodes normalise each window before the model, so the HEF must
    take normalised input just as the ONNX does.
    """
    lines = [
        "model_optimization_config(calibration, "
        f"batch_size={min(CALIBRATION_BATCH, calibration_size)}, "
        f"calibset_size={calibration_size})"
    ]
    if optimization_level is not None:
        lines.append(f"model_optimization_flavor(optimization_level={optimization_level})")
    return "\n".join(lines) + "\n"


def to_nhwc(windows: FloatArray) -> FloatArray:
    """(N, 100, 9) windows as the DFC's NHWC input (N, 1, 100, 9): H=1, W=time, C=channels."""
    return np.ascontiguousarray(windows.reshape(len(windows), 1, WINDOW_LENGTH, CHANNELS))


def end_node_names(onnx_bytes: bytes, output_names: Sequence[str]) -> list[str]:
    """The ONNX nodes that produce the given output tensors.

    ⚠ Hailo's examples pass node names as `end_node_names` (e.g. `/model.22/cv2.0/cv2.0.2/Conv`)
    and the graph input's tensor name as `start_node_names`; whether the parser also accepts an
    output *tensor* name is unverified. So the producing node's name is passed, and the tensor
    name only for a node without a name.
    """
    graph = onnx.load_from_string(onnx_bytes).graph
    producers = {out: node.name for node in graph.node for out in node.output}
    names = []
    for tensor in output_names:
        if tensor not in producers:
            msg = f"the model has no node producing output {tensor!r}"
            raise CompileError(msg)
        names.append(producers[tensor] or tensor)
    return names


def translate(
    runner: Any, onnx_path: Path, net_name: str, input_name: str, end_nodes: list[str]
) -> None:
    """Parse the ONNX into the runner.

    ⚠ The keyword names (`start_node_names`, `end_node_names`, `net_input_shapes`) come from
    third-party and model-zoo code, not from Hailo's guide (hailo-notes.md section 8, item 1).
    `net_input_shapes` is given in the ONNX input's own layout, as Hailo's examples do
    (`{'images': [1, 3, 640, 640]}` for an NCHW model); ours is NTC [1, 100, 9], which the DFC
    should map to its NHWC input (1, 1, 100, 9), i.e. H=1, W=100, C=9. The path is passed as a
    str because some Hailo entry points refuse pathlib.Path.
    """
    runner.translate_onnx_model(
        str(onnx_path),
        net_name,
        start_node_names=[input_name],
        end_node_names=end_nodes,
        net_input_shapes={input_name: [1, WINDOW_LENGTH, CHANNELS]},
    )


def latent_rows(result: Any, count: int) -> FloatArray:
    """The (count, 64) latent from whatever `runner.infer` returned.

    ⚠ The emulator's return type is unverified: one array for one output, a list (or dict) for
    several, each shaped NHWC (N, 1, 1, C) or NC (N, C). The latent is the output with 64 values
    per window, found by size like the runtime backend does; its order among outputs is not
    relied on.
    """
    if isinstance(result, Mapping):
        arrays = list(result.values())
    elif isinstance(result, list | tuple):
        arrays = list(result)
    else:
        arrays = [result]
    found = [
        np.asarray(a, dtype=np.float32).reshape(count, -1)
        for a in arrays
        if np.asarray(a).size == count * LATENT_DIM
    ]
    if len(found) != 1:
        shapes = [np.asarray(a).shape for a in arrays]
        msg = f"the emulator returned {shapes}; expected exactly one with {LATENT_DIM} per window"
        raise CompileError(msg)
    return found[0]


def emulate(runner: Any, context: Any, data: FloatArray) -> FloatArray:
    """Latents (N, 64) of NHWC `data` on the DFC's emulator in `context`."""
    with runner.infer_context(context) as ctx:
        result = runner.infer(ctx, data)
    return latent_rows(result, len(data))


@contextlib.contextmanager
def dfc_errors(what: str) -> Iterator[None]:
    """Turn the DFC's own exceptions (classes unverified) into CompileError."""
    try:
        yield
    except CompileError:
        raise
    except Exception as exc:
        msg = f"the Dataflow Compiler failed to {what}: {type(exc).__name__}: {exc}"
        raise CompileError(msg) from exc
