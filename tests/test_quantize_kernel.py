"""relax.quantize by one scale multiplies by the scale's reciprocal (targets.quantize_kernel)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from tvm import relax, tirx

from targets import resolve_target
from targets.layout import vector_lanes
from targets.legalize import legalize_overrides
from tests.test_kernels import build_func
from tests.test_transformer_kernels import _assembly

SHAPE = (2, 8, 13, 16)
RANGES = {"uint8": (0, 255), "int8": (-128, 127)}


def _quantize(scale, zero_point, dtype: str, run_time_scale: bool = False, axis: int = -1) -> relax.Function:
    """The quantize of a (SHAPE) float32 tensor: by a constant scale, or by one given at run time (the
    function's second parameter)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(SHAPE, "float32"))
    s = relax.Var("s", relax.TensorType((), "float32")) if run_time_scale else relax.const(scale)
    with bb.function("main", [x, s] if run_time_scale else [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.quantize(x, s, relax.const(zero_point), axis=axis, out_dtype=dtype))
        bb.emit_func_output(out)
    return bb.get()["main"]


def _kernel(func: relax.Function, overrides: dict | None) -> tirx.PrimFunc:
    """`func`'s one kernel, legalized with `overrides` (a target's, or None: TVM's own lowering)."""
    mod = relax.transform.LegalizeOps(overrides)(tvm.IRModule({"main": func}))
    (kernel,) = [f for f in mod.functions.values() if isinstance(f, tirx.PrimFunc)]
    return kernel.with_attr("global_symbol", "main")


def _ours(spec) -> dict:
    return legalize_overrides(vector_lanes(spec))


def _run(lib, *arrays, dtype):
    out = tvm.runtime.tensor(np.zeros(SHAPE, dtype))
    lib["main"](*(tvm.runtime.tensor(a) for a in arrays), out)
    return out.numpy()


@pytest.mark.parametrize("run_time_scale", [False, True], ids=["constant-scale", "run-time-scale"])
@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_quantize_by_one_scale_multiplies_by_its_reciprocal(dtype, run_time_scale):
    """Exactly numpy's round(x * (1/s)) + zp, clipped; against round(x / s) (TVM's and onnxruntime's form)
    never more than one step off, and only on the rare value an ulp from a rounding boundary."""
    spec = resolve_target("native")
    scale, zero_point = np.float32(0.0371), np.array(3 if dtype == "uint8" else -2, dtype)
    x = (np.random.default_rng(0).standard_normal(SHAPE) * 3).astype(np.float32)
    x.flat[:64] = (np.arange(64) - 32.5).astype(np.float32) * scale  # values on and near rounding boundaries
    lib, _ = build_func(_kernel(_quantize(scale, zero_point, dtype, run_time_scale), _ours(spec)), spec)
    got = _run(lib, x, *([np.array(scale)] if run_time_scale else []), dtype=dtype)
    lo, hi = RANGES[dtype]
    by_reciprocal = np.clip(np.round(x * (np.float32(1) / scale)) + zero_point, lo, hi).astype(dtype)
    by_division = np.clip(np.round(x / scale) + zero_point, lo, hi).astype(dtype)
    np.testing.assert_array_equal(got, by_reciprocal)
    assert np.abs(got.astype(int) - by_division.astype(int)).max() <= 1
    assert np.mean(got == by_division) > 0.99


def test_per_channel_quantize_keeps_the_division():
    """A scale per channel is TVM's lowering: x / s[c] exactly."""
    spec = resolve_target("native")
    scale = np.linspace(0.01, 0.08, SHAPE[1]).astype(np.float32)
    x = (np.random.default_rng(1).standard_normal(SHAPE) * 2).astype(np.float32)
    func = _quantize(scale, np.zeros(SHAPE[1], "int8"), "int8", axis=1)
    lib, _ = build_func(_kernel(func, _ours(spec)), spec)
    expected = np.clip(np.round(x / scale.reshape(1, -1, 1, 1)), -128, 127).astype(np.int8)
    np.testing.assert_array_equal(_run(lib, x, scale, np.zeros(SHAPE[1], "int8"), dtype="int8"), expected)


@pytest.mark.parametrize("run_time_scale", [False, True], ids=["constant-scale", "run-time-scale"])
def test_the_quantize_loop_has_no_vector_division(run_time_scale):
    """Compiled for AVX2 (any x86 host can read it): multiplies, no vdivps; a run-time scale's reciprocal is
    one scalar division outside the loop. TVM's own lowering of the same op divides every vector."""
    spec = resolve_target("avx2")
    func = _quantize(np.float32(0.05), np.array(0, "uint8"), "uint8", run_time_scale)
    lib, _ = build_func(_kernel(func, _ours(spec)), spec)
    asm = _assembly(lib)
    assert re.search(r"\bvmulps\s+[^\n]*%ymm", asm) and not re.search(r"\bvdivps\s+[^\n]*%ymm", asm)
    topi_lib, _ = build_func(_kernel(func, None), spec)
    assert re.search(r"\bvdivps\s+[^\n]*%ymm", _assembly(topi_lib))  # what the test would catch
