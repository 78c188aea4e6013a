"""The order of passes from an imported graph to VM-ready code.

`prepare_graph` cleans the imported fp32 graph (inference-only decompositions, constant folding, dead code),
the stage later steps (fusion, calibration, int8 rewrite) start from. `build_pipeline` lowers a prepared
graph to TIR and VM code; it is TVM's CPU pipeline, spelled out so that later stages can be slotted in.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu

from relay_passes.canonicalize import CanonicalizeGelu
from relay_passes.fold_affine import FoldAffineIntoProducer


def prepare_graph(mod: tvm.IRModule) -> tvm.IRModule:
    """Inference form of the graph: BatchNorm folded into the conv/FC before it (elsewhere a scale and
    shift), constants folded, unused values removed."""
    passes = tvm.transform.Sequential([
        # The ONNX importer leaves unused BatchNorm outputs (running mean/var) behind.
        relax.transform.DeadCodeElimination(),
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.FoldConstant(),
        CanonicalizeGelu,
        FoldAffineIntoProducer,
        relax.transform.DeadCodeElimination(),
    ])
    return passes(mod)


def build_pipeline(target: tvm.target.Target, on_lowered=None, legalize_overrides: dict | None = None,
                   schedule: tvm.transform.Pass | None = None) -> tvm.transform.Pass:
    """Lower a prepared (and fused) Relax graph to TIR kernels and VM code for `target`.

    TVM's own FuseOps is left out: the only fusion is ours (relay_passes.fuse), so an unfused build is
    really unfused and the compile report tells the truth. `on_lowered(mod)` sees the graph once every
    op is a kernel call, e.g. to count kernels. `legalize_overrides` ({op name: legalize function}) and
    `schedule` (a pass over the fused kernels) come from the target (targets/).
    """

    @tvm.transform.module_pass(opt_level=0, name="quantvm.build_pipeline")
    def _lower(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            lowering = _kernel_passes(target, legalize_overrides)
            if schedule is not None:
                lowering.append(schedule)
            mod = tvm.transform.Sequential(lowering)(mod)
            if on_lowered is not None:
                on_lowered(mod)
            rest = cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target)
            return tvm.transform.Sequential(rest)(mod)

    return _lower


def lower_to_kernels(mod: tvm.IRModule, target: tvm.target.Target,
                     legalize_overrides: dict | None = None) -> tvm.IRModule:
    """The graph as `build_pipeline` hands it to the scheduler: one unscheduled TIR kernel per fused group
    (what tuning tunes)."""
    with target:
        return tvm.transform.Sequential(_kernel_passes(target, legalize_overrides))(mod)


def _kernel_passes(target, legalize_overrides) -> list:
    return cpu.library_dispatch_passes(target) + [
        relax.transform.LegalizeOps(legalize_overrides),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseTIR(),
    ]


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
