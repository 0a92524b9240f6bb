"""Compile bundles for accelerators: ONNX -> Hailo HEF with Hailo's Dataflow Compiler."""

from fleet.compile.hailo_dfc import (
    STEPS,
    CompileError,
    CompileReport,
    CompilerUnavailableError,
    CompileValidationError,
    compile_bundle,
)

__all__ = [
    "STEPS",
    "CompileError",
    "CompileReport",
    "CompileValidationError",
    "CompilerUnavailableError",
    "compile_bundle",
]
