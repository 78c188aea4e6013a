"""Channel blocks: which layout each conv gets on each vector width, and that the graphs still compute
what onnxruntime does."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

import compiler
from compiler.frontend import import_onnx
from relay_passes import prepare_graph
from targets import block_channels, resolve_target
from tests.fixtures import GraphBuilder, onnxruntime_outputs, random_inputs


def _conv_layouts(mod) -> list[tuple[str, str, str]]:
    found = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.nn.conv2d":
            found.append((expr.attrs.data_layout, expr.attrs.kernel_layout, expr.attrs.out_layout))

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return found


def _op_names(mod) -> set[str]:
    names = set()
    relax.analysis.post_order_visit(
        mod["main"].body,
        lambda e: names.add(e.op.name) if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) else None)
    return names


def _blocked(model, target):
    return block_channels(prepare_graph(import_onnx(model).mod), resolve_target(target))


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
    mod = block_channels(_int8_conv(3, 32), resolve_target(target))
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


def test_blocks_that_meet_in_a_concat_fall_back_to_one_block_for_the_graph(rng):
    mod = _blocked(_concat_of_narrow_branches(rng), "cascadelake")
    assert {layouts[2] for layouts in _conv_layouts(mod)} == {"NCHW8c"}


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
    assert set(built.report["schedules"]["applied"].values()) == {"matmul"}
