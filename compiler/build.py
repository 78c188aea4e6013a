"""`compile()`: ONNX model in, `CompiledModel` out. It orchestrates; passes and kernels live elsewhere."""

from __future__ import annotations

import dataclasses
import threading
import time
import warnings
from pathlib import Path

from compiler.artifact import export_executable
from compiler.diagnose import compile_phase, default_opset
from compiler.errors import ModelError, QuantvmError
from compiler.frontend import ImportedModel, import_onnx, model_source
from compiler.fallback import accuracy_fallback
from compiler.int8_options import QuantizationOptions
from compiler.kernel_origins import kernel_table
from compiler.metadata import (ArtifactMetadata, FusionSummary, ModelInfo, QuantizationSummary, TargetInfo,
                               TensorSpec)
from compiler.quantization import output_error, quantize
from compiler.report import CompileReport, QuantizationReport
from compiler.torch_export import export_to_onnx, is_torch_module, require_torch
from compiler.tuning_db import open_tuning_db
from compiler.runtime import (Predictor, check_host_can_run, check_thread_count, flatten_outputs, host_cores,
                              resolve_num_threads, use_threads)
from relay_passes import GraphBuild, run_phases, select_rules
from relay_passes.pipeline import PHASE_NAMES
from targets import TargetSpec, missing_features, resolve_target


def quantvm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("quantvm")
    except PackageNotFoundError:
        return "0+unknown"


class CompiledModel:
    """A model compiled for one target: run it (where the host can), export it, read its metadata."""

    def __init__(self, executable, metadata: ArtifactMetadata, compile_seconds: float, report: CompileReport,
                 num_threads: int | None = None):
        self.executable = executable
        self.metadata = metadata
        self.compile_seconds = compile_seconds
        self.report = report
        self.num_threads = num_threads  # as given to compile(): it overrides TVM_NUM_THREADS in this process
        self._predictor = None
        self._predictor_lock = threading.Lock()

    @property
    def target(self) -> str:
        return self.metadata.target.name

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self.metadata.inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self.metadata.outputs)

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
            quantization: QuantizationOptions | None = None, example_inputs=None, winograd: bool = True,
            **int8_options) -> CompiledModel:
    """Compile an ONNX model (path, bytes or ModelProto) for `target`; INT8 when `calib` data is given.

    A PyTorch module is taken too, with `example_inputs` (a tensor or a tuple, one per forward argument):
    it is exported to ONNX at their shapes (compiler.torch_export; needs `quantvm[torch]`), its inputs named
    after forward's parameters.

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
    sensitive layers to fp32 until the drop is within it (`report.quantization.fallback`).

    `num_threads`: the threads the code is built for and runs on (recorded in the metadata); None: all
    cores for target native, the target's own -num-cores (or none) for the others. Runs in this process use
    it, else $TVM_NUM_THREADS, else the recorded count; see `load()` for an exported model.

    `tuning_db`: a database directory written by `tune()` for this target: its tuned kernels replace the
    default schedules where it has them (`report.tuning` says which).

    `winograd`: fp32 3x3 convs of stride 1 run as Winograd F(4x4, 3x3) or F(2x2, 3x3) where it pays
    (targets.winograd_convs): 1.5-2.5x faster, their weights stored up to 4x larger. False keeps every conv
    direct.
    """
    start = time.perf_counter()
    spec = target_with_threads(resolve_target(target), num_threads)
    tuning = open_tuning_db(tuning_db, spec) if tuning_db is not None else None
    options = QuantizationOptions.from_keywords(quantization, **int8_options)
    job = prepare_model(model, input_shapes, constant_inputs, fuse, calib, options, num_threads, eval_data,
                        spec=spec, tuning=tuning, example_inputs=example_inputs, winograd=winograd)
    build = job.run(start="layout")
    imported = job.imported
    report = CompileReport.from_build(build, job.quantization, job.calibration_seconds)
    if tuning is not None:
        report.tuning = tuning.check_applied(imported, report.precision, report.schedules)
    compiled = CompiledModel(build.executable, artifact_metadata(imported, spec, report, build.kernel_calls),
                             time.perf_counter() - start, report, num_threads)
    if job.first_batch and not missing_features(spec.required_features):
        with compile_phase(imported.source, "running the int8 build on a calibration batch", imported):
            int8_output = compiled.run(**job.first_batch["inputs"])[0]
        report.quantization.output_error = output_error(job.first_batch["fp32_output"], int8_output)
    return compiled


class ModelJob:
    """One model through relay_passes.PIPELINE: the compiler's side of it (the import and quantize hooks, the
    error translation) and what it reports; `run()` runs the phases on `build`."""

    def __init__(self, model, input_shapes, constant_inputs, build: GraphBuild, calib,
                 options: QuantizationOptions, num_threads, eval_data):
        self.model, self.input_shapes, self.constant_inputs = model, input_shapes, constant_inputs
        self.calib, self.options, self.num_threads, self.eval_data = calib, options, num_threads, eval_data
        self.build = build
        self.imported: ImportedModel | None = None
        self.quantization: QuantizationReport | None = None  # the int8 rewrite's report, once it ran
        self.calibration_seconds: float | None = None
        self.first_batch: dict = {}  # the first calibration batch and its fp32 output, for the int8 output error
        build.importer = self._import
        if calib is not None or options.calib_mode == "none":
            build.quantizer = self._quantize

    @property
    def source(self) -> str:
        return self.imported.source if self.imported is not None else model_source(self.model)

    def run(self, start: str = PHASE_NAMES[0], stop: str = PHASE_NAMES[-1]) -> GraphBuild:
        return run_phases(self.build, start, stop, guard=self._guard)

    def _guard(self, phase):
        where = f" for target {self.build.spec.name!r}" if PHASE_NAMES.index(phase.name) >= LAYOUT else ""
        return compile_phase(self.source, phase.describe + where, self.imported)

    def _import(self):
        self.imported = import_onnx(self.model, self.input_shapes, self.constant_inputs)
        return self.imported.mod

    def _quantize(self, graph):
        """Calibrate, plan (with the accuracy fallback when asked) and rewrite to int8."""
        calibration_started = time.perf_counter()
        host = HostBuilder(self.imported, self.build.rules, self.num_threads)
        quantization = quantize(graph, self.imported.onnx_model, self.imported.inputs, self.calib, self.options,
                                host.runner, bounded_pairs=self.options.bounds_pairs(self.build.spec))
        reverted: frozenset = frozenset()
        if self.options.max_drop is not None and quantization.planned:
            with compile_phase(self.source, "the accuracy fallback", self.imported):
                fallback = accuracy_fallback(quantization, host, self.eval_data)
            quantization.extra["fallback"] = fallback.to_json()
            reverted = frozenset(fallback.reverted)
        with compile_phase(self.source, "int8 rewrite", self.imported):
            graph = quantization.graph(reverted)
        self.quantization = quantization.report(reverted)
        self.calibration_seconds = time.perf_counter() - calibration_started
        self.first_batch = quantization.first
        return graph


LAYOUT = PHASE_NAMES.index("layout")


def prepare_model(model, input_shapes, constant_inputs, fuse, calib, options: QuantizationOptions,
                  num_threads, eval_data=None, spec: TargetSpec | None = None, tuning=None,
                  example_inputs=None, winograd: bool = True) -> ModelJob:
    """Run the phases up to and including `quantize` (with calibration data, or calib_mode none) on `model`
    (ONNX, or a PyTorch module with `example_inputs`): its graph as the target-specific phases take it, in
    `job.build.mod`."""
    model = onnx_model_of(model, example_inputs)
    try:
        rules = select_rules(fuse)
    except ValueError as err:
        raise QuantvmError(str(err)) from None
    _warn_unused(calib, eval_data, options)
    spec = spec or target_with_threads(resolve_target("native"), num_threads)
    job = ModelJob(model, input_shapes, constant_inputs, GraphBuild(spec, rules, tuning=tuning, winograd=winograd), calib, options,
                   num_threads, eval_data)
    job.run(stop="quantize")
    return job


def onnx_model_of(model, example_inputs):
    """`model` as compile() imports it: ONNX as given, a PyTorch module exported at `example_inputs`' shapes."""
    if is_torch_module(model):
        if example_inputs is None:
            raise ModelError(f"compiling a PyTorch module ({type(model).__name__}) needs example_inputs: a tensor "
                             "or a tuple of them, one per argument of its forward, at the shapes to compile for")
        return export_to_onnx(model, example_inputs)
    if example_inputs is not None:
        require_torch()  # no torch: say so, rather than that this is not a module
        raise QuantvmError(f"example_inputs is for PyTorch modules, and the model is a {type(model).__name__}; "
                           "an ONNX model's shapes come from the model and input_shapes")
    return model


def _warn_unused(calib, eval_data, options: QuantizationOptions) -> None:
    if calib is not None and options.calib_mode == "none":
        warnings.warn("calib_mode='none' computes ranges at run time: the calibration data is not used", stacklevel=4)
    if options.calib_mode == "none" and (options.max_drop is not None or options.bias_correction == "full"):
        raise QuantvmError("max_drop and bias_correction='full' measure the model on calibration data: "
                           "they need calib data and a calib_mode other than 'none'")
    if options.max_drop is None and (eval_data is not None or options.metric is not None):
        warnings.warn("eval_data and metric are only used with max_drop: they are ignored", stacklevel=4)


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

        main = relax.VirtualMachine(self._build(graph).executable, tvm.cpu())["main"]
        names = [s.name for s in self.imported.inputs]
        threads = resolve_num_threads(self.num_threads)

        def run(batch: dict, extra=()) -> list:
            use_threads(threads)  # calibration starts this thread's TVM pool: size it before it does
            args = [tvm.runtime.tensor(batch[n]) for n in names] + [tvm.runtime.tensor(a) for a in extra]
            return [t.numpy() for t in flatten_outputs(main(*args))]

        return run

    def model(self, graph, quantization: QuantizationReport | None = None) -> CompiledModel:
        """`graph` built for this host as a CompiledModel, as a user's metric takes it."""
        build = self._build(graph)
        report = CompileReport.from_build(build, quantization)
        return CompiledModel(build.executable, artifact_metadata(self.imported, self.spec, report, build.kernel_calls),
                             0.0, report,
                             self.num_threads)

    def _build(self, graph) -> GraphBuild:
        """`graph` (canonicalised and folded, maybe int8) through the target phases, for this host."""
        imported = self.imported
        return run_phases(GraphBuild(self.spec, self.rules, mod=graph), start="layout",
                          guard=lambda phase: compile_phase(imported.source, f"{phase.describe} for this host",
                                                            imported))


def artifact_metadata(imported: ImportedModel, spec: TargetSpec, report: CompileReport,
                      kernel_calls=()) -> ArtifactMetadata:
    """What an artifact of this build records about itself: the one place metadata is made. `kernel_calls`:
    the build's (kernel, source tags) per call, for the ONNX nodes of each kernel (compiler.kernel_origins)."""
    import tvm

    quant = report.quantization
    return ArtifactMetadata(
        quantvm_version=quantvm_version(),
        tvm_version=tvm.__version__,
        target=TargetInfo(spec.name, spec.mcpu, spec.tvm_dict(), tuple(spec.required_features), spec.num_cores),
        model=ModelInfo(imported.source, imported.onnx_model.graph.name, imported.sha256,
                        default_opset(imported.onnx_model)),
        inputs=tuple(imported.inputs),
        outputs=tuple(imported.outputs),
        quantization=(QuantizationSummary("int8", quant.calib_mode, dict(quant.int8_ops), dict(quant.fp32_ops))
                      if quant else QuantizationSummary("fp32")),
        fusion=FusionSummary(tuple(report.rules), dict(report.fusion)),
        kernels=kernel_table(imported.onnx_model, list(kernel_calls)),
    )
