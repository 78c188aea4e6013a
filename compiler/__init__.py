"""quantvm's user-facing package: `compile()`, `load()`, `CompiledModel`, the CLI.

The names below are imported on first use: `from compiler import load` (or `import compiler.runtime`) loads
and runs an artifact without importing onnx or the compiler's passes; `compile` brings them in.
"""

import importlib

_EXPORTS = {
    "CompiledModel": "compiler.build", "compile": "compiler.build",
    "QuantizationOptions": "compiler.int8_options",
    "Predictor": "compiler.runtime", "load": "compiler.runtime",
    "SensitivityReport": "compiler.sensitivity", "analyze": "compiler.sensitivity",
    "tune": "compiler.tuner",
    "ArtifactMetadata": "compiler.metadata", "TensorSpec": "compiler.metadata",
    "CompileReport": "compiler.report",
    **{name: "compiler.errors" for name in ("ArtifactError", "CalibrationError", "HostMismatchError", "InputError",
                                            "ModelError", "QuantvmError", "TargetError", "TuningError")},
}

__all__ = ["ArtifactError", "ArtifactMetadata", "CalibrationError", "CompileReport", "CompiledModel",
           "HostMismatchError", "InputError", "ModelError", "Predictor", "QuantizationOptions", "QuantvmError",
           "SensitivityReport", "TargetError", "TensorSpec", "TuningError", "analyze", "compile", "load", "tune"]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'compiler' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
