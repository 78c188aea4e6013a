"""Convolutions that had no fast kernel now run on the conv2d kernels, and still match onnxruntime:
ConvTranspose as the sub-pixel conv2d (relay_passes/canonicalize_conv_transpose.py), Conv1d networks as
2-D networks of height 1 (relay_passes/canonicalize_conv1d.py), and convs whose channels fit no block
(the NCHW rule in targets/schedules.py)."""

from collections import Counter

import numpy as np
import pytest

import compiler
from compiler.frontend import import_onnx
from relay_passes import canonicalize_conv_taps, prepare_graph
from relay_passes.canonicalize_conv_transpose import phase_weight
from tests.fixtures import GraphBuilder, convnext_block, onnxruntime_outputs, random_inputs
from tests.test_passes import _ops


def _relative_error(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _cosine(got, want) -> float:
    return float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))


def _check_fp32_and_int8(model, rng):
    feeds = random_inputs(model, rng)
    want = onnxruntime_outputs(model, feeds)[0]
    fp32 = compiler.compile(model, target="native")
    assert _relative_error(fp32.run(**feeds)[0], want) <= 1e-4
    int8 = compiler.compile(model, target="native", calib=[feeds], bias_correction=None)
    assert _cosine(int8.run(**feeds)[0], want) >= 0.99
    return fp32


def _canonical_ops(model) -> Counter:
    return Counter(_ops(prepare_graph(import_onnx(model).mod)))


# (in channels, out channels, height, width, kernel, strides, pads, output padding, group)
CONV_TRANSPOSES = [
    (32, 16, 10, 12, (2, 2), (2, 2), (0, 0, 0, 0), (0, 0), 1),  # the DB detector's upsampling
    (32, 16, 9, 9, (4, 4), (2, 2), (1, 1, 1, 1), (0, 0), 1),    # FCN / GAN style
    (16, 32, 7, 8, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1),    # with output padding
    (16, 16, 8, 8, (3, 3), (1, 1), (1, 1, 1, 1), (0, 0), 1),    # stride 1
    (8, 24, 5, 6, (5, 3), (3, 2), (2, 1, 0, 1), (1, 0), 1),     # uneven kernel, strides and pads
    (16, 16, 6, 6, (4, 4), (2, 2), (1, 1, 1, 1), (0, 0), 16),   # depthwise: stays a conv2d_transpose
]


def _conv_transpose_model(rng, cin, cout, height, width, kernel, strides, pads, output_padding, group):
    g = GraphBuilder(rng)
    w = g.const("up.w", rng.normal(0, 0.2, (cin, cout // group, *kernel)).astype(np.float32))
    b = g.const("up.b", rng.normal(0, 0.1, cout).astype(np.float32))
    y = g.op("ConvTranspose", ["x", w, b], "up", kernel_shape=list(kernel), strides=list(strides), pads=list(pads),
             output_padding=list(output_padding), group=group)
    y = g.op("Relu", [g.conv(y, "after", cout, 16)], "relu")
    return g.model("conv_transpose", {"x": (1, cin, height, width)}, [y])


@pytest.mark.parametrize("case", CONV_TRANSPOSES, ids=lambda c: f"k{c[4]}s{c[5]}p{c[6]}op{c[7]}g{c[8]}")
def test_conv_transpose_runs_as_a_conv_and_matches_onnxruntime(case, rng):
    model = _conv_transpose_model(rng, *case)
    ops = _canonical_ops(model)
    grouped = case[-1] != 1
    assert ops["relax.nn.conv2d_transpose"] == (1 if grouped else 0)
    assert ops["relax.nn.conv2d"] == (1 if grouped else 2)
    _check_fp32_and_int8(model, rng)


def test_phase_weight_is_the_transposed_kernel_split_by_output_phase():
    """Stride 2, kernel 3: phase 0 reads taps 2 and 0 (flipped), phase 1 tap 1 and a zero."""
    weight = np.arange(3, dtype=np.float32).reshape(1, 1, 1, 3) + 1  # taps 1, 2, 3 along the width
    phases = phase_weight(weight, (1, 2))
    np.testing.assert_array_equal(phases[:, 0, 0], [[3, 1], [0, 2]])


def _conv1d(g, x, name, cin, cout, k, stride=1, dilation=1, group=1):
    w = g.const(f"{name}.w", g.rng.normal(0, (1 / (cin // group * k)) ** 0.5, (cout, cin // group, k)).astype(np.float32))
    b = g.const(f"{name}.b", g.rng.normal(0, 0.1, cout).astype(np.float32))
    pad = dilation * (k - 1) // 2
    return g.op("Conv", [x, w, b], name, kernel_shape=[k], strides=[stride], dilations=[dilation], pads=[pad, pad],
                group=group)


def _conv1d_network(rng):
    """A keyword-spotter / TCN mix: strided and dilated Conv1d, a depthwise one, ReLU, MaxPool1d, a residual
    add, a scale by a per-channel constant, average pooling, then a 1-D reduction."""
    g = GraphBuilder(rng)
    y = g.op("Relu", [_conv1d(g, "audio", "stem", 1, 32, 9, stride=4)], "stem.relu")
    y = g.op("MaxPool", [y], "pool1", kernel_shape=[2], strides=[2])
    z = g.op("Relu", [_conv1d(g, y, "dilated", 32, 32, 3, dilation=2)], "dilated.relu")
    z = _conv1d(g, z, "depthwise", 32, 32, 5, group=32)
    y = g.op("Add", [y, z], "residual")
    y = g.op("Mul", [y, g.const("gain.c", rng.uniform(0.5, 1.5, (32, 1)).astype(np.float32))], "gain")
    y = g.op("AveragePool", [y], "pool2", kernel_shape=[3], strides=[2], pads=[1, 1])
    y = _conv1d(g, y, "head", 32, 48, 3)
    y = g.op("ReduceMean", [y, g.const("axes", np.array([2], np.int64))], "mean", keepdims=0)
    return g.model("conv1d_net", {"audio": (1, 1, 1024)}, [y], opset=18)


def test_conv1d_network_becomes_2d_with_one_squeeze_and_matches_onnxruntime(rng):
    model = _conv1d_network(rng)
    ops = _canonical_ops(model)
    assert ops["relax.nn.conv1d"] == 0 and ops["relax.nn.conv2d"] == 4
    assert ops["relax.nn.max_pool1d"] == 0 and ops["relax.nn.avg_pool1d"] == 0
    assert ops["relax.squeeze"] == 1 and ops["relax.expand_dims"] == 1  # in and out of 2-D once each
    fp32 = _check_fp32_and_int8(model, rng)
    assert fp32.report.layout_transforms <= 2  # only at the graph's edges


def _unblockable_convs(rng):
    """18 and 4 channels fit no channel block, and padding them to one would add more than a quarter
    (targets.channel_padding) on AVX2 (to 24) and AVX-512 (to 24 or 32) alike: the convs stay NCHW."""
    g = GraphBuilder(rng)
    y = g.op("Relu", [g.conv("x", "c18", 3, 18, k=3, bias=True)], "r1")
    y = g.op("Relu", [g.conv(y, "c18s2", 18, 18, k=3, stride=2, bias=True)], "r2")
    y = g.conv(y, "c4", 18, 4, k=1, bias=True)
    return g.model("nchw_convs", {"x": (1, 3, 20, 24)}, [y])


def test_convs_whose_channels_fit_no_block_get_the_nchw_rule_and_match_onnxruntime(rng):
    fp32 = _check_fp32_and_int8(_unblockable_convs(rng), rng)
    rules = Counter(fp32.report.schedules.applied.values())
    assert rules["conv2d_nchw"] == 2 and rules["conv2d_nchw_pointwise"] == 1, rules


# (channels in, out, map): ShuffleNet's 116 channels at 14x14 (196 pixels: 4-lane vectors) and 58 at 28x28
# (full vectors), an SSD head's 546 outputs at 10x10, and a 5x5 map no vector divides (masked lanes).
POINTWISE = [(116, 116, 14), (58, 58, 28), (60, 546, 10), (20, 12, 5)]


@pytest.mark.parametrize("cin,cout,size", POINTWISE, ids=lambda v: str(v))
def test_pointwise_convs_left_nchw_are_tiled_over_whole_maps_and_match_onnxruntime(cin, cout, size, rng):
    g = GraphBuilder(rng)
    y = g.op("Relu", [g.conv("x", "pw1", cin, cout, k=1, bias=True)], "r1")
    y = g.op("Add", [g.conv(y, "pw2", cout, cout, k=1, bias=True), y], "sum")
    fp32 = _check_fp32_and_int8(g.model("pointwise", {"x": (1, cin, size, size)}, [y]), rng)
    rules = Counter(fp32.report.schedules.applied.values())
    assert rules["conv2d_nchw_pointwise"] == 2, rules


def _atrous_pyramid(rng):
    """DeepLabV3's pyramid on a 9x11 map: at dilation 12 only the centre tap reads the input; at dilation 4
    all of a 3x3 kernel does; at dilation 6, rows keep 3 taps (9 rows reach 6 away) and columns too; a 3x5
    kernel at dilation (1, 8) keeps its rows and its 3 middle columns; stride 2 at dilation 10 keeps the centre
    row, and all 3 columns (11 columns: output column 5 reads input column 0, and column 0 reads 10)."""
    g = GraphBuilder(rng)
    branches = []
    for name, kernel, dilation, stride in (("d12", (3, 3), (12, 12), 1), ("d4", (3, 3), (4, 4), 1),
                                           ("d6", (3, 3), (6, 6), 1), ("wide", (3, 5), (1, 8), 1),
                                           ("s2", (3, 3), (10, 10), 2)):
        w = g.const(f"{name}.w", rng.normal(0, 0.1, (16, 32, *kernel)).astype(np.float32))
        pads = [dilation[0] * (kernel[0] // 2), dilation[1] * (kernel[1] // 2)] * 2
        y = g.op("Conv", ["x", w], name, kernel_shape=list(kernel), dilations=list(dilation), pads=pads,
                 strides=[stride, stride])
        branches.append(g.op("Relu", [y], f"{name}.relu"))
    return g.model("atrous", {"x": (1, 32, 9, 11)}, branches)


def test_taps_that_read_only_padding_are_dropped_and_the_outputs_match_onnxruntime(rng, monkeypatch):
    monkeypatch.setattr(canonicalize_conv_taps, "MIN_SAVED_WORK", 1.0)  # the dead taps alone, no region split
    model = _atrous_pyramid(rng)
    kernels = sorted(tuple(int(k) for k in call.args[1].ty.shape.values[2:])
                     for call in _conv_calls(prepare_graph(import_onnx(model).mod)))
    assert kernels == [(1, 1), (1, 3), (3, 3), (3, 3), (3, 3)], kernels
    feeds = random_inputs(model, rng)
    want = onnxruntime_outputs(model, feeds)
    got = compiler.compile(model, target="native").run(**feeds)
    for g_, w_ in zip(got, want):
        assert _relative_error(g_, w_) <= 1e-4


def _atrous_conv_after_a_conv(rng, size=20, dilation=12, stride=1, channels=128):
    """DeepLabV3's rate-12 branch: a 3x3 conv at dilation 12 on a 20x20 map that a conv computed (so the
    map arrives blocked), with bias, BN and ReLU."""
    g = GraphBuilder(rng)
    y = g.op("Relu", [g.conv("x", "pre", 24, channels, k=1, bias=True)], "pre.relu")
    w = g.const("atrous.w", rng.normal(0, 0.05, (channels, channels, 3, 3)).astype(np.float32))
    y = g.op("Conv", [y, w], "atrous", kernel_shape=[3, 3], dilations=[dilation] * 2, pads=[dilation] * 4,
             strides=[stride] * 2)
    y = g.op("Relu", [g.bn(y, "atrous.bn", channels)], "atrous.relu")
    return g.model("atrous_regions", {"x": (1, 24, size, size)}, [y])


def test_taps_that_read_padding_for_some_outputs_are_skipped_region_by_region(rng):
    """At dilation 12 on 20 rows, rows 0-7 read through the middle and bottom taps, rows 8-11 through the
    middle one, rows 12-19 through the top and middle ones (columns alike): 9 regions, 36% of the work."""
    model = _atrous_conv_after_a_conv(rng)
    kernels = sorted(tuple(int(k) for k in call.args[1].ty.shape.values[2:])
                     for call in _conv_calls(prepare_graph(import_onnx(model).mod)))
    assert kernels == [(1, 1), (1, 1), (1, 2), (1, 2), (2, 1), (2, 1), (2, 2), (2, 2), (2, 2), (2, 2)], kernels
    fp32 = _check_fp32_and_int8(model, rng)
    assert fp32.report.layout_transforms == 2  # the region slices and their concatenation stay blocked
    assert fp32.report.layout["fallbacks"] == []


def test_a_strided_atrous_conv_split_into_regions_matches_onnxruntime(rng):
    model = _atrous_conv_after_a_conv(rng, size=40, dilation=16, stride=2, channels=160)
    assert len(_conv_calls(prepare_graph(import_onnx(model).mod))) > 2
    _check_fp32_and_int8(model, rng)


def test_a_conv_whose_taps_all_read_the_input_everywhere_is_not_split(rng):
    model = _atrous_conv_after_a_conv(rng, size=20, dilation=1)
    assert len(_conv_calls(prepare_graph(import_onnx(model).mod))) == 2


def _conv_calls(mod):
    from tvm import relax
    calls = []
    relax.analysis.post_order_visit(mod["main"], lambda e: calls.append(e) if isinstance(e, relax.Call)
                                    and getattr(e.op, "name", "") == "relax.nn.conv2d" else None)
    return calls


# (channels in, out, groups): RegNet's groups of 8 channels (merged in pairs into blocks of 16 on AVX-512),
# groups of 16, twice the outputs per group, and groups of 3 channels, which fit no block and stay NCHW.
GROUPED = [(48, 48, 6), (64, 64, 4), (48, 96, 6), (24, 24, 8)]


@pytest.mark.parametrize("cin,cout,groups", GROUPED, ids=lambda v: str(v))
def test_grouped_convs_run_blocked_and_match_onnxruntime(cin, cout, groups, rng):
    g = GraphBuilder(rng)
    y = g.op("Relu", [g.conv("x", "c1", cin, cin, k=1, bias=True)], "r1")
    y = g.op("Relu", [g.conv(y, "grouped", cin, cout, k=3, stride=2, groups=groups, bias=True)], "r2")
    y = g.conv(y, "c2", cout, 16, k=1, bias=True)
    model = g.model("grouped", {"x": (1, cin, 13, 12)}, [y])
    fp32 = _check_fp32_and_int8(model, rng)
    rules = Counter(fp32.report.schedules.applied.values())
    blocked = cin // groups % 8 == 0 or 8 % (cin // groups) == 0
    assert rules["conv2d_nchwc"] == (3 if blocked else 2), rules
    assert fp32.report.layout_transforms == (2 if blocked else 4)
    # int8 for a VNNI Xeon (built, not run): the grouped conv takes the dot instruction like the others
    int8 = compiler.compile(model, target="cascadelake", calib=[random_inputs(model, rng)], bias_correction=None)
    vnni = [r for r in int8.report.schedules.applied.values() if "_vnni" in r]
    assert len(vnni) == (3 if blocked else 2), int8.report.schedules.applied


# (in channels, kernel, stride, pads, width, folded): a keyword spotter's stem; padding on both sides; an
# unread tail cropped; 3 channels with padding on the left only; then convs left alone: 4 channels (a full
# int8 group), a kernel that is no multiple of the stride
STRIDED_1D = [(1, 80, 16, (0, 0), 1600, True), (1, 8, 4, (2, 2), 1001, True), (2, 6, 3, (0, 0), 100, True),
              (3, 4, 2, (1, 0), 50, True), (4, 8, 4, (0, 0), 200, False), (1, 9, 4, (4, 4), 200, False)]


@pytest.mark.parametrize("cin,kernel,stride,pads,width,folded", STRIDED_1D, ids=lambda v: str(v))
def test_a_strided_conv1d_on_few_channels_folds_its_stride_into_channels_and_matches_onnxruntime(
        cin, kernel, stride, pads, width, folded, rng):
    g = GraphBuilder(rng)
    w = g.const("stem.w", rng.normal(0, (1 / (cin * kernel)) ** 0.5, (16, cin, kernel)).astype(np.float32))
    y = g.op("Conv", ["audio", w, g.const("stem.b", rng.normal(0, 0.1, 16).astype(np.float32))], "stem",
             kernel_shape=[kernel], strides=[stride], pads=list(pads))
    model = g.model("strided_stem", {"audio": (1, cin, width)}, [g.op("Relu", [y], "relu")], opset=18)
    (conv,) = _conv_calls(prepare_graph(import_onnx(model).mod))
    weight_shape = [int(d) for d in conv.args[1].ty.shape.values]
    if folded:
        assert weight_shape == [16, cin * stride, 1, kernel // stride]
        assert [int(s) for s in conv.attrs.strides] == [1, 1]
    else:
        assert weight_shape == [16, cin, 1, kernel]
    _check_fp32_and_int8(model, rng)


def test_channels_last_islands_run_channels_first_and_blocked_and_match_onnxruntime(rng):
    """ConvNeXt's permute -> LayerNorm/Linear/GELU -> permute back becomes a channel norm and 1x1 convs
    (relay_passes/canonicalize_channels_last.py), and the norm runs on the blocked layout
    (targets/channel_norm.py): no transform between the blocked ops."""
    model = convnext_block(rng)
    ops = _canonical_ops(model)
    assert ops["relax.permute_dims"] == 0 and ops["relax.matmul"] == 0
    assert ops["relax.nn.layer_norm"] == 2 and ops["relax.nn.conv2d"] == 4
    fp32 = _check_fp32_and_int8(model, rng)
    assert fp32.report.layout_transforms == 2  # the graph's input and output
    applied = fp32.report.schedules.applied
    assert "channel_norm" in applied.values(), applied  # (the two norms share one kernel)
    assert all(rule != "generic" for kernel, rule in applied.items() if not kernel.startswith("te_layout")), applied


@pytest.mark.parametrize("per_pixel,op", [("Softmax", "relax.nn.softmax"), ("Regrid", "relax.reshape")])
def test_a_channels_last_island_it_cannot_rewrite_stays_channels_last(rng, per_pixel, op):
    """An op it does not know, or a reshape to another pixel grid, keeps the downsampling's island as it is."""
    model = convnext_block(rng, per_pixel=per_pixel)
    ops = _canonical_ops(model)
    assert ops["relax.permute_dims"] == 2 and ops[op] >= 1  # the downsampling's island
    norms_left = 1 if per_pixel == "Regrid" else 0  # the downsampling's own norm, over the last axis
    assert ops["relax.nn.layer_norm"] == 1 + norms_left and ops["relax.matmul"] == 0  # the block's island
    _check_fp32_and_int8(model, rng)
