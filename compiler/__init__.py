"""quantvm's user-facing package: `compile()`, `load()`, `CompiledModel`, the CLI."""

from compiler.build import CompiledModel, compile  # noqa: A004 (the API's name)
from compiler.errors import (ArtifactError, CalibrationError, HostMismatchError, InputError, ModelError,
                             QuantvmError, TargetError, TuningError)
from compiler.int8_options import QuantizationOptions
from compiler.runtime import Predictor, load
from compiler.sensitivity import SensitivityReport, analyze
from compiler.tune import tune

__all__ = ["ArtifactError", "CalibrationError", "CompiledModel", "HostMismatchError", "InputError", "ModelError",
           "Predictor", "QuantizationOptions", "QuantvmError", "SensitivityReport", "TargetError", "TuningError",
           "analyze", "compile", "load", "tune"]
