"""What tuning searches and how it measures: every point of a kernel's design space computes the same
kernel as its default schedule, and a candidate's time is the fastest of its timings."""

import functools

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir import Schedule
from tvm.s_tir.meta_schedule.arg_info import ArgInfo
from tvm.s_tir.meta_schedule.runner import PyRunner, RunnerFuture, RunnerInput, RunnerResult

from compiler.build import target_with_threads
from compiler.remote import fastest_run
from compiler.tuner import _extract
from targets import resolve_target
from targets.tuning import tile_decisions
from tests import fixtures


def _conv3x3_model():
    g = fixtures.GraphBuilder(np.random.default_rng(3))
    y = g.conv_bn("data", "conv", 64, 32, k=3)
    return g.model("conv3x3", {"data": (1, 64, 10, 10)}, [y])


@pytest.fixture(scope="module")
def conv3x3_kernel():
    """A direct 3x3 conv kernel as tuning extracts it, with its traced default schedule."""
    spec = target_with_threads(resolve_target("native"), 2)
    _, tasks, _ = _extract(_conv3x3_model(), spec, None, None, {"winograd": False})
    (task, default), = [(t, sch) for t, sch in tasks if "conv2d" in t.task_name]
    return spec, task, default


def _run(mod, target, inputs):
    executable = tvm.compile(mod, target=target)
    args = [tvm.runtime.tensor(a) for a in inputs]
    executable(*args)
    return args[-1].numpy()


def test_every_reduction_order_computes_the_default_kernel(conv3x3_kernel):
    spec, task, default = conv3x3_kernel
    # the register tile (pixels, channel blocks), then the input-channel blocks outside/inside the window
    _, _, reduction_order = tile_decisions(default.trace)
    blocks, within = reduction_order
    assert within == 1 and blocks >= 4  # the rules' order: every input-channel block outside the window
    sample = [inst for inst in default.trace.insts if inst.kind.name == "SamplePerfectTile"][2]
    rng = np.random.default_rng(4)
    inputs = [rng.uniform(-1, 1, [int(d) for d in info.shape]).astype(info.dtype)
              for info in ArgInfo.from_prim_func(task.dispatched[0]["main"])]
    expected = _run(default.mod, spec.tvm_target(), inputs)
    for within in (2, blocks):
        variant = Schedule(task.dispatched[0])
        default.trace.with_decision(sample, [blocks // within, within], remove_postproc=True).apply_to_schedule(
            variant, remove_postproc=True)
        assert tile_decisions(variant.trace)[2] == [blocks // within, within]
        assert not tvm_ffi.structural_equal(variant.mod, default.mod)
        np.testing.assert_allclose(_run(variant.mod, spec.tvm_target(), inputs), expected, rtol=1e-5, atol=1e-5)


def _runner_reporting(outcomes):
    """A runner whose candidates report the given (run_secs, error) outcomes."""

    @derived_object
    class Fixed(PyRunner):
        def run(self, runner_inputs):
            return [RunnerFuture(lambda: True, functools.partial(RunnerResult, *o)) for o in outcomes]

    return Fixed()


def test_a_candidate_is_timed_by_its_fastest_run():
    inner = _runner_reporting([([3e-3, 1e-3, 2e-3], None), (None, "it crashed"), ([5e-4], None)])
    results = [future.result() for future in fastest_run(inner).run([RunnerInput("kernel.so", "cpu", [])] * 3)]
    assert [[float(s) for s in r.run_secs] if r.run_secs else None for r in results] == [[1e-3], None, [5e-4]]
    assert [r.error_msg for r in results] == [None, "it crashed", None]
