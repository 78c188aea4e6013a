"""Bilinear resize of NCHW tensors as two passes over compile-time tables (targets/resize.py), checked
against onnxruntime for each coordinate mode, up and down, at integer and fractional scales."""

import numpy as np
import pytest
from onnx import helper

import compiler
from targets.resize import source_table
from tests.fixtures import GraphBuilder, onnxruntime_outputs, random_inputs

# (input height, width) -> (output height, width): a segmentation head's x8, fractional, and downsampling
SIZES = [((9, 13), (72, 104)), ((7, 10), (13, 17)), ((20, 24), (7, 9))]
MODES = ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"]


def _resize_model(rng, in_size, out_size, mode, channels=21, after_conv=False):
    g = GraphBuilder(rng)
    x = g.conv("x", "conv", channels, channels, k=1, bias=True) if after_conv else "x"
    sizes = g.const("sizes", np.array([1, channels, *out_size], np.int64))
    g.nodes.append(helper.make_node("Resize", [x, "", "", sizes], ["y"], name="resize", mode="linear",
                                    coordinate_transformation_mode=mode))
    return g.model("resize", {"x": (1, channels, *in_size)}, ["y"])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("in_size,out_size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_bilinear_resize_runs_as_table_passes_and_matches_onnxruntime(rng, mode, in_size, out_size):
    model = _resize_model(rng, in_size, out_size, mode)
    feeds = random_inputs(model, rng)
    built = compiler.compile(model, target="native")
    assert "resize_linear" in built.report.schedules.applied.values(), built.report.schedules.applied
    want = onnxruntime_outputs(model, feeds)[0]
    np.testing.assert_allclose(built.run(**feeds)[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_a_blocked_resize_keeps_its_blocked_kernel_and_matches_onnxruntime(rng):
    """A resize of an NCHW{c} tensor (after a blocked conv) stays TOPI's, in the blocked layout."""
    model = _resize_model(rng, (9, 13), (18, 26), "half_pixel", channels=16, after_conv=True)
    feeds = random_inputs(model, rng)
    built = compiler.compile(model, target="native")
    assert "resize_linear" not in built.report.schedules.applied.values()
    want = onnxruntime_outputs(model, feeds)[0]
    np.testing.assert_allclose(built.run(**feeds)[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_source_table_clamps_at_the_edges_and_weights_the_second_source():
    first, second, weight = source_table(4, 8, "half_pixel")  # x2: positions -0.25, 0.25, 0.75, ...
    np.testing.assert_array_equal(first[:3], [0, 0, 0])
    np.testing.assert_array_equal(second[:3], [0, 1, 1])
    np.testing.assert_allclose(weight[:3], [0.75, 0.25, 0.75])
    assert first[-1] == second[-1] == 3  # the last output reads the last input twice
