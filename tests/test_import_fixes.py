"""The importer fixes (compiler/importer_fixes.py): each on the form real exporters write, against onnxruntime."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import compiler
from tests.fixtures import assert_matches_fp32, onnxruntime_outputs


def _model(nodes, inputs: dict, initializers, opset: int):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
                                           for n, s in inputs.items()],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _matches_onnxruntime(model, feeds: dict):
    got = compiler.compile(model, target="native")(**feeds)[0]
    assert_matches_fp32(got, onnxruntime_outputs(model, feeds)[0])


def test_constant_of_shape_with_an_empty_shape_is_a_scalar(rng):
    """transformers 5 exports write ConstantOfShape(shape=[]) for a scalar; TVM's converter tried to broadcast
    the one-element value to rank 0 and failed."""
    value = numpy_helper.from_array(np.array([2.5], np.float32))
    nodes = [helper.make_node("ConstantOfShape", ["empty"], ["scalar"], name="scalar", value=value),
             helper.make_node("ConstantOfShape", ["shape"], ["ones"], name="ones"),  # the default value: 0.0
             helper.make_node("Mul", ["x", "scalar"], ["scaled"], name="scale"),
             helper.make_node("Add", ["scaled", "ones"], ["y"], name="add")]
    inits = [numpy_helper.from_array(np.zeros(0, np.int64), "empty"),
             numpy_helper.from_array(np.array([2, 3], np.int64), "shape")]
    _matches_onnxruntime(_model(nodes, {"x": [2, 3]}, inits, 17),
                         {"x": rng.standard_normal((2, 3)).astype(np.float32)})


def _resize_then_conv(rng, opset: int, resize_inputs: list[str], initializers: list, mode: str = "nearest"):
    """Resize 16 channels 4x4 -> 8x8, then a conv that needs the 16 channels (as in a detector's neck)."""
    weight = numpy_helper.from_array(rng.standard_normal((8, 16, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Resize", ["x", *resize_inputs], ["up"], name="up", mode=mode),
             helper.make_node("Conv", ["up", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    return _model(nodes, {"x": [1, 16, 4, 4]}, [weight, *initializers], opset)


def _floats(name, values):
    return numpy_helper.from_array(np.array(values, np.float32), name)


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_with_sizes_beside_empty_scales(rng, opset, mode):
    """Opsets 11-12 require the scales input even with sizes: exporters pass an empty tensor."""
    sizes = numpy_helper.from_array(np.array([1, 16, 8, 8], np.int64), "sizes")
    model = _resize_then_conv(rng, opset, ["roi", "scales", "sizes"],
                              [_floats("roi", []), _floats("scales", []), sizes], mode)
    _matches_onnxruntime(model, {"x": rng.standard_normal((1, 16, 4, 4)).astype(np.float32)})


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_of_opset_10_takes_scales_as_its_second_input(rng, mode):
    model = _resize_then_conv(rng, 10, ["scales"], [_floats("scales", [1, 1, 2, 2])], mode)
    _matches_onnxruntime(model, {"x": rng.standard_normal((1, 16, 4, 4)).astype(np.float32)})


def test_every_imported_binding_knows_its_onnx_node(rng):
    """The importer keeps no node names: quantvm traces each binding of the imported main back to its node,
    the several ops of one node (Gemm: transpose, matmul, add) included."""
    from compiler.diagnose import OnnxNode
    from compiler.frontend import import_onnx

    inits = [_floats("w", rng.standard_normal((5, 4))), _floats("b", rng.standard_normal(5))]
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["fc"], name="fc", transB=1, alpha=0.5),
             helper.make_node("Relu", ["fc"], ["act"], name="act"),
             helper.make_node("Softmax", ["act"], ["y"], name="probs")]
    imported = import_onnx(_model(nodes, {"x": [3, 4]}, inits, 13))
    bindings = [b for block in imported.mod["main"].body.blocks for b in block.bindings]
    named = [imported.origins[b.var] for b in bindings]
    assert named[-2:] == [OnnxNode("act", "Relu", 13), OnnxNode("probs", "Softmax", 13)]
    assert len(named) > 3 and set(named[:-2]) == {OnnxNode("fc", "Gemm", 13)}


def _yolo_like(rng, opset: int, resize_by_sizes: bool):
    """A YOLOv8-style neck in small: conv + SiLU written x*sigmoid(x), a C2f split (an input from opset 13,
    an attribute before), an SPPF MaxPool chain, nearest upsampling and the concats joining them."""
    def weight(name, cout, cin, k):
        return numpy_helper.from_array(rng.normal(0, (2 / (cin * k * k)) ** 0.5, (cout, cin, k, k))
                                       .astype(np.float32), name)

    inits = [weight("w_stem", 16, 3, 3), weight("w_mid", 8, 8, 3), weight("w_out", 16, 24, 1)]
    nodes = [helper.make_node("Conv", ["x", "w_stem"], ["stem"], name="stem", pads=[1] * 4, strides=[2, 2]),
             helper.make_node("Sigmoid", ["stem"], ["stem_gate"], name="stem_gate"),
             helper.make_node("Mul", ["stem", "stem_gate"], ["silu"], name="silu")]
    if opset >= 13:
        inits.append(numpy_helper.from_array(np.array([8, 8], np.int64), "halves"))
        nodes.append(helper.make_node("Split", ["silu", "halves"], ["a", "b"], name="c2f_split", axis=1))
    else:
        nodes.append(helper.make_node("Split", ["silu"], ["a", "b"], name="c2f_split", axis=1, split=[8, 8]))
    nodes += [helper.make_node("Conv", ["b", "w_mid"], ["m"], name="c2f_mid", pads=[1] * 4),
              helper.make_node("Concat", ["a", "b", "m"], ["c2f"], name="c2f_cat", axis=1),
              helper.make_node("Conv", ["c2f", "w_out"], ["p"], name="c2f_out"),
              *[helper.make_node("MaxPool", [src], [dst], name=dst, kernel_shape=[5, 5], pads=[2] * 4)
                for src, dst in (("p", "pool1"), ("pool1", "pool2"))],
              helper.make_node("Concat", ["p", "pool1", "pool2"], ["sppf"], name="sppf_cat", axis=1)]
    inits.append(_floats("roi", []))
    if resize_by_sizes:
        inits += [_floats("scales", []), numpy_helper.from_array(np.array([1, 48, 16, 16], np.int64), "sizes")]
        resize_inputs = ["sppf", "roi", "scales", "sizes"]
    else:
        inits.append(_floats("scales", [1, 1, 2, 2]))
        resize_inputs = ["sppf", "roi", "scales"]
    nodes += [helper.make_node("Resize", resize_inputs, ["up"], name="up", mode="nearest",
                               coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
              helper.make_node("MaxPool", ["up"], ["down"], name="down", kernel_shape=[2, 2], strides=[2, 2]),
              helper.make_node("Concat", ["down", "stem"], ["y"], name="join", axis=1)]
    return _model(nodes, {"x": [1, 3, 16, 16]}, inits, opset)


@pytest.mark.parametrize("opset, resize_by_sizes", [(11, True), (12, False), (13, True), (17, False)])
def test_a_yolo_style_neck_matches_onnxruntime(rng, opset, resize_by_sizes):
    _matches_onnxruntime(_yolo_like(rng, opset, resize_by_sizes),
                         {"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)})
