"""Running compiled models: host checks, input checks, the Relax VM, and `load()` for exported artifacts.

Nothing here needs the compiler: a `.so` from `export()` loads with the TVM runtime alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compiler.artifact import read_metadata
from compiler.errors import HostMismatchError, InputError
from compiler.frontend import TensorSpec
from compiler.quiet import tvm_scope_warnings_silenced
from targets.host import host_model_name, missing_features


def check_host_can_run(metadata: dict, what: str) -> None:
    """Refuse, before any of its code is loaded, an artifact that needs CPU features this host lacks."""
    target = metadata["target"]
    missing = missing_features(target["required_features"])
    if missing:
        raise HostMismatchError(
            f"{what} was built for target {target['name']!r} (mcpu {target['mcpu']}) and needs CPU features "
            f"this host lacks: {', '.join(missing)} (host: {host_model_name()}). "
            "Compile for target 'native' to run here.")


class Predictor:
    """Runs one compiled model on numpy inputs, checked by name, shape and dtype before anything runs."""

    def __init__(self, module, metadata: dict):
        import tvm
        from tvm import relax

        self.metadata = metadata
        self.inputs = [TensorSpec.from_json(t) for t in metadata["inputs"]]
        self.outputs = [TensorSpec.from_json(t) for t in metadata["outputs"]]
        self._tvm = tvm
        self._vm = relax.VirtualMachine(module, tvm.cpu())
        self._main = self._vm["main"]

    def run(self, *args, **kwargs) -> list[np.ndarray]:
        """Run the model; inputs by position (model order) or by name. Returns the outputs in model order."""
        arrays = self._bind_inputs(args, kwargs)
        result = self._main(*(self._tvm.runtime.tensor(a) for a in arrays))
        return [t.numpy() for t in flatten_outputs(result)]

    __call__ = run

    def _bind_inputs(self, args, kwargs) -> list[np.ndarray]:
        names = [spec.name for spec in self.inputs]
        if len(args) > len(names):
            raise InputError(f"the model takes {len(names)} input(s) ({', '.join(names)}), got {len(args)} "
                             "positional")
        given = dict(zip(names, args))
        for name, value in kwargs.items():
            if name not in names:
                raise InputError(f"unknown input {name!r}; the model's inputs are {', '.join(names)}")
            if name in given:
                raise InputError(f"input {name!r} given both by position and by name")
            given[name] = value
        missing = [n for n in names if n not in given]
        if missing:
            raise InputError(f"missing input(s) {', '.join(map(repr, missing))}; expected "
                             + ", ".join(f"{s.name} {list(s.shape)} {s.dtype}" for s in self.inputs))
        return [_check_input(spec, given[spec.name]) for spec in self.inputs]


def _check_input(spec: TensorSpec, value) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype != np.dtype(spec.dtype):
        raise InputError(f"input {spec.name!r}: dtype {array.dtype} given, {spec.dtype} expected")
    if tuple(array.shape) != tuple(spec.shape):
        raise InputError(f"input {spec.name!r}: shape {list(array.shape)} given, {list(spec.shape)} expected")
    return np.require(array, requirements="C")  # (ascontiguousarray would turn a 0-d array into 1-d)


def flatten_outputs(result):
    """The VM's result (a tensor or nested tuples of them) as a flat list of tensors."""
    if hasattr(result, "numpy"):
        return [result]
    return [t for item in result for t in flatten_outputs(item)]


def load(path) -> Predictor:
    """Load an artifact written by `CompiledModel.export`. Only load artifacts you trust: it runs their code."""
    import tvm

    path = Path(path)
    metadata = read_metadata(path)
    check_host_can_run(metadata, str(path))
    with tvm_scope_warnings_silenced():
        module = tvm.runtime.load_module(str(path))
    return Predictor(module, metadata)
