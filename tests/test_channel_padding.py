"""Channels no vector block divides, padded to whole blocks, and channel shuffles carried as an index
(targets.channel_padding), with the gathers left between blocked tensors run blocked (targets.channel_gather)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from onnx import helper
from tvm import relax

import compiler
from compiler.frontend import import_onnx
from relay_passes import prepare_graph
from targets import block_channels, resolve_target
from targets.channel_padding import _channel_permutation
from tests.fixtures import GraphBuilder, onnxruntime_outputs, random_inputs


def _ops(mod, name: str) -> list[relax.Call]:
    found = []
    relax.analysis.post_order_visit(
        mod["main"].body,
        lambda e: found.append(e) if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op)
        and e.op.name == name else None)
    return found


def _channel_shuffle(g: GraphBuilder, x: str, name: str, channels: int, size: int) -> str:
    """torchvision's ShuffleNetV2 channel shuffle: view as (2, C/2), transpose, flatten back."""
    split = g.const(f"{name}.split", np.array([1, 2, channels // 2, size, size], np.int64))
    merged = g.const(f"{name}.merged", np.array([1, channels, size, size], np.int64))
    y = g.op("Reshape", [x, split], f"{name}.view")
    y = g.op("Transpose", [y], f"{name}.transpose", perm=[0, 2, 1, 3, 4])
    return g.op("Reshape", [y, merged], f"{name}.flatten")


def _halves(g: GraphBuilder, x: str, name: str, channels: int, form: str) -> tuple[str, str]:
    half = channels // 2
    if form == "Split":
        sizes = g.const(f"{name}.sizes", np.array([half, half], np.int64))
        g.nodes.append(helper.make_node("Split", [x, sizes], [f"{name}.0", f"{name}.1"], name=name, axis=1))
        return f"{name}.0", f"{name}.1"
    bounds = [g.const(f"{name}.{k}", np.array(v, np.int64)) for k, v in
              (("b0", [0]), ("e0", [half]), ("b1", [half]), ("e1", [channels]), ("axes", [1]))]
    first = g.op("Slice", [x, bounds[0], bounds[1], bounds[4]], f"{name}.first")
    second = g.op("Slice", [x, bounds[2], bounds[3], bounds[4]], f"{name}.second")
    return first, second


def _shuffle_unit(rng, form: str = "Slice", branch: int = 58, size: int = 8):
    """Two ShuffleNetV2 units on `branch`-channel branches (58: no vector block divides it): a downsampling
    one (two branches concatenated), then a basic one (half passed through, half through 1x1, depthwise
    3x3, 1x1 convs), each followed by the channel shuffle; then a conv reading the shuffled channels."""
    g = GraphBuilder(rng)
    channels = 2 * branch
    a = g.conv_bn("data", "down.a.dw", 24, 24, k=3, stride=2, groups=24, act=None)
    a = g.conv_bn(a, "down.a.pw", 24, branch, k=1)
    b = g.conv_bn("data", "down.b.pw1", 24, branch, k=1)
    b = g.conv_bn(b, "down.b.dw", branch, branch, k=3, stride=2, groups=branch, act=None)
    b = g.conv_bn(b, "down.b.pw2", branch, branch, k=1)
    x = _channel_shuffle(g, g.op("Concat", [a, b], "down.cat", axis=1), "down.shuffle", channels, size)
    kept, through = _halves(g, x, "unit.split", channels, form)
    y = g.conv_bn(through, "unit.pw1", branch, branch, k=1)
    y = g.conv_bn(y, "unit.dw", branch, branch, k=3, groups=branch, act=None)
    y = g.conv_bn(y, "unit.pw2", branch, branch, k=1)
    x = _channel_shuffle(g, g.op("Concat", [kept, y], "unit.cat", axis=1), "unit.shuffle", channels, size)
    out = g.conv_bn(x, "head", channels, 32, k=1)
    return g.model("shuffle_unit", {"data": (1, 24, 2 * size, 2 * size)}, [out])


def _compiled(model, rng, **options):
    feeds = random_inputs(model, rng)
    built = compiler.compile(model, target="native", **options)
    return built, built.run(**feeds)[0], onnxruntime_outputs(model, feeds)[0]


@pytest.mark.parametrize("form", ["Slice", "Split"])
def test_shuffle_units_run_blocked_from_input_to_output(rng, form):
    """Every conv blocked (58 channels padded to 64), the shuffles and splits gone into indices and
    gathers of blocked tensors: layout transforms at the input and the output only."""
    model = _shuffle_unit(rng, form)
    mod, report = block_channels(prepare_graph(import_onnx(model).mod), resolve_target("native"))
    assert all(c.attrs.data_layout != "NCHW" for c in _ops(mod, "relax.nn.conv2d"))
    assert len(_ops(mod, "relax.layout_transform")) == 2
    assert report.fallbacks == []
    assert not _ops(mod, "relax.take") and not _ops(mod, "relax.permute_dims")
    built, got, want = _compiled(model, rng)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert built.report.layout_transforms == 2


def _int8_matches_fp32(model, rng):
    """The int8 build against fp32 onnxruntime: quantization noise, where a wrong channel order scrambles the
    output."""
    calib = random_inputs(model, rng)["data"]
    built, got, want = _compiled(model, rng, calib=[calib], bias_correction=None)
    assert np.abs(got - want).mean() <= 0.1 * np.abs(want).mean()
    return built


def test_int8_shuffle_units_run_blocked(rng):
    built = _int8_matches_fp32(_shuffle_unit(rng), rng)
    # the input (quantized to int8 and uint8 for its two readers) and the output: none between convs
    assert built.report.layout_transforms == 3
    assert built.report.layout["fallbacks"] == []


def test_a_conv_with_channels_no_block_divides_computes_them_padded(rng):
    """58 output channels: the conv writes 64 (zero weights and bias for the last 6), the next conv reads
    all 64 with zero weights for them; the result is the unpadded model's."""
    g = GraphBuilder(rng)
    y = g.conv_bn(g.conv_bn("data", "narrow", 16, 58), "next", 58, 16, act="Relu6")
    model = g.model("narrow", {"data": (1, 16, 12, 12)}, [y])
    mod, _ = block_channels(prepare_graph(import_onnx(model).mod), resolve_target("native"))
    convs = _ops(mod, "relax.nn.conv2d")
    assert [int(c.ty.shape.values[1]) * int(c.ty.shape.values[4]) for c in convs] == [64, 16]
    _, got, want = _compiled(model, rng)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_channel_shuffle_is_recognized_as_a_permutation_and_other_reshapes_are_not():
    shape = [1, 6, 2, 2]
    assert list(_channel_permutation(shape, [1, 2, 3, 2, 2], [0, 2, 1, 3, 4])) == [0, 3, 1, 4, 2, 5]
    # moving the width into the channels is no permutation of channels alone
    assert _channel_permutation(shape, [1, 6, 2, 2], [0, 1, 3, 2]) is None


def test_squeeze_excite_reducing_to_four_channels_stays_blocked(rng):
    """EfficientNet's squeeze-excite reduces 96 channels to 4 on the pooled 1x1 map: padded to a whole
    vector (the padding is no work on one pixel), so the gate stays blocked between the convs."""
    g = GraphBuilder(rng)
    x = g.conv_bn("data", "stem", 16, 96)
    pooled = g.op("GlobalAveragePool", [x], "se.pool")
    squeezed = g.conv(pooled, "se.reduce", 96, 4, k=1, bias=True)
    gate = g.op("Mul", [squeezed, g.op("Sigmoid", [squeezed], "se.silu.sigmoid")], "se.silu")
    gate = g.op("Sigmoid", [g.conv(gate, "se.expand", 4, 96, k=1, bias=True)], "se.gate")
    y = g.conv_bn(g.op("Mul", [x, gate], "se.scale"), "head", 96, 16, k=1, act=None)
    model = g.model("squeeze_excite_4", {"data": (1, 16, 8, 8)}, [y])
    mod, report = block_channels(prepare_graph(import_onnx(model).mod), resolve_target("native"))
    assert all(c.attrs.data_layout != "NCHW" for c in _ops(mod, "relax.nn.conv2d"))
    assert report.fallbacks == []
    built, got, want = _compiled(model, rng)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert built.report.layout_transforms == 2


def test_a_conv_whose_padded_channels_only_an_uncovered_op_would_read_keeps_its_own(rng):
    """58 channels transposed to NHWC (a detection head's boxes): padded, they would only be gathered back
    for the transpose, so the conv keeps its 58 channels and no gather is added."""
    g = GraphBuilder(rng)
    y = g.op("Transpose", [g.conv_bn("data", "head", 16, 58, act=None)], "nhwc", perm=[0, 2, 3, 1])
    model = g.model("head", {"data": (1, 16, 8, 8)}, [y])
    mod, _ = block_channels(prepare_graph(import_onnx(model).mod), resolve_target("native"))
    assert not _ops(mod, "relax.take")
    assert [int(c.ty.shape.values[1]) for c in _ops(mod, "relax.nn.conv2d")] == [58]
    _, got, want = _compiled(model, rng)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_such_a_conv_on_a_map_of_no_whole_vector_is_padded_all_the_same(rng):
    """The same head on a 5x5 map (SSDlite's 546-class heads on 10x10 to 1x1): in NCHW its 25 pixels would
    be its vector axis, scalar; padded to 64 channels it runs blocked, one gather back to 58 after it."""
    g = GraphBuilder(rng)
    y = g.op("Transpose", [g.conv_bn("data", "head", 16, 58, act=None)], "nhwc", perm=[0, 2, 3, 1])
    model = g.model("head", {"data": (1, 16, 5, 5)}, [y])
    mod, _ = block_channels(prepare_graph(import_onnx(model).mod), resolve_target("native"))
    assert len(_ops(mod, "relax.take")) == 1
    assert [c.attrs.data_layout for c in _ops(mod, "relax.nn.conv2d")] != ["NCHW"]
    built, got, want = _compiled(model, rng)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert "conv2d_nchw_pointwise" not in built.report.schedules.applied.values()


def _classifier(channels: int, size: int = 6):
    g = GraphBuilder(np.random.default_rng(0))
    y = g.op("GlobalAveragePool", [g.conv_bn("data", "classifier", 16, channels, k=1)], "pool")
    return g.model("classifier", {"data": (1, 16, size, size)}, [g.op("Flatten", [y], "flatten")])


def _conv_channels(mod) -> list[int]:
    return [int(c.ty.shape.values[1]) * int(c.ty.shape.values[4]) for c in _ops(mod, "relax.nn.conv2d")]


def _check_classifier_padding(target: str, channels: int, padded: int) -> None:
    """The classifier conv computes `padded` channels for `target`, and the native build matches onnxruntime
    with no layout transform beyond the input and the output."""
    model = _classifier(channels)
    mod, _ = block_channels(prepare_graph(import_onnx(model).mod), resolve_target(target))
    assert _conv_channels(mod) == [padded]
    built, got, want = _compiled(model, np.random.default_rng(1))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert built.report.layout_transforms == 2


@pytest.mark.parametrize("target, channels, padded", [("cascadelake", 200, 208), ("avx2", 176, 176)])
def test_channels_with_only_a_half_vector_block_are_padded_to_whole_vectors_where_that_is_cheap(
        target, channels, padded):
    """200 channels have an 8-lane block: on AVX-512 they are padded to 208 (4% more) so that the conv runs on
    16-lane vectors (SqueezeNet's 1000-class conv: 1008); on AVX2, 8 lanes are the whole vector. The gather
    back to 200 after the global pooling, on one pixel, does not undo the padding."""
    _check_classifier_padding(target, channels, padded)


@pytest.mark.parametrize("target, channels, padded", [
    ("avx2", 200, 208),          # 25 blocks of 8 -> 26: tiles of 2 or 3 blocks
    ("avx2", 1000, 1008),        # SqueezeNet's classes: 125 -> 126
    ("cascadelake", 176, 192),   # 11 blocks of 16 -> 12
    ("avx2", 40, 40),            # 5 blocks: a sixth would add 20%
    ("avx2", 192, 192),          # 24 blocks: tiles of 2, 3 or 4 already
])
def test_block_counts_that_fit_only_one_block_tiles_get_one_more_block(target, channels, padded):
    """An odd block count no 3 divides leaves the conv's register tiles one block wide (an input load per
    FMA); one more zero block, where it adds at most an eighth, lets them hold several."""
    _check_classifier_padding(target, channels, padded)


def test_a_conv_padded_only_for_its_tiles_keeps_its_channels_where_that_would_cost_a_gather():
    """200 channels concatenated with 64 others: the padded 208 would have to be gathered back to 200 before
    the concat, so the conv keeps its 200 (ShuffleNet's 232-channel branches)."""
    g = GraphBuilder(np.random.default_rng(0))
    joined = g.op("Concat", [g.conv_bn("data", "wide", 16, 200, k=1), g.conv_bn("data", "side", 16, 64, k=1)],
                  "cat", axis=1)
    model = g.model("concat", {"data": (1, 16, 6, 6)}, [g.conv_bn(joined, "next", 264, 16, k=1)])
    mod, _ = block_channels(prepare_graph(import_onnx(model).mod), resolve_target("avx2"))
    assert not _ops(mod, "relax.take")
    assert sorted(_conv_channels(mod)) == [16, 64, 200]


def _regnet_block(rng, channels: int = 200, group_width: int = 8):
    """A RegNetY block on 200 channels (25 blocks of 8 on AVX2): 1x1 conv, grouped 3x3 conv (8 channels a
    group), squeeze-excite, 1x1 conv, and a residual add with a strided shortcut conv; then a conv reading
    the block's output."""
    g = GraphBuilder(rng)
    a = g.conv_bn("data", "a", 16, channels, k=1)
    b = g.conv_bn(a, "b", channels, channels, k=3, stride=2, groups=channels // group_width)
    pooled = g.op("GlobalAveragePool", [b], "se.pool")
    squeezed = g.op("Relu", [g.conv(pooled, "se.reduce", channels, 8, k=1, bias=True)], "se.relu")
    gate = g.op("Sigmoid", [g.conv(squeezed, "se.expand", 8, channels, k=1, bias=True)], "se.gate")
    c = g.conv_bn(g.op("Mul", [b, gate], "se.scale"), "c", channels, channels, k=1, act=None)
    shortcut = g.conv_bn("data", "shortcut", 16, channels, k=1, stride=2, act=None)
    y = g.op("Relu", [g.op("Add", [c, shortcut], "add")], "out")
    return g.model("regnet_block", {"data": (1, 16, 12, 12)}, [g.conv_bn(y, "next", channels, 16, k=1)])


def test_a_regnet_block_padded_for_its_tiles_stays_padded_through_groups_gates_and_residual_adds(rng):
    """Every 200-channel conv computes 208: the grouped conv gets a 26th group of zero weights, the
    squeeze-excite gate (one pixel, unpadded) is gathered to the padded channels, and the residual add adds
    the two padded convs; nothing is gathered back between them."""
    model = _regnet_block(rng)
    mod, _ = block_channels(prepare_graph(import_onnx(model).mod), resolve_target("avx2"))
    assert sorted(_conv_channels(mod)) == [8, 16, 200, 208, 208, 208, 208]  # the gate's conv: one pixel
    assert [int(c.attrs.groups) for c in _ops(mod, "relax.nn.conv2d") if int(c.attrs.groups) > 1] == [26]
    assert all(static_shape_of(t)[2:] == [1, 1] for t in _ops(mod, "relax.take"))  # at most the gate's
    built, got, want = _compiled(model, rng)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert built.report.layout_transforms == 2


@pytest.mark.parametrize("channels, group_width", [(200, 8), (176, 16), (176, 8)])
def test_regnet_blocks_stay_blocked_on_avx512(channels, group_width):
    """On 16 lanes: 8-channel groups in 16-lane blocks have no blocked kernel, so a grouped conv is padded
    only by whole blocks of groups; a squeeze-excite gate is gathered only between whole blocks."""
    model = _regnet_block(np.random.default_rng(0), channels, group_width)
    mod, report = block_channels(prepare_graph(import_onnx(model).mod), resolve_target("cascadelake"))
    assert report.fallbacks == []
    assert len(_ops(mod, "relax.layout_transform")) == 2


def test_an_int8_regnet_block_padded_for_its_tiles_matches_onnxruntime(rng):
    _int8_matches_fp32(_regnet_block(rng), rng)


def static_shape_of(expr) -> list[int]:
    return [int(d) for d in expr.ty.shape.values]


def test_the_search_for_padded_sources_visits_each_value_once():
    """A chain of residual adds reaches every earlier value along 2^depth paths; the walk back from a gather
    to the padded convs it reads must read each value once (a transformer's simulated int8 graph never
    finished otherwise)."""
    from targets.channel_padding import padded_sources

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = x
            for _ in range(16):  # 2^16 paths
                y = bb.emit(relax.op.add(y, bb.emit(relax.op.nn.relu(y))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    values = relax.analysis.get_var2val(bb.get()["main"])

    class Counting(dict):
        reads = 0

        def get(self, key, default=None):
            Counting.reads += 1
            return super().get(key, default)

    found = padded_sources(y, Counting(values), padded_outputs={})
    assert found == [] and Counting.reads <= len(values) + 1


def _deep_narrow_conv(rng, reader: str = "conv", cin: int = 96):
    """A 3x3 conv from `cin` to 24 channels (an 8-lane block on AVX-512; 96 x 9 = 864 inputs an output, a DB
    text detector's neck), read by a 1x1 conv, or concatenated with another 24-channel conv first."""
    g = GraphBuilder(rng)
    deep = g.conv_bn("data", "deep", cin, 24, k=3)
    if reader == "concat":
        deep = g.op("Concat", [deep, g.conv_bn("data", "side", cin, 24, k=1)], "cat", axis=1)
    channels = 48 if reader == "concat" else 24
    return g.model("deep_narrow", {"data": (1, cin, 10, 10)}, [g.conv_bn(deep, "reader", channels, 16, k=1)])


@pytest.mark.parametrize("target, cin, channels", [
    ("cascadelake", 96, [32, 16]),          # full-rate AVX-512: 24 -> 32, read by the next conv as they are
    ("llvm -mcpu=znver4", 96, [24, 16]),    # 512-bit vectors as two halves: a full vector gains nothing
    ("avx2", 96, [24, 16]),                 # 8 lanes are the whole vector
    ("cascadelake", 32, [24, 16]),          # 32 x 9 = 288 inputs an output: bound by memory, not the FMAs
])
def test_a_deep_conv_on_a_half_vector_block_computes_whole_vectors_where_they_run_at_full_rate(
        target, cin, channels):
    """On AVX-512 a 24-channel conv runs on 8-lane vectors, half the work an instruction of 16 lanes; padded to
    32 channels it does 4/3 the multiply-adds at twice the rate (PP-OCRv4's text detector 4% faster, fp32
    and int8). Its reader takes the padded channels with zero weights: nothing is gathered."""
    model = _deep_narrow_conv(np.random.default_rng(0), cin=cin)
    mod, report = block_channels(prepare_graph(import_onnx(model).mod), resolve_target(target))
    assert _conv_channels(mod) == channels
    assert not _ops(mod, "relax.take")
    assert report.fallbacks == []


def test_a_deep_conv_whose_padding_a_concat_would_gather_back_keeps_its_channels():
    """Concatenated with another 24-channel tensor, the padded 32 would be gathered back to 24 (a concat of
    8- and 16-lane blocks has no blocked form): a pass over the map that cost what the conv gained."""
    model = _deep_narrow_conv(np.random.default_rng(0), reader="concat")
    mod, report = block_channels(prepare_graph(import_onnx(model).mod), resolve_target("cascadelake"))
    assert sorted(_conv_channels(mod)) == [16, 24, 24]
    assert not _ops(mod, "relax.take")
    assert report.fallbacks == []


@pytest.mark.parametrize("reader", ["conv", "concat"])
def test_deep_narrow_convs_match_onnxruntime(rng, reader):
    """fp32 against onnxruntime and int8 against its fp32, on this host (widened where it runs 512-bit
    vectors at full rate)."""
    model = _deep_narrow_conv(rng, reader)
    built, got, want = _compiled(model, rng)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert built.report.layout_transforms == 2
    _int8_matches_fp32(model, rng)
