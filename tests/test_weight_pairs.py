"""Bounded weight pairs (relay_passes.weight_pairs, targets.bounded_pairs): the quantizer's bound, its cost in
weight error, which convs the `vpmaddubsw` kernel is given, and the int8 build for a CPU without VNNI."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

import compiler
from relay_passes.weight_pairs import quantize_bounded
from targets import resolve_target
from targets.bounded_pairs import bounded_pair_ops
from targets.intrinsics import PAIR_BOUND, needs_bounded_pairs, pairs_are_bounded
from tests import fixtures
from tests.host_targets import runnable


def _plain(w, scale):
    return np.clip(np.round(w / scale.reshape(-1, *[1] * (w.ndim - 1))), -127, 127)


def _error(q, scale, w):
    return float(((q * scale.reshape(-1, *[1] * (w.ndim - 1)) - w) ** 2).sum())


@pytest.mark.parametrize("shape, draw", [((32, 64, 3, 3), "normal"), ((48, 27, 1, 1), "laplace"),
                                         ((64, 3, 7, 7), "normal"), ((40, 96), "laplace")])
def test_bounded_weights_keep_every_pair_within_the_bound_at_a_bounded_cost(shape, draw, rng):
    """Every pair of input channels (an odd last one alone) within PAIR_BOUND, each channel's scale no finer
    than asked; the weight error at most 7-bit rounding's (the scale doubled) and at least 8-bit's."""
    w = getattr(rng, draw)(size=shape)
    scale = np.abs(w.reshape(shape[0], -1)).max(axis=1) / 127
    q, grown = quantize_bounded(w, scale)
    assert q.dtype == np.int8 and np.abs(q.astype(int)).max() <= 127
    magnitude = np.abs(q.astype(int))
    pairs = magnitude[:, 0:shape[1] // 2 * 2:2] + magnitude[:, 1:shape[1] // 2 * 2:2]
    assert pairs.max() <= PAIR_BOUND
    assert np.all(grown >= scale) and np.all(grown <= 2 * scale * (1 + 1e-12))
    assert _error(_plain(w, scale), scale, w) <= _error(q, grown, w) <= _error(_plain(w, 2 * scale), 2 * scale, w)


def test_a_channel_already_within_the_bound_is_quantized_as_usual(rng):
    w = rng.normal(size=(8, 16, 3, 3)) * 0.01
    w[:, 0, 0, 0], w[:, 1, 0, 0] = 1.0, 0.0  # each channel's maximum, its pair's other weight 0: no pair over
    scale = np.abs(w.reshape(8, -1)).max(axis=1) / 127
    q, grown = quantize_bounded(w, scale)
    np.testing.assert_array_equal(q, _plain(w, scale))
    np.testing.assert_array_equal(grown, scale)


def test_pairs_are_bounded_reads_pairs_of_the_last_axis():
    packed = np.zeros((1, 2, 8, 4), np.int8)
    packed[0, 1, 3, 2:] = [-100, -28]
    assert pairs_are_bounded(packed)
    packed[0, 1, 3, 3] = -29
    assert not pairs_are_bounded(packed)
    packed[0, 1, 3, 3], packed[0, 1, 3, 1] = 0, 127  # 127 and -100 are not a pair: (0, 1) and (2, 3) are
    assert pairs_are_bounded(packed)


def _blocked_int8_conv(weight: np.ndarray) -> tvm.IRModule:
    """One blocked u8 conv (NCHW8c), its packed weight a constant, as the layout phase leaves it."""
    x = relax.Var("x", relax.TensorType([1, 2, 6, 6, 8], "uint8"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = relax.op.nn.conv2d(x, relax.const(weight), padding=[1, 1, 1, 1], data_layout="NCHW8c",
                                   kernel_layout="OIHW8o4i", out_layout="NCHW8c", out_dtype="int32")
            out = bb.emit_output(bb.emit(y))
        bb.emit_func_output(out)
    return bb.get()


def _marked_convs(mod: tvm.IRModule) -> int:
    return sum("bounded_pairs" in func.script() for func in mod.functions.values()
               if isinstance(func, tvm.tirx.PrimFunc))


@pytest.mark.parametrize("largest, marked", [(PAIR_BOUND, 1), (PAIR_BOUND + 1, 0)])
def test_only_a_conv_whose_constant_weight_is_within_the_bound_is_marked(largest, marked):
    """On a target without VNNI, the conv with bounded pairs becomes the marked kernel; one pair over the
    bound keeps the exact form; a VNNI target marks nothing (its instruction does not saturate)."""
    weight = np.ones((2, 4, 3, 3, 8, 4), np.int8)
    weight[1, 3, 2, 2, 5, :2] = [127, largest - 127]
    mod = _blocked_int8_conv(weight)
    assert _marked_convs(bounded_pair_ops(mod, resolve_target("avx2"))) == marked
    assert _marked_convs(bounded_pair_ops(mod, resolve_target("cascadelake"))) == 0


@pytest.mark.parametrize("build, shape, kernels", [(fixtures.resnet_bottleneck_block, (1, 16, 12, 12), 5),
                                                   (fixtures.mlp, (4, 32), 3)])
@pytest.mark.parametrize("target", runnable("avx2"))
def test_int8_build_without_vnni_runs_every_conv_and_fc_on_vpmaddubsw(target, build, shape, kernels, rng):
    """ResNet blocks and an MLP for AVX2: every int8 conv and FC gets bounded weights and the `vpmaddubsw`
    kernel, and the output stays close to onnxruntime fp32."""
    import onnxruntime as ort

    assert needs_bounded_pairs(resolve_target(target)) and not needs_bounded_pairs(resolve_target("cascadelake"))
    model = build(rng)
    calib = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]
    x = rng.standard_normal(shape).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"data": x})[0]
    int8 = compiler.compile(model, target=target, calib=calib)
    rules = [rule for rule in int8.report.schedules.applied.values() if "_int8[" in rule]
    assert len(rules) >= kernels and all(rule.endswith("s8_avx2_bounded]") for rule in rules), rules
    growth = [row["weight_pair_growth"] for row in int8.report.quantization.layers if row["op"] != "avg_pool"]
    assert growth and all(1.0 <= g <= 2.0 + 1e-9 for g in growth), growth  # the report says what bounding cost
    error = np.abs(int8.run(x)[0] - want).max() / np.abs(want).max()
    assert error < 0.05, error


@pytest.mark.parametrize("target", runnable("avx2"))
def test_bounded_pairs_off_keeps_full_weights_on_the_exact_kernels(target, rng):
    model = fixtures.resnet_bottleneck_block(rng)
    calib = [rng.standard_normal((1, 16, 12, 12)).astype(np.float32) for _ in range(2)]
    int8 = compiler.compile(model, target=target, calib=calib, bounded_pairs=False)
    rules = {rule for rule in int8.report.schedules.applied.values() if "_int8[" in rule}
    assert rules == {"conv2d_nchwc_int8[quantvm_dot_8x4_u8s8_avx2]"}, rules
    assert not any("weight_pair_growth" in row for row in int8.report.quantization.layers)
