"""Channel blocks: which layout each conv gets on each vector width, and that the graphs still compute
what onnxruntime does."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

import compiler
import onnx
from compiler.frontend import import_onnx
from relay_passes import prepare_graph
from targets import block_channels, resolve_target
from targets.layout_rules import override_layout_rules
from tests.fixtures import GraphBuilder, onnxruntime_outputs, random_inputs


def _conv_layouts(mod) -> list[tuple[str, str, str]]:
    found = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.nn.conv2d":
            found.append((expr.attrs.data_layout, expr.attrs.kernel_layout, expr.attrs.out_layout))

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return found


def _count_ops(mod, name: str) -> int:
    calls = []
    relax.analysis.post_order_visit(
        mod["main"].body,
        lambda e: calls.append(e) if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == name else None)
    return len(calls)


def _op_names(mod) -> set[str]:
    names = set()
    relax.analysis.post_order_visit(
        mod["main"].body,
        lambda e: names.add(e.op.name) if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) else None)
    return names


def _blocked(model, target):
    return block_channels(prepare_graph(import_onnx(model).mod), resolve_target(target))[0]


def _stem(rng):
    g = GraphBuilder(rng)
    y = g.conv_bn("data", "stem", 3, 32, k=7, stride=2)
    return g.model("stem", {"data": (1, 3, 32, 32)}, [g.conv_bn(y, "next", 32, 32)])


@pytest.mark.parametrize("target, lanes", [("avx2", 8), ("cascadelake", 16)])
def test_fp32_stem_conv_reads_its_three_channels_unpadded(rng, target, lanes):
    mod = _blocked(_stem(rng), target)
    assert _conv_layouts(mod) == [("NCHW3c", f"OIHW3i{lanes}o", f"NCHW{lanes}c"),
                                  (f"NCHW{lanes}c", f"OIHW{lanes}i{lanes}o", f"NCHW{lanes}c")]
    assert "relax.nn.pad" not in _op_names(mod)


def test_fp32_stem_conv_matches_onnxruntime(rng):
    model = _stem(rng)
    feeds = random_inputs(model, rng)
    got = compiler.compile(model, target="native").run(**feeds)[0]
    np.testing.assert_allclose(got, onnxruntime_outputs(model, feeds)[0], rtol=1e-4, atol=1e-4)


def _int8_conv(in_channels, out_channels):
    """A u8 x s8 conv as the int8 rewrite leaves one."""
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    data = relax.Var("data", relax.TensorType((1, in_channels, 16, 16), "uint8"))
    weight = relax.const(rng.integers(-128, 128, (out_channels, in_channels, 3, 3)).astype("int8"))
    with bb.function("main", [data]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.conv2d(data, weight, padding=1, out_dtype="int32"))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("target, lanes", [("avx2", 8), ("cascadelake", 16)])
def test_int8_stem_conv_reads_channels_padded_to_the_dot_group_of_four(target, lanes):
    mod, _ = block_channels(_int8_conv(3, 32), resolve_target(target))
    assert _conv_layouts(mod) == [("NCHW4c", f"OIHW{lanes}o4i", f"NCHW{lanes}c")]
    assert "relax.nn.pad" in _op_names(mod)


def test_avx512_blocks_channel_counts_that_are_not_a_multiple_of_16_by_8(rng):
    g = GraphBuilder(rng)
    y = g.conv_bn(g.conv_bn("data", "a", 16, 24), "b", 24, 32)
    mod = _blocked(g.model("widths", {"data": (1, 16, 8, 8)}, [y]), "cascadelake")
    assert _conv_layouts(mod) == [("NCHW16c", "OIHW16i8o", "NCHW8c"), ("NCHW8c", "OIHW8i16o", "NCHW16c")]
    assert "relax.layout_transform" in _op_names(mod)  # at the graph's edges only


def _concat_of_narrow_branches(rng):
    """Two 8-channel branches concatenated into the 16 channels a conv reads: blocks of 8 and 16 meet."""
    g = GraphBuilder(rng)
    a, b = g.conv_bn("data", "a", 16, 8), g.conv_bn("data", "b", 16, 8)
    y = g.conv_bn(g.op("Concat", [a, b], "cat", axis=1), "c", 16, 16, k=1)
    return g.model("concat", {"data": (1, 16, 8, 8)}, [y])


def test_a_conv_reads_the_narrower_block_a_concat_leaves(rng):
    """Two 8-block branches concatenated into 16 channels: the conv reads NCHW8c as it is (no transform
    between two block sizes, which TVM cannot do) and writes its own 16-block output."""
    mod = _blocked(_concat_of_narrow_branches(rng), "cascadelake")
    assert _conv_layouts(mod)[-1] == ("NCHW8c", "OIHW8i16o", "NCHW16c")
    assert _count_ops(mod, "relax.layout_transform") == 2  # the input and the output


def test_concat_of_narrow_branches_matches_onnxruntime(rng):
    model = _concat_of_narrow_branches(rng)
    feeds = random_inputs(model, rng)
    got = compiler.compile(model, target="native").run(**feeds)[0]
    np.testing.assert_allclose(got, onnxruntime_outputs(model, feeds)[0], rtol=1e-4, atol=1e-4)


def test_fp32_fc_wider_than_no_full_vector_is_vectorized_by_half_vectors(rng):
    """ResNet's 1000 classes on AVX-512: 1000 is no multiple of 16, but of 8."""
    g = GraphBuilder(rng)
    model = g.model("fc", {"data": (2, 64)}, [g.gemm("data", "fc", 64, 1000)])
    built = compiler.compile(model, target="cascadelake")
    assert set(built.report.schedules.applied.values()) == {"matmul"}


# Layouts through the whole CNN: each graph below runs blocked from its first conv to its last; the only
# layout transforms are the input's and the output's (plus those around an op with no blocked kernel).

def _hard_swish(g: GraphBuilder, x: str, name: str) -> str:
    """HardSwish as exporters write it: x * clip(x + 3, 0, 6) / 6."""
    three, zero, six = (g.const(f"{name}.{v}", np.float32(v)) for v in (3, 0, 6))
    clipped = g.op("Clip", [g.op("Add", [x, three], f"{name}.add"), zero, six], f"{name}.clip")
    return g.op("Div", [g.op("Mul", [x, clipped], f"{name}.mul"), six], f"{name}.div")


def _squeeze_excite(rng):
    """Conv, squeeze-excite (global pool, 1x1 convs, HardSigmoid gate, channel multiply), decomposed
    HardSwish, SiLU (x * sigmoid(x)) and a per-channel scale and shift (a standalone BatchNorm)."""
    g = GraphBuilder(rng)
    x = g.conv_bn("data", "stem", 16, 32)
    pooled = g.op("GlobalAveragePool", [x], "se.pool")
    gate = g.op("Relu", [g.conv(pooled, "se.reduce", 32, 16, k=1, bias=True)], "se.relu")
    gate = g.op("HardSigmoid", [g.conv(gate, "se.expand", 16, 32, k=1, bias=True)], "se.gate", alpha=0.2, beta=0.5)
    y = _hard_swish(g, g.op("Mul", [x, gate], "se.scale"), "hswish")
    y = g.op("Mul", [y, g.op("Sigmoid", [y], "silu.sigmoid")], "silu")
    y = g.bn(y, "standalone_bn", 32)
    return g.model("squeeze_excite", {"data": (1, 16, 8, 8)}, [g.conv_bn(y, "head", 32, 16, k=1, act=None)])


def _resize_split_concat(rng):
    """Split on the channel axis at a block boundary, a strided conv, a linear and a nearest Resize, a
    Concat and a standalone BatchNorm after it."""
    g = GraphBuilder(rng)
    x = g.conv_bn("data", "stem", 16, 32)
    halves = g.const("split.sizes", np.array([16, 16], np.int64))
    g.nodes.append(onnx.helper.make_node("Split", [x, halves], ["left", "right"], name="split", axis=1))
    scales = g.const("up.scales", np.array([1, 1, 2, 2], np.float32))
    left = g.conv_bn("left", "down", 16, 16, stride=2)
    left = g.op("Resize", [left, "", scales], "up_linear", mode="linear")
    right = g.op("Resize", [g.op("MaxPool", ["right"], "pool", kernel_shape=[2, 2], strides=[2, 2]), "", scales],
                 "up_nearest", mode="nearest")
    y = g.op("Relu", [g.bn(g.op("Concat", [left, right], "cat", axis=1), "cat.bn", 32)], "cat.relu")
    return g.model("resize_split_concat", {"data": (1, 16, 8, 8)}, [g.conv_bn(y, "head", 32, 16, k=1, act=None)])


def _conv_transpose(rng):
    """A ConvTranspose (k2 s2, as DB text detectors upsample) between two convs."""
    g = GraphBuilder(rng)
    x = g.conv_bn("data", "stem", 16, 16)
    w = g.const("up.w", rng.normal(0, 0.2, (16, 16, 2, 2)).astype(np.float32))
    y = g.op("ConvTranspose", [x, w], "up", kernel_shape=[2, 2], strides=[2, 2])
    return g.model("conv_transpose", {"data": (1, 16, 8, 8)}, [g.conv_bn(y, "head", 16, 16, act=None)])


def _compiled_and_onnxruntime(model, rng, **options):
    """The compiled model, its output and onnxruntime's on the same random inputs."""
    feeds = random_inputs(model, rng)
    built = compiler.compile(model, target="native", **options)
    return built, built.run(**feeds)[0], onnxruntime_outputs(model, feeds)[0]


@pytest.mark.parametrize("build, edges", [(_squeeze_excite, 2), (_resize_split_concat, 2), (_conv_transpose, 4)])
def test_blocked_layout_flows_through_the_whole_graph(rng, build, edges):
    """Layout transforms only at the input, the output and around an op with no blocked kernel (the
    ConvTranspose's interleave after its sub-pixel conv: into and out of it); fusion may then fold some into
    their neighbours' kernels."""
    model = build(rng)
    mod, report = block_channels(prepare_graph(import_onnx(model).mod), resolve_target("native"))
    assert _count_ops(mod, "relax.layout_transform") == edges
    assert all(data != "NCHW" for data, _, _ in _conv_layouts(mod))
    no_kernel = ["relax.reshape"] if build is _conv_transpose else []
    assert [f.op for f in report.fallbacks] == no_kernel
    built, got, want = _compiled_and_onnxruntime(model, rng)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert built.report.layout_transforms <= edges
    assert built.report.layout == report.to_json()


def test_int8_squeeze_excite_stays_blocked(rng):
    model = _squeeze_excite(rng)
    calib = random_inputs(model, rng)["data"]
    built, got, want = _compiled_and_onnxruntime(model, rng, calib=[calib], bias_correction=None)
    # int8 against fp32 onnxruntime: quantization noise, where a wrong layout scrambles the whole output
    assert np.abs(got - want).mean() <= 0.1 * np.abs(want).mean()
    assert built.report.layout_transforms <= 2
    assert built.report.layout["fallbacks"] == []


def _conv_sigmoid_conv():
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    data = relax.Var("data", relax.TensorType((1, 16, 8, 8), "float32"))
    weight = relax.const(rng.normal(0, 0.1, (16, 16, 3, 3)).astype("float32"))
    with bb.function("main", [data]):
        with bb.dataflow():
            y = bb.emit(relax.op.sigmoid(relax.op.nn.conv2d(data, weight, padding=1)))
            out = bb.emit_output(relax.op.nn.conv2d(y, weight, padding=1))
        bb.emit_func_output(out)
    return bb.get()


def test_an_op_the_layout_conversion_fails_on_alone_stays_nchw_and_is_reported():
    def failing_rule(call, desired_layouts, var_layout_map):
        raise ValueError("no rule for this sigmoid")

    with override_layout_rules({"relax.sigmoid": failing_rule}):
        mod, report = block_channels(_conv_sigmoid_conv(), resolve_target("avx2"))
    assert _conv_layouts(mod) == [("NCHW8c", "OIHW8i8o", "NCHW8c")] * 2
    assert report.block == 8
    assert [(f.at, f.op, f.reason) for f in report.fallbacks] == [("lv1", "relax.sigmoid", "no rule for this sigmoid")]
    assert tvm.ir.Op.get("relax.sigmoid").get_attr("FRelaxInferLayout") is not None  # TVM's rule is back


def _unequal_split(rng):
    """A channel split into unequal parts (it stays NCHW), each part read by a blocked conv: the transforms
    back to the blocked layout read the split's outputs (tuple items), which the post-conversion rewrites
    (targets.channel_gather, targets.channel_norm) must pass over."""
    g = GraphBuilder(rng)
    x = g.conv_bn("data", "stem", 16, 48)
    sizes = g.const("split.sizes", np.array([16, 32], np.int64))
    g.nodes.append(onnx.helper.make_node("Split", [x, sizes], ["small", "large"], name="split", axis=1))
    y = g.op("Concat", [g.conv_bn("small", "a", 16, 16), g.conv_bn("large", "b", 32, 16)], "cat", axis=1)
    return g.model("unequal_split", {"data": (1, 16, 8, 8)}, [g.conv_bn(y, "head", 32, 16, k=1, act=None)])


def test_an_unequal_split_between_blocked_convs_compiles_fp32_and_int8_and_matches_onnxruntime(rng):
    model = _unequal_split(rng)
    _, got, want = _compiled_and_onnxruntime(model, rng)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    feeds = random_inputs(model, rng)
    int8 = compiler.compile(model, target="native", calib=[feeds], bias_correction=None).run(**feeds)[0]
    want = onnxruntime_outputs(model, feeds)[0]
    assert float((int8 * want).sum() / np.linalg.norm(int8) / np.linalg.norm(want)) >= 0.99
