"""What MetaSchedule searches when quantvm tunes a kernel for a target: the design space.

The space is the rule-based schedule of targets.schedules with its register tiles left as decisions
(output pixels x channel blocks for convs, rows x column vectors for FCs), starting at the rules' choice.
Everything else stays as the rules make it, so int8 kernels keep the target's dot intrinsic (vpdpbusd,
or the exact AVX2/AVX-512BW form) whatever the search tries.
"""

from __future__ import annotations

import contextlib
import sys

from tvm.s_tir import meta_schedule as ms

from targets.registry import TargetSpec
from targets.schedules import SampledTiles, schedule_kernel


def design_space(spec: TargetSpec) -> ms.space_generator.SpaceGenerator:
    def schedule(sch):
        schedule_kernel(sch, spec, SampledTiles())

    # The schedule leaves nothing for postprocessors (parallel, vectorize, tensorize and the split init
    # are done); the tile decisions are what mutates.
    return ms.space_generator.ScheduleFn(schedule, sch_rules=[], postprocs=[],
                                         mutator_probs={ms.mutator.MutateTileSize(): 1.0})


def default_schedule(mod, spec: TargetSpec):
    """(the kernel's default schedule, traced with its tiles as decisions, None) when it has tiles to search;
    else (None, why tuning leaves it alone)."""
    from tvm import s_tir

    sch = s_tir.Schedule(mod)
    try:
        schedule_kernel(sch, spec, SampledTiles())
    except Exception as err:  # noqa: BLE001 - such a kernel stays as lowered; the compile report says so
        return None, f"no rule schedules it ({str(err).strip().splitlines()[0] if str(err).strip() else err!r})"
    if not any(inst.kind.name == "SamplePerfectTile" for inst in sch.trace.insts):
        return None, "its schedule has no tiles to search"
    return sch, None


STOCK_INTRINSICS = "tvm.s_tir.tensor_intrin"


def stock_intrinsics_stub():
    """A function that puts an empty module in place of TVM's stock tensor intrinsics (CUDA, ARM, x86, ...)
    unless they are loaded. MetaSchedule imports them for their side effect of registering them (its
    TuneContext, and every build worker, every batch), and with TVM 0.27 parsing them takes 25 s in a fresh
    process, 70 s in a busy one; quantvm tensorizes with its own (targets.intrinsics). Nested and
    self-contained, the function is pickled by value into worker processes as their initializer; it returns
    None, since a worker sends its initializer's result back (a module would be imported on arrival)."""

    def install() -> None:
        import sys
        import types

        name = "tvm.s_tir.tensor_intrin"
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)

    return install


@contextlib.contextmanager
def without_stock_intrinsics():
    """The stub in this process while tuning; the real module stays importable afterwards."""
    loaded = STOCK_INTRINSICS in sys.modules
    stock_intrinsics_stub()()
    stub = sys.modules[STOCK_INTRINSICS]
    try:
        yield
    finally:
        if not loaded and sys.modules.get(STOCK_INTRINSICS) is stub:
            del sys.modules[STOCK_INTRINSICS]


def tile_decisions(trace) -> list:
    """The register tiles a traced schedule chose, in order: what tells two schedules of this space apart
    (the traces MetaSchedule stores are simplified, so their text differs from a fresh one's)."""
    return [[int(f) for f in trace.decisions[inst]] for inst in trace.insts
            if inst.kind.name == "SamplePerfectTile" and inst in trace.decisions]
