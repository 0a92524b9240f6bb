"""Stand-in for Hailo's Dataflow Compiler Python API, `hailo_sdk_client` (DFC 3.33), for tests.

The real package only exists inside Hailo's DFC install (x86-64 Ubuntu, Developer Zone login), so
tests compile against this one. It keeps the names and call shapes `shared/hailo-notes.md` section
4 gives (`ClientRunner(hw_arch=...)`, `translate_onnx_model(path, net_name,
start_node_names=..., end_node_names=..., net_input_shapes=...)`, `load_model_script`,
`optimize(calib)`, `infer_context(InferenceContext.X)` + `infer(ctx, data)`, `compile()`,
`save_har`/`load_har`) and is strict where the real one is (or is likely to be):

- translation checks the node names against the ONNX graph and the input shape against the
  model's [1, 100, 9] input;
- `optimize` and `infer` take float32 NHWC data, (N, 1, 100, 9) for our model (H=1, W=100,
  C=9), and refuse (N, 100, 9);
- calling things out of order (optimise before translating, compile before optimising) fails.

Underneath, the "emulator" is ONNX Runtime on the model's ONNX: SDK_NATIVE and SDK_FP_OPTIMIZED
return its float outputs; SDK_QUANTIZED returns them quantised to uint8 and back, with per-output
ranges taken from the calibration data at `optimize` time, exactly as `fake_hef.make_hef`
computes them (so the emulator agrees with the runtime stand-in running the compiled HEF).
`compile()` returns a stand-in HEF (`hailo_standin.fake_hef`).

Fault switches, read from the environment variable `HAILO_SDK_STANDIN` at call time
(comma-separated `key=1`):

- `broken_quantization=1`: SDK_QUANTIZED outputs are garbage (valid uint8 codes, unrelated to
  the input), so a compile flow's quantisation check must fail.
- `broken_translation=1`: the translated model sees its input channels reversed (as if a layout
  were mixed up), so its emulator outputs no longer match ONNX Runtime's.
- `compile_error=1`: `compile()` fails as the real allocator does when a model does not fit.

Exception class names follow what Hailo's tracebacks in public forum posts show
(`MisspellNodeError`, `UnsupportedModelError`, `BadInputsShape`, `BackendAllocatorException`);
their real module paths and hierarchy are uncertain, so code using the real DFC should not catch
them by name. Here they all derive from `SDKStandinError`, which is a stand-in-only name.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import orjson
from onnx import numpy_helper

from hailo_sdk_client._errors import (
    BackendAllocatorException,
    BadInputsShape,
    HardwareUnavailableError,
    InvalidStateError,
    MisspellNodeError,
    ModelScriptParsingError,
    SDKStandinError,
    UnsupportedModelError,
    UnsupportedShapeError,
)
from hailo_sdk_client._support import (
    ENV,
    FloatArray,
    calibset_size,
    fake_quantize,
    fault_on,
    faults,
    onnx_session,
    run_windows,
)
from hailo_standin.fake_hef import make_hef

__version__ = "3.33.0"

SUPPORTED_ARCHS = ("hailo8", "hailo8l", "hailo8r")
"""What DFC 3.x compiles for (Hailo-10/15 need DFC 5.x)."""
HAR_FORMAT = "hailo_sdk_client stand-in HAR v1"
MODEL_SCRIPT_COMMANDS = frozenset(
    {
        "normalization",
        "model_optimization_flavor",
        "model_optimization_config",
        "quantization_param",
        "performance_param",
        "resources_param",
        "pre_quantization_optimization",
        "post_quantization_optimization",
        "compiler_optimization",
        "allocator_param",
        "context_switch_param",
        "nms_postprocess",
        "change_output_activation",
    }
)
_SCRIPT_LINE = re.compile(r"^(?:[A-Za-z_]\w*\s*=\s*)?(?P<command>[A-Za-z_]\w*)\s*\((?P<args>.*)\)$")
_NET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class InferenceContext(enum.Enum):
    """Where `ClientRunner.infer` runs the model."""

    SDK_NATIVE = "sdk_native"
    """The translated model in full precision (no optimisation)."""
    SDK_FP_OPTIMIZED = "sdk_fp_optimized"
    """The optimised model in full precision (model-script changes applied, no quantisation)."""
    SDK_QUANTIZED = "sdk_quantized"
    """The quantised model on the bit-exact emulator."""
    SDK_HAILO_HW = "sdk_hailo_hw"
    """The compiled model on a Hailo device."""


@dataclass
class _InferContext:
    """What `infer_context` yields; valid only inside its `with` block."""

    context: InferenceContext
    runner: ClientRunner
    open: bool = True


@dataclass
class _Network:
    """The translated network: its ONNX and how its names map."""

    net_name: str
    onnx: bytes
    onnx_input: str
    input_shape: list[int]
    outputs: dict[str, int] = field(default_factory=dict)
    """ONNX output tensor name -> values per frame, in end-node order."""


class ClientRunner:
    """The DFC's entry point: translate, optimise, emulate, compile, save."""

    def __init__(self, hw_arch: str | None = None, har: str | os.PathLike[str] | None = None):
        arch = hw_arch or "hailo8"
        if arch not in SUPPORTED_ARCHS:
            msg = f"hw_arch {arch!r} is not supported by this DFC; choose one of {SUPPORTED_ARCHS}"
            raise ValueError(msg)
        self._hw_arch = arch
        self._network: _Network | None = None
        self._script: list[str] = []
        self._ranges: dict[str, tuple[float, float]] | None = None
        self._compiled = False
        self._session: ort.InferenceSession | None = None
        if har is not None:
            self.load_har(har)

    @property
    def hw_arch(self) -> str:
        """The target architecture."""
        return self._hw_arch

    @property
    def standin_model_script(self) -> str:
        """The model script loaded so far (stand-in only, for tests)."""
        return "\n".join(self._script)

    # -- translation ---------------------------------------------------------------------

    def translate_onnx_model(
        self,
        model: str | os.PathLike[str],
        net_name: str = "model",
        start_node_names: Sequence[str] | None = None,
        end_node_names: Sequence[str] | None = None,
        net_input_shapes: dict[str, Sequence[int]] | None = None,
    ) -> tuple[dict[str, Any], dict[str, FloatArray]]:
        """Parse an ONNX file into the runner; returns (hn, npz) like the real one.

        Start names may be graph input tensor names (Hailo's examples pass `images`); end names
        may be node names (Hailo's examples pass `/model.22/.../Conv`) or graph output tensor
        names: which of the two the real parser accepts for each is uncertain, so both work
        here. The stand-in translates whole graphs only: start at the graph input, end at graph
        outputs.
        """
        if not _NET_NAME.match(net_name):
            msg = (
                f"net_name {net_name!r} must be letters, digits and '_' (not starting with a digit)"
            )
            raise ValueError(msg)
        try:
            proto = onnx.load(os.fspath(model))
        except Exception as exc:
            msg = f"cannot read ONNX model {os.fspath(model)!r}: {exc}"
            raise UnsupportedModelError(msg) from exc
        graph = proto.graph
        initializers = {init.name for init in graph.initializer}
        inputs = [i for i in graph.input if i.name not in initializers]
        if len(inputs) != 1:
            msg = f"the stand-in translates single-input models; this one has {len(inputs)}"
            raise UnsupportedModelError(msg)
        onnx_input = inputs[0].name
        producers = {node.name: list(node.output) for node in graph.node if node.name}
        tensors = {t for node in graph.node for t in (*node.input, *node.output)}
        graph_outputs = [o.name for o in graph.output]

        starts = list(start_node_names) if start_node_names is not None else [onnx_input]
        for name in starts:
            if name == onnx_input:
                continue
            if name in producers or name in tensors:
                msg = (
                    f"the stand-in only translates from the graph input {onnx_input!r}, "
                    f"not {name!r}"
                )
                raise UnsupportedModelError(msg)
            msg = f"Unable to find start node names: [{name!r}], please verify and try again."
            raise MisspellNodeError(msg)

        ends = list(end_node_names) if end_node_names is not None else graph_outputs
        out_tensors: list[str] = []
        for name in ends:
            if name in graph_outputs:
                out_tensors.append(name)
            elif name in producers and set(producers[name]) & set(graph_outputs):
                out_tensors.extend(t for t in producers[name] if t in graph_outputs)
            elif name in producers or name in tensors:
                msg = f"the stand-in only translates to graph outputs; {name!r} is internal"
                raise UnsupportedModelError(msg)
            else:
                msg = f"Unable to find end node names: [{name!r}], please verify and try again."
                raise MisspellNodeError(msg)

        declared = [
            d.dim_value if d.HasField("dim_value") else None
            for d in inputs[0].type.tensor_type.shape.dim
        ]
        shape = self._input_shape(onnx_input, declared, net_input_shapes)
        onnx_bytes = proto.SerializeToString()
        session = onnx_session(onnx_bytes)
        probe = run_windows(session, onnx_input, np.zeros((1, 100, 9), np.float32), out_tensors)
        self._network = _Network(
            net_name=net_name,
            onnx=onnx_bytes,
            onnx_input=onnx_input,
            input_shape=shape,
            outputs={name: int(probe[name][0].size) for name in out_tensors},
        )
        self._session = session
        self._script, self._ranges, self._compiled = [], None, False
        hn = {
            "name": net_name,
            "net_params": {"version": __version__, "hw_arch": self._hw_arch},
            "layers": {
                f"{net_name}/input_layer1": {"type": "input_layer", "input_shapes": [shape]},
                **{
                    f"{net_name}/output_layer{index}": {"type": "output_layer", "onnx": name}
                    for index, name in enumerate(out_tensors, start=1)
                },
            },
        }
        npz = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        return hn, npz

    @staticmethod
    def _input_shape(
        onnx_input: str,
        declared: list[int | None],
        net_input_shapes: dict[str, Sequence[int]] | None,
    ) -> list[int]:
        if len(declared) != 3 or declared[1:] != [100, 9] or declared[0] not in {1, None}:
            msg = f"the stand-in translates [1, 100, 9] models; {onnx_input!r} is {declared}"
            raise UnsupportedShapeError(msg)
        if net_input_shapes is None:
            if declared[0] is None:
                msg = f"{onnx_input!r} has a dynamic batch: give net_input_shapes"
                raise UnsupportedShapeError(msg)
            return [1, 100, 9]
        unknown = set(net_input_shapes) - {onnx_input}
        if unknown:
            msg = f"net_input_shapes names {sorted(unknown)}, not the input {onnx_input!r}"
            raise MisspellNodeError(msg)
        given = [int(d) for d in net_input_shapes.get(onnx_input, [1, 100, 9])]
        if given != [1, 100, 9]:
            msg = (
                f"net_input_shapes[{onnx_input!r}] is {given}; the model's input is "
                f"{declared} (batch 1): give [1, 100, 9] in the ONNX's own layout"
            )
            raise UnsupportedShapeError(msg)
        return given

    # -- model script and optimisation ---------------------------------------------------

    def load_model_script(self, model_script: str | os.PathLike[str], append: bool = False) -> None:
        """Load model-script (.alls) commands, from text or a `.alls` file."""
        text = str(model_script)
        if isinstance(model_script, os.PathLike) or (
            text.endswith(".alls") and "\n" not in text and Path(text).is_file()
        ):
            text = Path(model_script).read_text(encoding="utf-8")
        lines = []
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            match = _SCRIPT_LINE.match(line)
            if not match or match["command"] not in MODEL_SCRIPT_COMMANDS:
                msg = f"model script line {number}: cannot parse {raw.strip()!r}"
                raise ModelScriptParsingError(msg)
            if match["command"] == "model_optimization_flavor":
                level = re.search(r"optimization_level\s*=\s*(-?\d+)", match["args"])
                if level and not 0 <= int(level[1]) <= 4:
                    msg = f"model script line {number}: optimization_level must be 0..4"
                    raise ModelScriptParsingError(msg)
            lines.append(line)
        self._script = [*self._script, *lines] if append else lines

    def optimize(
        self, calib_data: Any, data_type: str = "auto", work_dir: str | None = None
    ) -> None:
        """Quantise: per-output uint8 ranges from running the model on the calibration data."""
        del data_type, work_dir
        network = self._require_network("optimize")
        frames = self._frames(calib_data, "calibration data")
        size = calibset_size(self._script)
        if size is not None:
            frames = frames[:size]
        outputs = self._emulate(network, frames)
        self._ranges = {
            name: (float(values.min()), float(values.max())) for name, values in outputs.items()
        }
        self._compiled = False

    def optimize_full_precision(self, calib_data: Any = None) -> None:
        """Apply the model script's full-precision changes (a no-op in the stand-in)."""
        del calib_data
        self._require_network("optimize_full_precision")

    # -- emulation -----------------------------------------------------------------------

    @contextlib.contextmanager
    def infer_context(self, context: InferenceContext) -> Iterator[_InferContext]:
        """A context for `infer`: native needs a translated model, the others an optimised one."""
        if not isinstance(context, InferenceContext):
            msg = f"infer_context takes an InferenceContext, not {context!r}"
            raise TypeError(msg)
        if context is InferenceContext.SDK_HAILO_HW:
            msg = "SDK_HAILO_HW needs a Hailo device; the stand-in has none"
            raise HardwareUnavailableError(msg)
        self._require_network(f"infer_context({context.name})")
        if context is not InferenceContext.SDK_NATIVE and self._ranges is None:
            msg = f"{context.name} needs an optimised model: call optimize() first"
            raise InvalidStateError(msg)
        handle = _InferContext(context, self)
        try:
            yield handle
        finally:
            handle.open = False

    def infer(
        self,
        context: _InferContext,
        dataset: Any,
        data_count: int | None = None,
        batch_size: int = 8,
    ) -> FloatArray | list[FloatArray]:
        """Run NHWC frames; one array per output, (N, 1, 1, size), a list when several."""
        del batch_size
        if not isinstance(context, _InferContext) or context.runner is not self or not context.open:
            msg = "infer() needs the context object of an open `with runner.infer_context(...)`"
            raise InvalidStateError(msg)
        network = self._require_network("infer")
        frames = self._frames(dataset, "inference data")
        if data_count is not None:
            frames = frames[:data_count]
        outputs = self._emulate(network, frames)
        if context.context is InferenceContext.SDK_QUANTIZED:
            assert self._ranges is not None
            if fault_on("broken_quantization"):
                rng = np.random.default_rng(0)
                outputs = {
                    name: fake_quantize(
                        rng.uniform(*self._ranges[name], size=values.shape).astype(np.float32),
                        *self._ranges[name],
                    )
                    for name, values in outputs.items()
                }
            else:
                outputs = {
                    name: fake_quantize(values, *self._ranges[name])
                    for name, values in outputs.items()
                }
        shaped = [values.reshape(len(frames), 1, 1, -1) for values in outputs.values()]
        return shaped[0] if len(shaped) == 1 else shaped

    # -- compilation and HAR -------------------------------------------------------------

    def compile(self) -> bytes:
        """The HEF (stand-in format) of the optimised model."""
        network = self._require_network("compile")
        if self._ranges is None:
            msg = "compile() needs a quantised model: call optimize() first"
            raise InvalidStateError(msg)
        if fault_on("compile_error"):
            msg = "Compilation failed: No successful assignment for: conv1 (stand-in fault)"
            raise BackendAllocatorException(msg)
        self._compiled = True
        return make_hef(
            network.onnx,
            onnx_input=network.onnx_input,
            onnx_outputs=network.outputs,
            hw_arch=self._hw_arch,
            network_group=network.net_name,
            output_ranges=self._ranges,
            quantized=True,
        )

    def save_har(self, har_path: str | os.PathLike[str]) -> None:
        """Write the runner's state as a HAR (here: a small JSON file)."""
        network = self._require_network("save_har")
        state = {
            "format": HAR_FORMAT,
            "version": __version__,
            "hw_arch": self._hw_arch,
            "net_name": network.net_name,
            "onnx_input": network.onnx_input,
            "input_shape": network.input_shape,
            "outputs": network.outputs,
            "model_script": self._script,
            "ranges": self._ranges,
            "compiled": self._compiled,
            "onnx": base64.b64encode(network.onnx).decode("ascii"),
        }
        Path(har_path).write_bytes(orjson.dumps(state))

    def load_har(self, har: str | os.PathLike[str]) -> None:
        """Restore a runner saved by `save_har`."""
        try:
            state = orjson.loads(Path(har).read_bytes())
            if state.get("format") != HAR_FORMAT:
                raise ValueError("not a stand-in HAR")
            onnx_bytes = base64.b64decode(state["onnx"])
            network = _Network(
                net_name=state["net_name"],
                onnx=onnx_bytes,
                onnx_input=state["onnx_input"],
                input_shape=[int(d) for d in state["input_shape"]],
                outputs={str(k): int(v) for k, v in state["outputs"].items()},
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            msg = f"cannot load HAR {os.fspath(har)!r}: {exc}"
            raise UnsupportedModelError(msg) from exc
        self._hw_arch = str(state["hw_arch"])
        self._network = network
        self._session = onnx_session(onnx_bytes)
        self._script = [str(line) for line in state["model_script"]]
        ranges = state["ranges"]
        self._ranges = (
            None if ranges is None else {k: (float(v[0]), float(v[1])) for k, v in ranges.items()}
        )
        self._compiled = bool(state["compiled"])

    # -- internals -----------------------------------------------------------------------

    def _require_network(self, what: str) -> _Network:
        if self._network is None:
            msg = f"{what} needs a translated model: call translate_onnx_model() or load_har()"
            raise InvalidStateError(msg)
        return self._network

    def _frames(self, data: Any, what: str) -> FloatArray:
        """(N, 1, 100, 9) float32 NHWC frames from an array or {input_layer_name: array}."""
        network = self._require_network(what)
        layer = f"{network.net_name}/input_layer1"
        if isinstance(data, dict):
            if set(data) != {layer}:
                msg = f"{what} is keyed by {sorted(data)}; the network's input layer is {layer!r}"
                raise BadInputsShape(msg)
            data = data[layer]
        if not isinstance(data, np.ndarray):
            msg = f"{what} must be a numpy array (or a dict of them), not {type(data).__name__}"
            raise TypeError(msg)
        expected = (1, 100, 9)
        if data.ndim == 3 and data.shape[1:] == (100, 9):
            msg = (
                f"Data shape {data.shape} for layer {layer} doesn't match network's input shape "
                f"{expected}: {what} must be NHWC (N, H, W, C) = (N, 1, 100, 9); add the H axis"
            )
            raise BadInputsShape(msg)
        if data.ndim != 4 or tuple(data.shape[1:]) != expected:
            msg = (
                f"Data shape {data.shape} for layer {layer} doesn't match network's input "
                f"shape {expected}"
            )
            raise BadInputsShape(msg)
        if data.dtype != np.float32:
            msg = f"{what} must be float32, got {data.dtype}"
            raise BadInputsShape(msg)
        if len(data) < 1:
            msg = f"{what} is empty: give at least one frame"
            raise BadInputsShape(msg)
        if not np.isfinite(data).all():
            msg = f"{what} holds NaN or infinity"
            raise BadInputsShape(msg)
        return np.ascontiguousarray(data)

    def _emulate(self, network: _Network, frames: FloatArray) -> dict[str, FloatArray]:
        """Float outputs per ONNX output name, (N, size) each."""
        assert self._session is not None
        windows = frames.reshape(len(frames), 100, 9)
        if fault_on("broken_translation"):
            windows = np.ascontiguousarray(windows[..., ::-1])
        return run_windows(self._session, network.onnx_input, windows, list(network.outputs))


__all__ = [
    "ENV",
    "BackendAllocatorException",
    "BadInputsShape",
    "ClientRunner",
    "HardwareUnavailableError",
    "InferenceContext",
    "InvalidStateError",
    "MisspellNodeError",
    "ModelScriptParsingError",
    "SDKStandinError",
    "UnsupportedModelError",
    "UnsupportedShapeError",
    "__version__",
    "faults",
]
