"""`compile()`: ONNX model in, `CompiledModel` out. It orchestrates; passes and kernels live elsewhere."""

from __future__ import annotations

import time
from pathlib import Path

from compiler.artifact import FORMAT, FORMAT_VERSION, export_executable
from compiler.errors import QuantvmError
from compiler.frontend import ImportedModel, import_onnx
from compiler.runtime import Predictor, check_host_can_run
from relay_passes import build_pipeline, count_kernels, prepare_graph, select_rules
from relay_passes import fuse as fuse_graph
from targets import TargetSpec, resolve_target


def quantvm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("quantvm")
    except PackageNotFoundError:
        return "0+unknown"


class CompiledModel:
    """A model compiled for one target: run it (where the host can), export it, read its metadata."""

    def __init__(self, executable, metadata: dict, compile_seconds: float, report: dict | None = None):
        self.executable = executable
        self.metadata = metadata
        self.compile_seconds = compile_seconds
        self.report = report or {}
        self._predictor = None

    @property
    def target(self) -> str:
        return self.metadata["target"]["name"]

    @property
    def inputs(self):
        return self._runner().inputs if self._predictor else self.metadata["inputs"]

    def run(self, *args, **kwargs):
        """Run on numpy inputs (by position or name); returns the outputs in model order."""
        return self._runner().run(*args, **kwargs)

    __call__ = run

    def _runner(self) -> Predictor:
        if self._predictor is None:
            check_host_can_run(self.metadata, "this model")
            self._predictor = Predictor(self.executable, self.metadata)
        return self._predictor

    def export(self, path) -> Path:
        """Write one self-contained `.so` (kernels, VM code, weights, metadata), atomically."""
        return export_executable(self.executable, self.metadata, path)


def compile(model, target: str | TargetSpec = "cascadelake", calib=None,  # noqa: A001 (the API's name)
            input_shapes: dict | None = None, constant_inputs: dict | None = None,
            fuse=True) -> CompiledModel:
    """Compile an ONNX model (path, bytes or ModelProto) for `target`.

    `input_shapes` fixes dynamic dimensions, e.g. {"data": (1, 3, 224, 224)}. `constant_inputs` binds
    inputs that are really constants (a shape, pads) to arrays; they are then no longer run-time inputs.
    `fuse` is True (every rule of relay_passes.RULES), False (none), or the names of the rules to apply.
    """
    if calib is not None:
        raise QuantvmError("INT8 calibration is not available in this version of quantvm; "
                           "compile without calib= for an fp32 build")
    start = time.perf_counter()
    spec = resolve_target(target)
    try:
        rules = select_rules(fuse)
    except ValueError as err:
        raise QuantvmError(str(err)) from None
    imported = import_onnx(model, input_shapes, constant_inputs)
    mod, fusion = fuse_graph(prepare_graph(imported.mod), rules)
    report = {**fusion.to_json(), "rules": list(rules)}
    tvm_target = spec.tvm_target()

    def record_kernels(lowered):
        report["kernels"] = count_kernels(lowered)

    try:
        import tvm

        executable = tvm.compile(mod, tvm_target, relax_pipeline=build_pipeline(tvm_target, record_kernels))
    except Exception as err:  # TVM raises bare errors; say which model and target failed
        raise QuantvmError(f"{imported.source}: building for target {spec.name!r} failed: "
                           f"{str(err).strip().splitlines()[0] if str(err).strip() else err!r}") from err
    return CompiledModel(executable, _metadata(imported, spec, report), time.perf_counter() - start, report)


def _metadata(imported: ImportedModel, spec: TargetSpec, report: dict) -> dict:
    import tvm

    graph = imported.onnx_model.graph
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "quantvm_version": quantvm_version(),
        "tvm_version": tvm.__version__,
        "target": {"name": spec.name, "mcpu": spec.mcpu, "tvm": spec.tvm_dict(),
                   "required_features": list(spec.required_features)},
        "model": {"source": imported.source, "graph_name": graph.name, "sha256": imported.sha256,
                  "opset": max((o.version for o in imported.onnx_model.opset_import if o.domain in ("", "ai.onnx")),
                               default=None)},
        "inputs": [s.to_json() for s in imported.inputs],
        "outputs": [s.to_json() for s in imported.outputs],
        "quantization": {"mode": "fp32"},
        "fusion": {"rules": report["rules"], "matches": report["fusion"]},
    }
