"""The requantize folded into one multiply-add and clamp (relay_passes.requantize): against numpy's quantize of
the dequantized, activated value; the chains it must leave alone; and whole int8 builds against onnxruntime."""

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax

import compiler
from relay_passes.patterns import REQUANTIZE_RULES, RULE_NAMES
from relay_passes.requantize import fold_requantize
from tests import fixtures
from tests.fixtures import onnxruntime_outputs, random_inputs

SHAPE = (1, 16, 6, 6)
QUANTIZED_RANGE = {"uint8": (0, 255), "int8": (-128, 127)}


def _chain(act, dtype, zero_point, scale=0.05, channel_scale=None, extra_output=False):
    """main(acc: s32) = quantize(act((acc + b) * c), scale, zero_point) as relay_passes.quantize writes it."""
    rng = np.random.default_rng(7)
    bias = rng.integers(-2000, 2000, (1, SHAPE[1], 1, 1)).astype(np.int32)
    if channel_scale is None:
        channel_scale = rng.uniform(1e-4, 1e-3, (1, SHAPE[1], 1, 1)).astype(np.float32)
    acc = relax.Var("acc", relax.TensorType(list(SHAPE), "int32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [acc]):
        with bb.dataflow():
            summed = bb.emit(relax.op.add(acc, relax.const(bias)))
            value = bb.emit(relax.op.multiply(relax.op.astype(summed, "float32"), relax.const(channel_scale)))
            if act == "relu":
                value = bb.emit(relax.op.nn.relu(value))
            elif act == "relu6":
                value = bb.emit(relax.op.clip(value, 0, 6))
            elif act == "maximum":
                value = bb.emit(relax.op.maximum(value, relax.const(np.float32(0.5))))
            q = bb.emit(relax.op.quantize(value, relax.const(np.float32(scale)), relax.const(zero_point, dtype),
                                          axis=1, out_dtype=dtype))
            out = bb.emit_output(relax.Tuple([q, value]) if extra_output else q)
        bb.emit_func_output(out)
    return bb.get(), bias, channel_scale


def _numpy_requantize(acc, bias, channel_scale, act, scale, zero_point, dtype):
    value = (acc.astype(np.float64) + bias) * channel_scale
    low, high = {"none": (-np.inf, np.inf), "relu": (0, np.inf), "relu6": (0, 6), "maximum": (0.5, np.inf)}[act]
    value = np.clip(value, low, high)
    return np.clip(np.round(value / scale) + zero_point, *QUANTIZED_RANGE[dtype]).astype(dtype)


def _run(mod, acc):
    executable = tvm.compile(mod, "llvm")
    return relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(acc)).numpy()


def _ops(mod) -> set:
    names = set()
    relax.analysis.post_order_visit(mod["main"].body, lambda e: isinstance(e, relax.Call) and isinstance(
        e.op, tvm.ir.Op) and names.add(e.op.name))
    return names


@pytest.mark.parametrize("act", ["none", "relu", "relu6", "maximum"])
@pytest.mark.parametrize("dtype, zero_point", [("uint8", 0), ("uint8", 128), ("uint8", 37), ("int8", 0)])
def test_folded_requantize_is_numpys_quantize_of_the_activated_value(act, dtype, zero_point):
    mod, bias, channel_scale = _chain(act, dtype, zero_point)
    folded = fold_requantize(mod)
    assert "relax.quantize" not in _ops(folded) and {"relax.round", "relax.clip"} <= _ops(folded)
    rng = np.random.default_rng(0)
    # wide enough to saturate both ends of the range (|value / scale| up to ~600)
    acc = rng.integers(-40000, 40000, SHAPE).astype(np.int32)
    want = _numpy_requantize(acc, bias, channel_scale, act, 0.05, zero_point, dtype)
    got = _run(folded, acc)
    assert got.dtype == np.dtype(dtype)
    diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
    assert diff.max() <= 1 and np.mean(diff == 0) > 0.99  # one float rounding away at most, near a boundary
    low, high = QUANTIZED_RANGE[dtype]
    assert got.min() == want.min() and got.max() == want.max()  # the activation's and the dtype's bounds exact
    if act == "relu6":  # 6 / 0.05 = 120 steps above the zero point, below the dtype's top for every case here
        assert got.max() == min(high, zero_point + 120)
    if act in ("relu", "relu6"):
        assert got.min() == max(low, zero_point)
    # TVM's own lowering of the unfolded chain agrees the same way
    unfolded = _run(mod, acc)
    assert np.abs(unfolded.astype(np.int32) - got.astype(np.int32)).max() <= 1


def test_chains_that_cannot_fold_are_left_as_they_are():
    shared, _, _ = _chain("relu", "uint8", 0, extra_output=True)  # the fp32 value is also an output
    steep, _, _ = _chain("none", "uint8", 0, scale=1e-6)  # a multiplier above 1: the rounded value could overflow
    for mod in (shared, steep):
        kept = fold_requantize(mod)
        assert "relax.quantize" in _ops(kept) and tvm_ffi.structural_equal(kept, relax.transform.Normalize()(mod))


# each conv / FC whose output the next int8 op reads (through a ReLU or ReLU6 at most)
@pytest.mark.parametrize("name, rule, folds", [("depthwise_separable", "conv_requantize", 5), ("mlp", "fc_requantize", 1)])
def test_int8_builds_fold_their_requantizes_and_stay_close(name, rule, folds, rng):
    model = fixtures.MODELS[name](rng)
    feeds = random_inputs(model, rng)
    calib = [random_inputs(model, rng) for _ in range(4)]
    without = tuple(r for r in RULE_NAMES if r not in REQUANTIZE_RULES)
    folded = compiler.compile(model, target="native", calib=calib, bias_correction=None)
    kept = compiler.compile(model, target="native", calib=calib, bias_correction=None, fuse=without)
    assert folded.report.fusion[rule] == folds and rule not in kept.report.fusion
    assert folded.report.schedules.unscheduled == {}
    assert folded.report.kernels <= kept.report.kernels
    want = onnxruntime_outputs(model, feeds)[0]
    got, before = folded.run(**feeds)[0], kept.run(**feeds)[0]
    cosine = float(got.ravel() @ want.ravel() / (np.linalg.norm(got) * np.linalg.norm(want)))
    assert cosine > 0.99, cosine
    # what the fold changes is a float rounding here and there: far below the quantization error itself
    assert np.abs(got - before).max() <= 0.25 * np.abs(got - want).max() + 1e-6


def test_unfused_builds_keep_the_quantize(rng):
    model = fixtures.MODELS["depthwise_separable"](rng)
    calib = [random_inputs(model, rng) for _ in range(2)]
    unfused = compiler.compile(model, target="native", calib=calib, bias_correction=None, fuse=False)
    assert unfused.report.fusion == {} and unfused.report.unfused_ops["quantize"] >= 4
    assert "round" not in unfused.report.unfused_ops
