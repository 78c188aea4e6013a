"""The errors quantvm raises, as users import them: defined in `quantvm.errors`, below every package."""

from quantvm.errors import (ArtifactError, CalibrationError, HostMismatchError, InputError, ModelError,
                            QuantvmError, TargetError, TuningError)

__all__ = ["ArtifactError", "CalibrationError", "HostMismatchError", "InputError", "ModelError", "QuantvmError",
           "TargetError", "TuningError"]
