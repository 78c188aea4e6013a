"""The pass order, written once: every phase from an ONNX model to VM code, in the order they run.

    import → canonicalise → fold → quantize → layout → fuse → kernels → schedule → lower

`PIPELINE` is that list. compile() runs all of it; tune() stops after `kernels` (MetaSchedule searches the
kernels as they are before `schedule`); the int8 calibration and the simulator build their host graphs from
`layout` on; analyze() stops after `fold`. Two phases need the compiler rather than a pass: `import` (the ONNX
fixes and TVM's importer) and `quantize` (calibration data, host builds); a `GraphBuild` carries them as hooks.

TVM's own FuseOps is left out: the only fusion is ours (relay_passes.fuse), so an unfused build is really
unfused and the compile report tells the truth.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu

from quantvm.quiet import tvm_noise_silenced
from relay_passes.canonicalize import Canonicalize
from relay_passes.fold_affine import FoldAffineIntoProducer
from relay_passes.fold_constants import fold_constants
from relay_passes.fuse import FusionReport, fuse
from relay_passes.kernel_origins import binding_sources, carried_tags, group_sources, kernel_sources
from relay_passes.patterns import REQUANTIZE_RULES
from relay_passes.requantize import fold_requantize
from targets import ScheduleLog, TargetSpec, block_channels, legalize_overrides, schedule_pass
from targets.bounded_pairs import bounded_pair_ops
from targets.layout import LayoutReport, vector_lanes
from targets.signed_data import sign_flipped_convs
from targets.winograd_convs import winograd_convs


@dataclass
class GraphBuild:
    """One graph on its way through the phases, and what each phase reports.

    `importer` (the import phase) returns the imported IRModule; `quantizer` (the quantize phase) returns the
    int8 graph, None keeps fp32. `tuning` is an open tuning database whose kernels replace the default
    schedules where it has them. `winograd`: the kernels phase computes qualifying fp32 3x3 convs as Winograd."""
    spec: TargetSpec
    rules: tuple[str, ...]
    mod: tvm.IRModule | None = None
    importer: Callable[[], tvm.IRModule] | None = None
    quantizer: Callable[[tvm.IRModule], tvm.IRModule] | None = None
    tuning: object | None = None
    winograd: bool = True
    layout: LayoutReport | None = None
    fusion: FusionReport | None = None
    kernels: dict = field(default_factory=dict)  # count_kernels of the lowered graph
    schedules: ScheduleLog = field(default_factory=ScheduleLog)
    sources: dict = field(default_factory=dict)  # Var -> its fused group's source tags (relay_passes.kernel_origins)
    kernel_calls: list = field(default_factory=list)  # (kernel, source tags) per kernel call, in order
    executable: object | None = None

def _import(build: GraphBuild) -> None:
    if build.importer is not None:
        build.mod = build.importer()


def _canonicalise(build: GraphBuild) -> None:
    """Inference form with one op per activation: BatchNorm decomposed, GELU/HardSwish/SiLU/LayerNorm... as
    single ops (relay_passes.canonicalize)."""
    build.mod = tvm.transform.Sequential([
        relax.transform.DeadCodeElimination(),  # the importer leaves unused BatchNorm outputs behind
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        fold_constants(),
        Canonicalize,
    ])(build.mod)


def _fold(build: GraphBuild) -> None:
    """BatchNorm folded into the conv/FC before it (elsewhere a scale and shift), constants folded."""
    build.mod = tvm.transform.Sequential([
        FoldAffineIntoProducer,
        fold_constants(),
        relax.transform.DeadCodeElimination(),
    ])(build.mod)


def _quantize(build: GraphBuild) -> None:
    if build.quantizer is not None:
        build.mod = build.quantizer(build.mod)


def _layout(build: GraphBuild) -> None:
    build.mod, build.layout = block_channels(build.mod, build.spec, fold_constants())


def _fuse(build: GraphBuild) -> None:
    """The fusion rules (relay_passes.patterns), after each int8 requantize is folded into one multiply-add
    where its rules are used (relay_passes.requantize); then the elementwise chains left over."""
    if any(name in build.rules for name in REQUANTIZE_RULES):
        build.mod = fold_requantize(build.mod)
    before = build.mod
    build.mod, build.fusion = fuse(build.mod, build.rules)
    build.sources = _best_effort(group_sources, before, build.mod) or {}  # each group's ops' tags


def _kernels(build: GraphBuild) -> None:
    """Every op (and fused group) becomes one unscheduled TIR kernel; fp32 3x3 convs qualifying for it
    Winograd's (targets.winograd_convs), int8 convs on s8 data read sign-flipped where the dot reads u8
    (targets.signed_data), int8 convs and FCs with bounded weight pairs marked for `vpmaddubsw` on a target
    without VNNI (targets.bounded_pairs)."""
    target = build.spec.tvm_target()
    if build.winograd:
        build.mod = winograd_convs(build.mod)
    build.mod = bounded_pair_ops(sign_flipped_convs(build.mod, build.spec), build.spec)
    sources = {var: build.sources.get(var, []) + tags
               for var, tags in (_best_effort(binding_sources, build.mod) or {}).items()}
    with target:
        build.mod = tvm.transform.Sequential(cpu.library_dispatch_passes(target) + [
            relax.transform.LegalizeOps(legalize_overrides(vector_lanes(build.spec))),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseTIR(),
        ])(build.mod)
    build.kernels = count_kernels(build.mod)
    build.kernel_calls = _best_effort(kernel_sources, build.mod, sources) or []


def _best_effort(function, *args):
    """Following the source tags (relay_passes.kernel_origins) never fails a build: None if it fails."""
    try:
        return function(*args)
    except Exception:  # noqa: BLE001
        return None


def _schedule(build: GraphBuild) -> None:
    """The tuning database's kernels where it has them, the target's rules (targets.schedules) for the rest."""
    target = build.spec.tvm_target()
    passes = [schedule_pass(build.spec, build.schedules)]
    database = contextlib.nullcontext()
    if build.tuning is not None:
        passes.insert(0, build.tuning.apply_pass(target))
        database = build.tuning.database()
    with target, database:
        build.mod = tvm.transform.Sequential(passes)(build.mod)


def _lower(build: GraphBuild) -> None:
    """TVM's CPU pipeline from kernels to VM code, then the build itself."""
    target = build.spec.tvm_target()

    @tvm.transform.module_pass(opt_level=0, name="quantvm.lower")
    def lower(mod, _ctx):
        with target:
            return tvm.transform.Sequential(cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))(mod)

    build.executable = tvm.compile(build.mod, target, relax_pipeline=lower)


@dataclass(frozen=True)
class Phase:
    name: str
    describe: str  # for error messages: "<model>: <describe> failed: ..."
    run: Callable[[GraphBuild], None]
    # TVM's known noise dropped (quantvm.quiet): the graph phases, which legalize Gathers. Not quantize (its
    # progress line shows as it runs), nor schedule and lower (what a crash or a hang in codegen prints must
    # show; a redirected stderr would hold it back or lose it).
    quiet: bool = False
    # The calls a graph phase rebuilds get their source tags back from the graph before it, by binding name
    # (relay_passes.kernel_origins): what `quantvm profile` and the report name each kernel by.
    carries_tags: bool = False


PIPELINE: tuple[Phase, ...] = (
    Phase("import", "importing the model", _import, quiet=True),
    Phase("canonicalise", "preparing the graph", _canonicalise, quiet=True, carries_tags=True),
    Phase("fold", "folding the graph", _fold, quiet=True, carries_tags=True),
    Phase("quantize", "int8 calibration and quantization", _quantize, carries_tags=True),
    Phase("layout", "laying out the graph", _layout, quiet=True, carries_tags=True),
    Phase("fuse", "fusing the graph", _fuse, quiet=True),
    Phase("kernels", "lowering the graph to kernels", _kernels, quiet=True),
    Phase("schedule", "scheduling the kernels", _schedule),
    Phase("lower", "building", _lower),
)
PHASE_NAMES = tuple(p.name for p in PIPELINE)


def run_phases(build: GraphBuild, start: str = PHASE_NAMES[0], stop: str = PHASE_NAMES[-1],
               guard: Callable[[Phase], contextlib.AbstractContextManager] | None = None) -> GraphBuild:
    """Run the phases from `start` to `stop` (both included) on `build`, each inside `guard(phase)` (the
    compiler's error translation), the quiet ones with TVM's known noise dropped."""
    first, last = PHASE_NAMES.index(start), PHASE_NAMES.index(stop)
    for phase in PIPELINE[first:last + 1]:
        quiet = tvm_noise_silenced() if phase.quiet else contextlib.nullcontext()
        with quiet, guard(phase) if guard is not None else contextlib.nullcontext():
            before = build.mod
            phase.run(build)
            if phase.carries_tags and before is not None and build.mod is not before:
                build.mod = _best_effort(carried_tags, before, build.mod) or build.mod
    return build


def prepare_graph(mod: tvm.IRModule) -> tvm.IRModule:
    """An imported graph in the form calibration and the int8 rewrite start from (canonicalise and fold)."""
    build = GraphBuild(spec=None, rules=(), mod=mod)
    return run_phases(build, "canonicalise", "fold").mod


LAYOUT_KERNEL_PREFIX = "te_layout_transform"


def count_kernels(mod: tvm.IRModule) -> dict:
    """Kernel launches in `main` of a lowered graph (its call_tir calls): {"kernels": compute kernels,
    "layout_transforms": the blocked-layout conversions at the graph's edges}."""
    counts = {"kernels": 0, "layout_transforms": 0}

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.call_tir":
            layout = expr.args[0].name_hint.startswith(LAYOUT_KERNEL_PREFIX)
            counts["layout_transforms" if layout else "kernels"] += 1

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return counts
