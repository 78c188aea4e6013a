"""quantvm's error hierarchy, the one thing every package shares.

It lives below `compiler/`, `relay_passes/`, `calib/` and `targets/` so that each can raise a `QuantvmError`
without importing the orchestrator. Users import the errors from `compiler` (or from here).
"""

from quantvm.errors import (ArtifactError, CalibrationError, HostMismatchError, InputError, ModelError,
                            QuantvmError, TargetError, TuningError)

__all__ = ["ArtifactError", "CalibrationError", "HostMismatchError", "InputError", "ModelError", "QuantvmError",
           "TargetError", "TuningError"]
