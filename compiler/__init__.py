"""quantvm's user-facing package: `compile()`, `load()`, `CompiledModel`, the CLI."""

from compiler.build import CompiledModel, compile  # noqa: A004 (the API's name)
from compiler.errors import (ArtifactError, HostMismatchError, InputError, ModelError, QuantvmError,
                             TargetError)
from compiler.runtime import Predictor, load

__all__ = ["ArtifactError", "CompiledModel", "HostMismatchError", "InputError", "ModelError", "Predictor",
           "QuantvmError", "TargetError", "compile", "load"]
