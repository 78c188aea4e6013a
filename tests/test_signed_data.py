"""s8 data read sign-flipped (targets.signed_data): which convs the kernel is given, the offsets each call
passes, and one dot instruction a step on a VNNI target (the results' exactness: tests/test_int8.py)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from tvm import relax

import compiler
from targets import resolve_target
from targets.conv2d import SIGNED_OFFSET_REMOVED
from targets.intrinsics import PAIR_BOUND
from targets.signed_data import sign_flipped_convs, signed_offsets
from tests import fixtures
from tests.test_kernels import assembly_by_kernel

WEIGHT_SHAPE = (2, 4, 3, 3, 8, 4)  # [O/b, C/4, KH, KW, b, 4]: 16 -> 16 channels in blocks of 8


def _conv(x, weight):
    return relax.op.nn.conv2d(x, weight, padding=[1, 1, 1, 1], data_layout="NCHW8c", kernel_layout="OIHW8o4i",
                              out_layout="NCHW8c", out_dtype="int32")


def _fused_twice(weights: list[np.ndarray], dtype: str = "int8") -> tvm.IRModule:
    """A fused function holding one blocked padded conv on `dtype` data, its weight a parameter, called once per
    weight in `weights` with that constant, as the fuse phase leaves it."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 2, 6, 6, 8], dtype))
    w = relax.Var("w", relax.TensorType(list(WEIGHT_SHAPE), "int8"))
    with bb.function("fused_conv", [x, w], attrs={"Primitive": True}, private=True):
        with bb.dataflow():
            out = bb.emit_output(_conv(x, w))
        bb.emit_func_output(out)
    fused = bb.get().get_global_var("fused_conv")
    data = relax.Var("data", relax.TensorType([1, 2, 6, 6, 8], dtype))
    with bb.function("main", [data]):
        with bb.dataflow():
            outs = [bb.emit(relax.Call(fused, [data, relax.const(weight)])) for weight in weights]
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    return bb.get()


def _flipped_kernels(mod: tvm.IRModule) -> int:
    return sum(SIGNED_OFFSET_REMOVED in func.script() for func in mod.functions.values()
               if isinstance(func, tvm.tirx.PrimFunc))


def _weights(rng, largest_pair: int = PAIR_BOUND) -> list[np.ndarray]:
    weights = [rng.integers(-20, 21, WEIGHT_SHAPE).astype(np.int8) for _ in range(2)]
    weights[1][1, 2, 0, 1, 3, :2] = [127, largest_pair - 127]
    return weights


def test_each_call_of_a_fused_function_passes_the_offsets_of_its_own_weight(rng):
    weights = _weights(rng)
    mod = sign_flipped_convs(_fused_twice(weights), resolve_target("avx2"))
    assert "fused_conv" not in [gv.name_hint for gv in mod.functions]  # replaced by a function with more params
    calls = []
    relax.analysis.post_order_visit(mod["main"].body, lambda e: calls.append(e) if isinstance(
        e, relax.Call) and isinstance(e.op, relax.GlobalVar) else None)
    assert len(calls) == 2 and all(len(call.args) == 3 for call in calls)
    for call, weight in zip(calls, weights):
        offsets = call.args[2].value.numpy()
        want = 128 * weight.astype(np.int64).transpose(0, 4, 1, 2, 3, 5).reshape(2, 8, -1).sum(axis=2)
        np.testing.assert_array_equal(offsets, want)
        np.testing.assert_array_equal(offsets, signed_offsets(weight))
    assert _flipped_kernels(mod) == 1


@pytest.mark.parametrize("target, dtype, largest_pair, flipped", [
    ("avx2", "int8", PAIR_BOUND, 1),          # vpmaddubsw reads u8
    ("avx2", "int8", PAIR_BOUND + 1, 0),      # one call's weight is not bounded: the exact vpmaddwd form, s8 as is
    ("avx2", "uint8", PAIR_BOUND, 0),         # u8 data needs no flip
    ("cascadelake", "int8", PAIR_BOUND + 1, 1),  # vpdpbusd reads u8, whatever the weight
    ("cascadelake", "uint8", PAIR_BOUND, 0),
])
def test_only_convs_on_signed_data_whose_dot_reads_unsigned_are_flipped(target, dtype, largest_pair, flipped, rng):
    mod = sign_flipped_convs(_fused_twice(_weights(rng, largest_pair), dtype), resolve_target(target))
    assert _flipped_kernels(mod) == flipped
    assert ("fused_conv" in [gv.name_hint for gv in mod.functions]) == (not flipped)


def _vpdpbusd_per_conv(model, calib) -> list[int]:
    built = compiler.compile(model, target="cascadelake", calib=[calib], calib_mode="naive")
    assert built.report.quantization.int8_ops == {"conv2d": 1}
    kernels = assembly_by_kernel(built.executable)
    return [len(re.findall(r"\bvpdpbusd\b", body)) for name, body in kernels.items() if "conv2d" in name]


def test_a_padded_conv_on_signed_data_runs_one_vpdpbusd_a_step_for_cascadelake(rng):
    """Compiled, not run (this host may lack VNNI): the conv on s8 data (a signed calibration range) has as
    many vpdpbusd as the same conv on u8 data (a non-negative range); reading s8 as is took two a step."""
    from tests.test_int8 import _single_op_model

    model = _single_op_model(rng, "conv3x3")
    calib = rng.standard_normal((4, 16, 9, 9)).astype(np.float32)
    signed, unsigned = _vpdpbusd_per_conv(model, calib), _vpdpbusd_per_conv(model, np.abs(calib))
    assert len(signed) == 1 and signed[0] > 0 and signed == unsigned, (signed, unsigned)


def test_a_silu_between_convs_keeps_the_next_conv_on_one_dot_a_step(rng):
    """SiLU's output is signed (YOLO's convs): the next padded conv's kernel gets the unsigned dot on this host,
    and the model stays close to onnxruntime."""
    g = fixtures.GraphBuilder(rng)
    first = g.conv("x", "c1", 16, 16, 3)
    silu = g.op("Mul", [first, g.op("Sigmoid", [first], "sig")], "silu")
    model = g.model("silu_convs", {"x": (1, 16, 12, 12)}, [g.conv(silu, "c2", 16, 32, 3)])
    calib = [rng.standard_normal((1, 16, 12, 12)).astype(np.float32) for _ in range(4)]
    int8 = compiler.compile(model, target="native", calib=calib)
    rules = [rule for rule in int8.report.schedules.applied.values() if "_int8[" in rule]
    assert len(rules) == 2 and all("_u8s8_" in rule for rule in rules), rules
    x = calib[0]
    want = fixtures.onnxruntime_outputs(model, {"x": x})[0]
    assert np.abs(int8.run(x)[0] - want).max() / np.abs(want).max() < 0.05


def test_an_unfused_build_flips_the_conv_in_main_and_gives_the_fused_builds_result(rng):
    """--no-fuse: the conv is called from main on its constant weight, flipped there; the same int8 numbers."""
    from tests.test_int8 import _single_op_model

    model = _single_op_model(rng, "conv3x3")
    calib = [rng.standard_normal((4, 16, 9, 9)).astype(np.float32)]
    x = rng.standard_normal((1, 16, 9, 9)).astype(np.float32)
    fused, unfused = (compiler.compile(model, target="native", calib=calib, calib_mode="naive", fuse=fuse)
                      for fuse in (True, False))
    rules = [rule for rule in unfused.report.schedules.applied.values() if "_int8[" in rule]
    assert len(rules) == 1 and "_u8s8_" in rules[0], rules
    np.testing.assert_array_equal(unfused.run(x)[0], fused.run(x)[0])
