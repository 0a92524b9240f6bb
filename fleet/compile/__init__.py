"""Compile bundles for accelerators: ONNX -> Hailo HEF with Hailo's Dataflow Compiler."""

from fleet.compile.dfc_api import CompileError, CompilerUnavailableError, CompileValidationError
from fleet.compile.hailo_dfc import STEPS, CompileReport, compile_bundle

__all__ = [
    "STEPS",
    "CompileError",
    "CompileReport",
    "CompileValidationError",
    "CompilerUnavailableError",
    "compile_bundle",
]
