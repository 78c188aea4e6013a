"""Fusion rules: each matches where it should, refuses where it must, and never changes the numbers."""

import numpy as np
import pytest

import compiler
from compiler.frontend import import_onnx
from relay_passes import RULE_NAMES, fuse, prepare_graph
from relay_passes.patterns import CONV_ACTIVATIONS, FC_ACTIVATIONS
from tests import fixtures
from tests.fixtures import GraphBuilder, _clip, onnxruntime_outputs, random_inputs


def compile_both_ways(model, rng):
    """Fused and unfused builds; both must match onnxruntime. Returns the fused build's report."""
    feeds = random_inputs(model, rng)
    expected = onnxruntime_outputs(model, feeds)
    reports = {}
    for fused in (True, False):
        built = compiler.compile(model, target="native", fuse=fused)
        for got, want in zip(built.run(**feeds), expected):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, equal_nan=True)
        reports[fused] = built.report
        assert built.report.schedules.unscheduled == {}
    assert reports[False].fusion == {} and reports[False].kernels >= reports[True].kernels
    assert reports[False].elementwise["chains"] == {}  # --no-fuse is truly unfused
    return reports[True]


def matched(report):
    return {rule: n for rule, n in report.fusion.items() if n}


# exporters' spellings too: GELU as erf/tanh math (before opset 20), HardSwish as x * HardSigmoid(x) (torch)
@pytest.mark.parametrize("act", sorted(CONV_ACTIVATIONS) + ["gelu_erf_math", "gelu_tanh_math", "hardswish_torch"])
def test_conv_bn_activation_is_one_kernel(act, rng):
    report = compile_both_ways(fixtures.conv_act(rng, act), rng)
    assert matched(report) == {"conv_bn_act": 1} and report.unfused_ops == {} and report.kernels == 1


@pytest.mark.parametrize("act", ["relu", "bounded_relu", "hardswish"])
def test_depthwise_conv_bn_activation_is_one_kernel(act, rng):
    report = compile_both_ways(fixtures.conv_act(rng, act, depthwise=True), rng)
    assert matched(report) == {"conv_bn_act": 1} and report.kernels == 1


@pytest.mark.parametrize("act", sorted(FC_ACTIVATIONS) + ["gelu_erf_math"])
def test_fc_elementwise_is_one_kernel(act, rng):
    report = compile_both_ways(fixtures.fc_act(rng, act), rng)
    assert matched(report) == {"fc_act": 1} and report.unfused_ops == {} and report.kernels == 1


@pytest.mark.parametrize("order, rule", [("sum_act", "conv_bn_sum_act"), ("act_sum", "conv_bn_act_sum"),
                                         ("sum", "conv_bn_sum")])
def test_conv_with_residual_sum_is_one_kernel(order, rule, rng):
    report = compile_both_ways(fixtures.conv_sum(rng, order), rng)
    assert matched(report) == {rule: 1} and report.kernels == 1


def test_fc_sum_is_one_kernel(rng):
    report = compile_both_ways(fixtures.fc_sum(rng), rng)
    assert matched(report) == {"fc_sum": 1} and report.kernels == 1


def test_preactivation_bn_relu_is_one_kernel(rng):
    report = compile_both_ways(fixtures.bn_relu(rng), rng)
    assert matched(report) == {"bn_relu": 1} and report.unfused_ops == {"conv2d": 1}


def test_resnet_block_kernel_count_before_and_after(rng):
    model = fixtures.resnet_bottleneck_block(rng)
    report = compile_both_ways(model, rng)
    assert report.kernels == 7  # one per conv: BN, residual Add and ReLU all inside
    unfused = compiler.compile(model, target="native", fuse=False).report
    assert unfused.kernels == 22 and unfused.unfused_ops == {"add": 9, "conv2d": 7, "relu": 6}


def test_no_fusion_across_a_value_another_op_reads(rng):
    g = GraphBuilder(rng)
    y = g.conv_bn("data", "block", 8, 8, act=None)
    model = g.model("leak", {"data": (1, 8, 7, 7)}, [g.op("Relu", [y], "act"), g.op("Sigmoid", [y], "other")])
    report = compile_both_ways(model, rng)
    assert matched(report) == {"conv_bn": 1}  # the BN output is read twice: activations stay outside
    assert report.unfused_ops == {"relu": 1, "sigmoid": 1} and report.elementwise["chains"] == {}
    assert any("read outside" in r["reason"] for r in report.rejected)


def test_broadcast_sum_stays_unfused_and_says_why(rng):
    g = GraphBuilder(rng)
    y = g.conv_bn("data", "block", 8, 8, act=None)
    model = g.model("bcast", {"data": (1, 8, 7, 7), "gate": (1, 8, 1, 1)}, [g.op("Relu", [g.op("Add", [y, "gate"], "sum")], "act")])
    report = compile_both_ways(model, rng)
    assert "conv_bn_sum_act" not in matched(report)
    assert any(r["rule"] == "conv_bn_sum_act" and "broadcast" in r["reason"] for r in report.rejected)


def test_clip_not_from_zero_is_not_a_bounded_relu(rng):
    g = GraphBuilder(rng)
    y = g.conv_bn("data", "block", 8, 8, act=None)
    model = g.model("clip", {"data": (1, 8, 7, 7)}, [_clip(g, y, "act", -1, 1)])
    report = compile_both_ways(model, rng)
    assert matched(report) == {"conv_bn": 1}
    assert any("not a bounded ReLU" in r["reason"] for r in report.rejected)
    # no rule takes it, but as a plain elementwise op it still runs in the conv's kernel
    assert report.elementwise["chains"] == {"conv_bn+clip": 1} and report.kernels == 1


def test_resnet50_every_conv_bn_relu_chain_is_fused(rng):
    mod = prepare_graph(import_onnx(fixtures.resnet50(rng, image=64)).mod)
    _, report = fuse(mod)
    convs = sum(n for rule, n in report.fusion.items() if rule.startswith("conv"))
    assert convs == 53 and report.fusion["conv_bn_sum_act"] == 16
    assert report.unfused_ops == {"max_pool2d": 1, "mean": 1, "reshape": 1}


def test_rules_can_be_picked_or_unknown_ones_refused(rng):
    model = fixtures.conv_sum(rng, "sum_act")
    report = compiler.compile(model, target="native", fuse=["conv_bn"]).report
    assert matched(report) == {"conv_bn": 1} and report.rules == ("conv_bn",)
    with pytest.raises(compiler.QuantvmError, match="unknown fusion rule"):
        compiler.compile(model, target="native", fuse=["conv_bn", "conv_magic"])
    assert set(RULE_NAMES) == {r for r in compiler.compile(model, target="native").report.fusion}


def test_sum_of_two_conv_chains_fuses_the_one_read_nowhere_else(rng):
    """MobileNetV2's residual: add(block input, last conv); the block input is itself a conv chain that the
    next conv also reads, so only the other operand's chain may take the Add."""
    g = GraphBuilder(rng)
    a = g.conv_bn("data", "a", 8, 8, k=1, act=None)
    b = g.conv_bn(g.conv_bn(a, "b1", 8, 8, k=1), "b2", 8, 8, k=1, act=None)
    model = g.model("two_chains", {"data": (1, 8, 6, 6)}, [g.op("Add", [a, b], "sum")])
    report = compile_both_ways(model, rng)
    assert matched(report) == {"conv_bn": 1, "conv_bn_act": 1, "conv_bn_sum": 1} and report.unfused_ops == {}


# Elementwise and injective chains that no rule takes: into their producer's kernel, or one kernel of their own.

def _hardswish_as_math(g, x, name):
    """x * clip(x + 3, 0, 6) / 6, as exporters write HardSwish."""
    three, six = g.const(f"{name}.three", np.float32(3)), g.const(f"{name}.six", np.float32(6))
    gate = g.op("Div", [_clip(g, g.op("Add", [x, three], f"{name}.add"), f"{name}.clip", 0, 6), six], f"{name}.div")
    return g.op("Mul", [x, gate], name)


def _chain_kernels(model, rng, fused_kernels, unfused_ops=None):
    """Fused: `fused_kernels`, with `unfused_ops` left alone; unfused: one kernel per op, more of them.
    Returns the fused report."""
    report = compile_both_ways(model, rng)
    unfused = compiler.compile(model, target="native", fuse=False).report
    assert unfused.kernels == sum(unfused.unfused_ops.values()) > report.kernels == fused_kernels
    assert report.unfused_ops == (unfused_ops or {})
    return report


def test_hardswish_on_an_input_is_one_kernel(rng):
    g = GraphBuilder(rng)
    model = g.model("hardswish", {"data": (2, 16, 5, 8)}, [_hardswish_as_math(g, "data", "act")])
    report = _chain_kernels(model, rng, 1)
    assert report.elementwise["kernels"] == 1 and report.elementwise["ops"] >= 4


def test_silu_and_a_scale_after_an_fc_run_in_its_kernel(rng):
    g = GraphBuilder(rng)
    y = g.gemm("data", "fc", 16, 32)
    y = g.op("Mul", [y, g.op("Sigmoid", [y], "sigmoid")], "silu")
    y = g.op("Div", [g.op("Add", [y, "shift"], "shifted"), g.const("d", np.float32(1.5))], "out")
    model = g.model("fc_silu", {"data": (4, 16), "shift": (4, 32)}, [y])
    report = _chain_kernels(model, rng, 1)
    assert set(matched(report)) <= {"fc_bias", "fc_act"} and report.elementwise["epilogue_ops"] >= 2
    assert list(report.schedules.applied.values()) == ["matmul"]  # the FC's schedule still applies


def test_divide_multiply_add_after_a_conv_run_in_its_kernel(rng):
    g = GraphBuilder(rng)
    y = g.conv_bn("data", "block", 8, 16)  # conv_bn_act (ReLU)
    y = g.op("Div", [g.op("Sqrt", [y], "sqrt"), "scale"], "div")
    y = g.op("Add", [g.op("Mul", [y, y], "square"), g.const("k", np.float32(0.25))], "out")
    model = g.model("conv_chain", {"data": (1, 8, 12, 12), "scale": (1, 16, 12, 12)}, [y])
    report = _chain_kernels(model, rng, 1)
    assert report.elementwise["chains"] == {"conv_bn_act+sqrt+divide+multiply+add": 1}
    assert any(rule.startswith("conv2d_winograd_nchwc") for rule in report.schedules.applied.values())  # a 3x3 conv: the chain after its output transform


def test_matmul_of_two_activations_takes_its_epilogue(rng):
    """Attention's scores: no rule takes a matmul of two activations, the scaling still joins it."""
    g = GraphBuilder(rng)
    y = g.op("MatMul", ["q", "k"], "scores")
    y = g.op("Add", [g.op("Mul", [y, g.const("scale", np.float32(0.125))], "scaled"), "mask"], "masked")
    model = g.model("scores", {"q": (2, 8, 16), "k": (2, 16, 32), "mask": (1, 1, 32)}, [y])
    report = _chain_kernels(model, rng, 1)
    assert report.elementwise["chains"] == {"matmul+multiply+add": 1}


def test_transpose_reshape_chain_is_one_kernel(rng):
    g = GraphBuilder(rng)
    y = g.op("Transpose", ["data"], "transpose", perm=[0, 2, 3, 1])
    y = g.op("Reshape", [y, g.const("shape", np.array([1, 48, 8], np.int64))], "reshape")
    y = g.op("Add", [g.op("Mul", [y, g.const("s", rng.normal(0, 1, 8).astype(np.float32))], "mul"), "bias"], "out")
    model = g.model("transpose_reshape", {"data": (1, 8, 6, 8), "bias": (1, 48, 8)}, [y])
    report = _chain_kernels(model, rng, 1)
    assert report.elementwise["chains"] == {"permute_dims+reshape+multiply+add": 1}


def test_a_value_read_outside_the_chain_ends_it(rng):
    """exp(x) is also a graph output: the chain after it cannot hide it."""
    g = GraphBuilder(rng)
    s = g.op("Exp", ["data"], "exp")
    y = g.op("Tanh", [g.op("Mul", [s, "data"], "mul")], "tanh")
    model = g.model("leak", {"data": (2, 32)}, [y, s])
    report = _chain_kernels(model, rng, 2, {"exp": 1})
    assert report.elementwise["chains"] == {"multiply+tanh": 1}


def test_a_costly_op_is_not_recomputed_for_every_element_of_a_broadcast(rng):
    """exp on a per-channel gate, then a multiply onto the whole tensor: the exp stays a kernel of its own,
    while the cheap scale on the gate joins it."""
    g = GraphBuilder(rng)
    gate = g.op("Mul", [g.op("Exp", ["gate"], "exp"), g.const("k", np.float32(0.5))], "scaled")
    model = g.model("gate", {"data": (1, 8, 6, 6), "gate": (1, 8, 1, 1)}, [g.op("Mul", ["data", gate], "out")])
    report = _chain_kernels(model, rng, 2, {"multiply": 1})
    assert report.elementwise["chains"] == {"exp+multiply": 1}


def test_int8_conv_with_elementwise_tail(rng):
    g = GraphBuilder(rng)
    y = g.conv_bn("data", "block", 8, 16)
    y = g.op("Add", [g.op("Mul", [g.op("Sqrt", [y], "sqrt"), "scale"], "mul"), g.const("k", np.float32(0.5))], "out")
    model = g.model("int8_chain", {"data": (1, 8, 8, 8), "scale": (1, 16, 8, 8)}, [y])
    calib = [random_inputs(model, rng) for _ in range(2)]
    feeds = random_inputs(model, rng)
    expected = onnxruntime_outputs(model, feeds)[0]
    builds = {fused: compiler.compile(model, target="native", calib=calib, bias_correction=None, fuse=fused)
              for fused in (True, False)}
    for built in builds.values():
        got = built.run(**feeds)[0]
        assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max()
        assert built.report.schedules.unscheduled == {}
    assert builds[True].report.elementwise["epilogue_ops"] >= 3
    assert builds[True].report.kernels < builds[False].report.kernels


def test_int8_block_output_and_its_quantized_copy_come_from_one_kernel(rng, monkeypatch):
    """Between two identity bottlenecks, the first block's fp32 output is a model output too, read by the
    second's residual Add and quantized for its first conv: the block's last kernel stores both, bit for bit
    what a quantize kernel of its own computes."""
    from relay_passes import fuse_elementwise

    g = GraphBuilder(rng)
    first = fixtures.bottleneck(g, "data", "block1", 16, 8, 16)
    y = fixtures.bottleneck(g, first, "block2", 16, 8, 16)
    model = g.model("two_blocks", {"data": (1, 16, 12, 12)}, [first, y])
    calib = [random_inputs(model, rng) for _ in range(2)]
    feeds = random_inputs(model, rng)
    paired = compiler.compile(model, target="native", calib=calib, bias_correction=None)
    monkeypatch.setattr(fuse_elementwise, "_second_quantize", lambda *args: None)
    apart = compiler.compile(model, target="native", calib=calib, bias_correction=None)
    assert paired.report.elementwise["second_outputs"] == 1 and apart.report.elementwise["second_outputs"] == 0
    assert paired.report.kernels == apart.report.kernels - 1
    assert paired.report.schedules.unscheduled == {}
    assert paired.report.unfused_ops.get("quantize", 0) == apart.report.unfused_ops["quantize"] - 1
    assert not any("quantize" in r["reason"] for r in paired.report.rejected)
    for got, want in zip(paired.run(**feeds), apart.run(**feeds)):
        np.testing.assert_array_equal(got, want)
    # the profile still names every conv's kernel (the paired kernel's ops include the quantize)
    named = {node for entry in paired.metadata.kernels.values()
             for call in entry.get("calls", [entry]) for node in call.get("nodes", [])}
    assert {n.name for n in model.graph.node if n.op_type == "Conv"} <= named
    expected = onnxruntime_outputs(model, feeds)[0]
    assert np.abs(paired.run(**feeds)[0] - expected).max() <= 0.05 * np.abs(expected).max()
