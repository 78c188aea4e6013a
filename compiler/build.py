"""`compile()`: ONNX model in, `CompiledModel` out. It orchestrates; passes and kernels live elsewhere."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
import warnings
from pathlib import Path

from compiler.artifact import FORMAT, FORMAT_VERSION, export_executable
from compiler.errors import ModelError, QuantvmError
from compiler.frontend import ImportedModel, TensorSpec, import_onnx
from compiler.fallback import accuracy_fallback
from compiler.int8_options import QuantizationOptions
from compiler.quantization import output_error, quantize
from compiler.tuning_db import open_tuning_db
from compiler.runtime import (Predictor, check_host_can_run, check_thread_count, flatten_outputs, host_cores,
                              resolve_num_threads, use_threads)
from relay_passes import build_pipeline, count_kernels, prepare_graph, select_rules
from relay_passes import fuse as fuse_graph
from targets import (ScheduleLog, TargetSpec, block_channels, legalize_overrides, missing_features,
                     resolve_target, schedule_pass)


def quantvm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("quantvm")
    except PackageNotFoundError:
        return "0+unknown"


class CompiledModel:
    """A model compiled for one target: run it (where the host can), export it, read its metadata."""

    def __init__(self, executable, metadata: dict, compile_seconds: float, report: dict | None = None,
                 num_threads: int | None = None):
        self.executable = executable
        self.metadata = metadata
        self.compile_seconds = compile_seconds
        self.report = report or {}
        self.num_threads = num_threads  # as given to compile(): it overrides TVM_NUM_THREADS in this process
        self._predictor = None
        self._predictor_lock = threading.Lock()

    @property
    def target(self) -> str:
        return self.metadata["target"]["name"]

    @property
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec.from_json(t) for t in self.metadata["inputs"]]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec.from_json(t) for t in self.metadata["outputs"]]

    def run(self, *args, **kwargs):
        """Run on numpy inputs (by position or name); returns the outputs in model order."""
        return self._runner().run(*args, **kwargs)

    __call__ = run

    def _runner(self) -> Predictor:
        """The one Predictor (thread-safe itself), made on first use: threads racing here make it once."""
        if self._predictor is None:
            with self._predictor_lock:
                if self._predictor is None:
                    check_host_can_run(self.metadata, "this model")
                    self._predictor = Predictor(self.executable, self.metadata, self.num_threads)
        return self._predictor

    def export(self, path) -> Path:
        """Write one self-contained `.so` (kernels, VM code, weights, metadata), atomically."""
        return export_executable(self.executable, self.metadata, path)


def compile(model, target: str | TargetSpec = "cascadelake", calib=None,  # noqa: A001 (the API's name)
            input_shapes: dict | None = None, constant_inputs: dict | None = None, fuse=True,
            num_threads: int | None = None, tuning_db=None, eval_data=None,
            quantization: QuantizationOptions | None = None, **int8_options) -> CompiledModel:
    """Compile an ONNX model (path, bytes or ModelProto) for `target`; INT8 when `calib` data is given.

    `input_shapes` fixes dynamic dimensions, e.g. {"data": (1, 3, 224, 224)}. `constant_inputs` binds
    inputs that are really constants (a shape, pads) to arrays; they are then no longer run-time inputs.
    `fuse` is True (every rule of relay_passes.RULES), False (none), or the names of the rules to apply.

    INT8: `calib` is an iterable of batches (dicts name -> array, one array, or tuples in input order).
    The INT8 options are one `QuantizationOptions` (`quantization=`) or its fields as keywords, which
    override it: `calib_mode` mse (default) | naive | entropy | percentile | custom (with `collector`) |
    none (no calibration data: ranges computed at run time); `bias_correction` fast (default) | full | None;
    `quantized_dtype`; `exclude_layers` (ONNX node names), `exclude_layers_match` (substrings) and
    `exclude_operators` (Conv, Gemm, MatMul, AveragePool, GlobalAveragePool) keep layers in fp32;
    `max_drop` with `metric` ((CompiledModel) -> float, higher is better) or, without one, agreement with
    fp32 on `eval_data` (batches like `calib`'s; default: the calibration batches) reverts the most
    sensitive layers to fp32 until the drop is within it (`report["quantization"]["fallback"]`).

    `num_threads`: the threads the code is built for and runs on (recorded in the metadata); None: all
    cores for target native, the target's own -num-cores (or none) for the others. Runs in this process use
    it, else $TVM_NUM_THREADS, else the recorded count; see `load()` for an exported model.

    `tuning_db`: a database directory written by `tune()` for this target: its tuned kernels replace the
    default schedules where it has them (`report["tuning"]` says which).
    """
    start = time.perf_counter()
    spec = target_with_threads(resolve_target(target), num_threads)
    tuning = open_tuning_db(tuning_db, spec) if tuning_db is not None else None
    options = QuantizationOptions.from_keywords(quantization, **int8_options)
    prepared = prepare_model(model, input_shapes, constant_inputs, fuse, calib, options, num_threads, eval_data)
    imported, report, first_batch = prepared.imported, prepared.report, prepared.first_batch
    executable, fusion = _build(prepared.graph, spec, prepared.rules, imported.source, tuning)
    report.update(fusion)
    if tuning is not None:
        report["tuning"] = tuning.check_applied(imported, precision(report), fusion["schedules"])
    compiled = CompiledModel(executable, _metadata(imported, spec, report), time.perf_counter() - start, report,
                             num_threads)
    if first_batch and not missing_features(spec.required_features):
        with compile_phase(imported.source, "running the int8 build on a calibration batch"):
            int8_output = compiled.run(**first_batch["inputs"])[0]
        report["quantization"]["output_error"] = output_error(first_batch["fp32_output"], int8_output)
    return compiled


@dataclasses.dataclass
class ModelGraph:
    """An imported model's graph as it will be built: prepared and, with calibration, quantized."""
    imported: ImportedModel
    graph: object
    rules: list
    report: dict
    first_batch: dict  # the first calibration batch and its fp32 output, for the int8 output error


def prepare_model(model, input_shapes, constant_inputs, fuse, calib, options: QuantizationOptions,
                  num_threads, eval_data=None) -> ModelGraph:
    """Import `model`, prepare its graph and, given calibration data (or calib_mode none), quantize it."""
    try:
        rules = select_rules(fuse)
    except ValueError as err:
        raise QuantvmError(str(err)) from None
    imported = import_onnx(model, input_shapes, constant_inputs)
    with compile_phase(imported.source, "preparing the graph"):
        graph = prepare_graph(imported.mod)
    report: dict = {}
    first_batch: dict = {}
    _warn_unused(calib, eval_data, options)
    if calib is not None or options.calib_mode == "none":
        calibration_started = time.perf_counter()
        host = HostBuilder(imported, rules, num_threads)
        with compile_phase(imported.source, "int8 calibration and quantization"):
            quantization = quantize(graph, imported.onnx_model, imported.inputs, calib, options, host.runner)
        reverted: frozenset = frozenset()
        if options.max_drop is not None and quantization.planned:
            with compile_phase(imported.source, "the accuracy fallback"):
                fallback = accuracy_fallback(quantization, host, eval_data)
            quantization.extra["fallback"] = fallback.to_json()
            reverted = frozenset(fallback.reverted)
        with compile_phase(imported.source, "int8 rewrite"):
            graph = quantization.graph(reverted)
        report["quantization"] = quantization.report(reverted)
        report["calibration_seconds"] = time.perf_counter() - calibration_started
        first_batch = quantization.first
    return ModelGraph(imported, graph, rules, report, first_batch)


def _warn_unused(calib, eval_data, options: QuantizationOptions) -> None:
    if calib is not None and options.calib_mode == "none":
        warnings.warn("calib_mode='none' computes ranges at run time: the calibration data is not used", stacklevel=4)
    if options.calib_mode == "none" and (options.max_drop is not None or options.bias_correction == "full"):
        raise QuantvmError("max_drop and bias_correction='full' measure the model on calibration data: "
                           "they need calib data and a calib_mode other than 'none'")
    if options.max_drop is None and (eval_data is not None or options.metric is not None):
        warnings.warn("eval_data and metric are only used with max_drop: they are ignored", stacklevel=4)


def precision(report: dict) -> str:
    return "int8" if report.get("quantization") else "fp32"


def target_with_threads(spec: TargetSpec, num_threads) -> TargetSpec:
    """`spec` with the thread count its code is for (TVM's num-cores): `num_threads`, else the target's own,
    else all cores where the target is this host; a server target named without a count keeps none."""
    if num_threads is not None:
        count = check_thread_count(num_threads, "num_threads")
    elif spec.num_cores is not None:
        count = check_thread_count(spec.num_cores, f"the -num-cores of target {spec.name!r}")
    elif spec.name == "native":
        count = host_cores()
    else:
        return spec
    return dataclasses.replace(spec, num_cores=count)


def fused_graph(graph, spec: TargetSpec, rules):
    """`graph` in the target's blocked layouts, with the fusion rules applied: what is lowered to kernels."""
    return fuse_graph(block_channels(graph, spec), rules)


def _build(graph, spec: TargetSpec, rules, source: str, tuning=None):
    """Fuse and build `graph` for `spec` (with `tuning`'s kernels where it has them); return the
    executable and the fusion report."""
    import tvm

    with compile_phase(source, f"laying out and fusing the graph for target {spec.name!r}"):
        fused, fusion = fused_graph(graph, spec, rules)
    result = {**fusion.to_json(), "rules": list(rules)}
    tvm_target = spec.tvm_target()
    schedules = ScheduleLog()

    def record_kernels(lowered):
        result.update(count_kernels(lowered))

    schedule = schedule_pass(spec, schedules)
    if tuning is not None:
        schedule = tvm.transform.Sequential([tuning.apply_pass(tvm_target), schedule])
    with compile_phase(source, f"building for target {spec.name!r}"):
        pipeline = build_pipeline(tvm_target, record_kernels, legalize_overrides(), schedule)
        with tuning.database() if tuning is not None else contextlib.nullcontext():
            executable = tvm.compile(fused, tvm_target, relax_pipeline=pipeline)
    result["schedules"] = {"applied": schedules.applied, "unscheduled": schedules.failed, "tuned": schedules.tuned}
    return executable, result


@contextlib.contextmanager
def compile_phase(source: str, phase: str):
    """One place per compile phase that turns TVM's bare errors (InternalError, ValueError, TypeError...)
    into a ModelError naming the model and the phase; quantvm's own errors pass through as they are."""
    try:
        yield
    except QuantvmError:
        raise
    except Exception as err:  # noqa: BLE001 (anything else is TVM failing on this model)
        text = str(err).strip()
        raise ModelError(f"{source}: {phase} failed: {text.splitlines()[0] if text else type(err).__name__}") from err


class HostBuilder:
    """Builds graphs of one model for this host, for calibration, the simulator and the fallback's metric."""

    def __init__(self, imported: ImportedModel, rules, num_threads: int | None):
        self.imported, self.rules, self.num_threads = imported, rules, num_threads
        self.spec = target_with_threads(resolve_target("native"), num_threads)

    def runner(self, graph):
        """Build `graph`; return (batch dict, extra=()) -> list of numpy outputs, the model's inputs taken in
        order and the `extra` arrays after them."""
        import tvm
        from tvm import relax

        executable, _ = _build(graph, self.spec, self.rules, self.imported.source)
        main = relax.VirtualMachine(executable, tvm.cpu())["main"]
        names = [s.name for s in self.imported.inputs]
        threads = resolve_num_threads(self.num_threads)

        def run(batch: dict, extra=()) -> list:
            use_threads(threads)  # calibration starts this thread's TVM pool: size it before it does
            args = [tvm.runtime.tensor(batch[n]) for n in names] + [tvm.runtime.tensor(a) for a in extra]
            return [t.numpy() for t in flatten_outputs(main(*args))]

        return run

    def model(self, graph, report: dict | None = None) -> CompiledModel:
        """`graph` built for this host as a CompiledModel, as a user's metric takes it."""
        executable, fusion = _build(graph, self.spec, self.rules, self.imported.source)
        report = {**(report or {}), **fusion}
        return CompiledModel(executable, _metadata(self.imported, self.spec, report), 0.0, report, self.num_threads)


def _metadata(imported: ImportedModel, spec: TargetSpec, report: dict) -> dict:
    import tvm

    graph = imported.onnx_model.graph
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "quantvm_version": quantvm_version(),
        "tvm_version": tvm.__version__,
        "target": {"name": spec.name, "mcpu": spec.mcpu, "tvm": spec.tvm_dict(),
                   "required_features": list(spec.required_features), "num_threads": spec.num_cores},
        "model": {"source": imported.source, "graph_name": graph.name, "sha256": imported.sha256,
                  "opset": max((o.version for o in imported.onnx_model.opset_import if o.domain in ("", "ai.onnx")),
                               default=None)},
        "inputs": [s.to_json() for s in imported.inputs],
        "outputs": [s.to_json() for s in imported.outputs],
        "quantization": _quantization_summary(report.get("quantization")),
        "fusion": {"rules": report["rules"], "matches": report["fusion"]},
    }


def _quantization_summary(quant: dict | None) -> dict:
    if not quant:
        return {"mode": "fp32"}
    return {"mode": "int8", "calib_mode": quant["calib_mode"], "int8_ops": quant["int8_ops"],
            "fp32_ops": quant["fp32_ops"]}
