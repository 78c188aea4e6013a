"""Fusion rules: each matches where it should, refuses where it must, and never changes the numbers."""

import numpy as np
import pytest

import compiler
from compiler.frontend import import_onnx
from relay_passes import RULE_NAMES, fuse, prepare_graph
from relay_passes.patterns import CONV_ACTIVATIONS, FC_ACTIVATIONS
from tests import fixtures
from tests.fixtures import GraphBuilder, onnxruntime_outputs, random_inputs


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
    assert reports[False]["fusion"] == {} and reports[False]["kernels"] >= reports[True]["kernels"]
    return reports[True]


def matched(report):
    return {rule: n for rule, n in report["fusion"].items() if n}


# exporters' spellings too: GELU as erf/tanh math (before opset 20), HardSwish as x * HardSigmoid(x) (torch)
@pytest.mark.parametrize("act", sorted(CONV_ACTIVATIONS) + ["gelu_erf_math", "gelu_tanh_math", "hardswish_torch"])
def test_conv_bn_activation_is_one_kernel(act, rng):
    report = compile_both_ways(fixtures.conv_act(rng, act), rng)
    assert matched(report) == {"conv_bn_act": 1} and report["unfused_ops"] == {} and report["kernels"] == 1


@pytest.mark.parametrize("act", ["relu", "bounded_relu", "hardswish"])
def test_depthwise_conv_bn_activation_is_one_kernel(act, rng):
    report = compile_both_ways(fixtures.conv_act(rng, act, depthwise=True), rng)
    assert matched(report) == {"conv_bn_act": 1} and report["kernels"] == 1


@pytest.mark.parametrize("act", sorted(FC_ACTIVATIONS) + ["gelu_erf_math"])
def test_fc_elementwise_is_one_kernel(act, rng):
    report = compile_both_ways(fixtures.fc_act(rng, act), rng)
    assert matched(report) == {"fc_act": 1} and report["unfused_ops"] == {} and report["kernels"] == 1


@pytest.mark.parametrize("order, rule", [("sum_act", "conv_bn_sum_act"), ("act_sum", "conv_bn_act_sum"),
                                         ("sum", "conv_bn_sum")])
def test_conv_with_residual_sum_is_one_kernel(order, rule, rng):
    report = compile_both_ways(fixtures.conv_sum(rng, order), rng)
    assert matched(report) == {rule: 1} and report["kernels"] == 1


def test_fc_sum_is_one_kernel(rng):
    report = compile_both_ways(fixtures.fc_sum(rng), rng)
    assert matched(report) == {"fc_sum": 1} and report["kernels"] == 1


def test_preactivation_bn_relu_is_one_kernel(rng):
    report = compile_both_ways(fixtures.bn_relu(rng), rng)
    assert matched(report) == {"bn_relu": 1} and report["unfused_ops"] == {"conv2d": 1}


def test_resnet_block_kernel_count_before_and_after(rng):
    model = fixtures.resnet_bottleneck_block(rng)
    report = compile_both_ways(model, rng)
    assert report["kernels"] == 7  # one per conv: BN, residual Add and ReLU all inside
    unfused = compiler.compile(model, target="native", fuse=False).report
    assert unfused["kernels"] == 22 and unfused["unfused_ops"] == {"add": 9, "conv2d": 7, "relu": 6}


def test_no_fusion_across_a_value_another_op_reads(rng):
    g = GraphBuilder(rng)
    y = g.conv_bn("data", "block", 8, 8, act=None)
    model = g.model("leak", {"data": (1, 8, 7, 7)}, [g.op("Relu", [y], "act"), g.op("Sigmoid", [y], "other")])
    report = compile_both_ways(model, rng)
    assert matched(report) == {"conv_bn": 1}  # the BN output is read twice: activations stay outside
    assert report["unfused_ops"] == {"relu": 1, "sigmoid": 1}
    assert any("read outside" in r["reason"] for r in report["rejected"])


def test_broadcast_sum_stays_unfused_and_says_why(rng):
    g = GraphBuilder(rng)
    y = g.conv_bn("data", "block", 8, 8, act=None)
    model = g.model("bcast", {"data": (1, 8, 7, 7), "gate": (1, 8, 1, 1)}, [g.op("Relu", [g.op("Add", [y, "gate"], "sum")], "act")])
    report = compile_both_ways(model, rng)
    assert "conv_bn_sum_act" not in matched(report)
    assert any(r["rule"] == "conv_bn_sum_act" and "broadcast" in r["reason"] for r in report["rejected"])


def test_clip_not_from_zero_is_not_a_bounded_relu(rng):
    g = GraphBuilder(rng)
    y = g.conv_bn("data", "block", 8, 8, act=None)
    model = g.model("clip", {"data": (1, 8, 7, 7)}, [fixtures._clip(g, y, "act", -1, 1)])
    report = compile_both_ways(model, rng)
    assert matched(report) == {"conv_bn": 1} and report["unfused_ops"] == {"clip": 1}
    assert any("not a bounded ReLU" in r["reason"] for r in report["rejected"])


def test_resnet50_every_conv_bn_relu_chain_is_fused(rng):
    mod = prepare_graph(import_onnx(fixtures.resnet50(rng, image=64)).mod)
    _, report = fuse(mod)
    convs = sum(n for rule, n in report.fusion.items() if rule.startswith("conv"))
    assert convs == 53 and report.fusion["conv_bn_sum_act"] == 16
    assert report.unfused_ops == {"max_pool2d": 1, "mean": 1, "reshape": 1}


def test_rules_can_be_picked_or_unknown_ones_refused(rng):
    model = fixtures.conv_sum(rng, "sum_act")
    report = compiler.compile(model, target="native", fuse=["conv_bn"]).report
    assert matched(report) == {"conv_bn": 1} and report["rules"] == ["conv_bn"]
    with pytest.raises(compiler.QuantvmError, match="unknown fusion rule"):
        compiler.compile(model, target="native", fuse=["conv_bn", "conv_magic"])
    assert set(RULE_NAMES) == {r for r in compiler.compile(model, target="native").report["fusion"]}


def test_sum_of_two_conv_chains_fuses_the_one_read_nowhere_else(rng):
    """MobileNetV2's residual: add(block input, last conv); the block input is itself a conv chain that the
    next conv also reads, so only the other operand's chain may take the Add."""
    g = GraphBuilder(rng)
    a = g.conv_bn("data", "a", 8, 8, k=1, act=None)
    b = g.conv_bn(g.conv_bn(a, "b1", 8, 8, k=1), "b2", 8, 8, k=1, act=None)
    model = g.model("two_chains", {"data": (1, 8, 6, 6)}, [g.op("Add", [a, b], "sum")])
    report = compile_both_ways(model, rng)
    assert matched(report) == {"conv_bn": 1, "conv_bn_act": 1, "conv_bn_sum": 1} and report["unfused_ops"] == {}
