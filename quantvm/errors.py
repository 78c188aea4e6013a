"""The errors quantvm raises. Every message names the file, node, tensor or input at fault."""


class QuantvmError(Exception):
    """Base class: the CLI prints these as one line."""


class ModelError(QuantvmError):
    """The ONNX model cannot be read, is invalid, or uses something quantvm cannot compile."""


class InputError(QuantvmError, ValueError):
    """Run-time inputs (or compile-time input shapes) do not match what the model expects."""


class CalibrationError(QuantvmError, ValueError):
    """Calibration data or a collector's result that cannot give thresholds; the message names the tensor."""


class TargetError(QuantvmError, ValueError):
    """An unknown target name or an unusable target string."""


class HostMismatchError(QuantvmError):
    """An artifact needs CPU features this host does not have."""


class ArtifactError(QuantvmError):
    """A file is not a readable (or intact) quantvm artifact, or an artifact cannot be written."""


class TuningError(QuantvmError):
    """Tuning cannot run (no tracker, no server for the key) or a tuning database does not fit the build."""
