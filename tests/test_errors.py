"""Bad input gets an error that names the file, node or input at fault."""

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import compiler
from tests.fixtures import MODELS


def _relu_model(op_type="Relu", domain="", shape=("batch", 4)):
    node = helper.make_node(op_type, ["x"], ["y"], name="the_node", domain=domain)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))])
    imports = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=imports)


def test_missing_file(tmp_path):
    with pytest.raises(compiler.ModelError, match=f"not found: {tmp_path / 'absent.onnx'}"):
        compiler.compile(tmp_path / "absent.onnx", target="native")


def test_a_file_that_is_not_onnx(tmp_path):
    path = tmp_path / "photo.onnx"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(compiler.ModelError, match=r"photo\.onnx is not an ONNX model"):
        compiler.compile(path, target="native")


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.999])
def test_a_truncated_onnx_file(tmp_path, rng, keep):
    data = MODELS["resnet_bottleneck"](rng).SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(compiler.ModelError, match=r"cut\.onnx"):
        compiler.compile(path, target="native")


def test_a_model_that_fails_the_onnx_checker():
    model = _relu_model()
    model.graph.node[0].input[0] = "undefined_tensor"
    with pytest.raises(compiler.ModelError, match="not a valid ONNX model.*undefined_tensor"):
        compiler.compile(model, target="native", input_shapes={"x": (1, 4)})


@pytest.mark.parametrize("op_type", ["Celu", "NoSuchOp"])
def test_unsupported_op_names_op_type_and_node(op_type):
    model = _relu_model(op_type)
    with pytest.raises(compiler.ModelError, match=rf"<bytes>: node 'the_node' \({op_type}, opset 17\) cannot be "
                                                  rf"compiled: TVM's ONNX importer has no converter for {op_type}$"):
        compiler.compile(model.SerializeToString(), target="native", input_shapes={"x": (1, 4)})


def test_custom_domain_op_is_named():
    with pytest.raises(compiler.ModelError, match=r"node 'the_node' \(com.example.Relu, opset 1\) cannot be compiled: "
                                                  r"quantvm compiles the standard ONNX domain only"):
        compiler.compile(_relu_model(domain="com.example"), target="native", input_shapes={"x": (1, 4)})


def test_dynamic_dimensions_without_shapes_are_named():
    with pytest.raises(compiler.InputError, match=r"'x' \[batch, 4\].*input_shapes"):
        compiler.compile(_relu_model(), target="native")


@pytest.mark.parametrize("shapes, words", [
    ({"y": (1, 4)}, "'y', which .* does not have; its inputs are 'x'"),
    ({"x": (1, 4, 1)}, "rank 3"),
    ({"x": (2, 5)}, "contradicts the model's fixed shape"),
    ({"x": (1, "four")}, "whole numbers"),
    ({"x": (-1, 4)}, "negative"),
])
def test_bad_input_shapes(shapes, words):
    with pytest.raises(compiler.InputError, match=words):
        compiler.compile(_relu_model(), target="native", input_shapes=shapes)


def test_empty_model_bytes():
    with pytest.raises(compiler.ModelError, match="not an ONNX model"):
        compiler.compile(b"", target="native")


def test_model_of_the_wrong_type():
    with pytest.raises(compiler.ModelError, match="got int"):
        compiler.compile(42, target="native")


@pytest.fixture(scope="module")
def relu():
    return compiler.compile(_relu_model(), target="native", input_shapes={"x": (2, 4)})


def test_runs_with_good_input(relu):
    x = np.array([[-1, 0, 1, 2]] * 2, np.float32)
    np.testing.assert_array_equal(relu(x)[0], np.maximum(x, 0))


@pytest.mark.parametrize("args, kwargs, words", [
    ((), {"z": np.zeros((2, 4), np.float32)}, "unknown input 'z'; the model's inputs are x"),
    ((), {}, r"missing input\(s\) 'x'; expected x \[2, 4\] float32"),
    ((), {"x": np.zeros((3, 4), np.float32)}, r"input 'x': shape \[3, 4\] given, \[2, 4\] expected"),
    ((), {"x": np.zeros((2, 4), np.float64)}, "input 'x': dtype float64 given, float32 expected"),
    ((np.zeros((2, 4), np.float32),) * 2, {}, "takes 1 input"),
    ((np.zeros((2, 4), np.float32),), {"x": np.zeros((2, 4), np.float32)}, "both by position and by name"),
])
def test_bad_run_inputs_are_named(relu, args, kwargs, words):
    with pytest.raises(compiler.InputError, match=words):
        relu.run(*args, **kwargs)


def test_constant_inputs_are_checked():
    with pytest.raises(compiler.InputError, match="'nope', which is not an input"):
        compiler.compile(_relu_model(), target="native", input_shapes={"x": (1, 4)},
                         constant_inputs={"nope": np.zeros(1)})


def test_an_importer_failure_names_the_model(tmp_path):
    model = _relu_model(shape=(1, 4))
    model.graph.node[0].op_type = "Reshape"  # a Reshape whose shape input is missing
    path = tmp_path / "bad_reshape.onnx"
    onnx.save(model, path)
    with pytest.raises(compiler.ModelError, match=r"bad_reshape\.onnx.*the_node"):
        compiler.compile(path, target="native")


def test_an_importer_failure_names_the_node_and_op(tmp_path):
    """A Reshape whose shape is a run-time input: TVM's converter fails; the error says which node."""
    node = helper.make_node("Reshape", ["x", "s"], ["y"], name="the_reshape")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
                                            helper.make_tensor_value_info("s", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    path = tmp_path / "runtime_shape.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), path)
    with pytest.raises(compiler.ModelError, match=r"runtime_shape\.onnx: node 'the_reshape' \(Reshape, opset 14\) "
                                                  r"cannot be imported: [^\n]+$"):
        compiler.compile(path, target="native")


def test_a_negative_input_dimension_is_dynamic():
    """paddle2onnx writes a dynamic dimension as dim_value -1: it is not a fixed shape to contradict."""
    model = _relu_model(shape=(1, 4))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    with pytest.raises(compiler.InputError, match=r"'x' \[\?, 4\]"):
        compiler.compile(model, target="native")
    relu = compiler.compile(model, target="native", input_shapes={"x": (3, 4)})
    assert relu.inputs[0].shape == (3, 4)


def test_a_reshape_shape_computed_from_shape_is_folded(rng):
    """Shape -> Slice -> Cast -> Concat -> Reshape (as exporters write a flatten) compiles with static inputs."""
    const = lambda name, v: helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(
        np.array(v, np.int64)))
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), const("zero", [0]), const("one", [1]),
             const("rest", [-1]),
             helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),
             helper.make_node("Cast", ["batch"], ["batch64"], to=TensorProto.INT64),
             helper.make_node("Concat", ["batch64", "rest"], ["new_shape"], axis=0),
             helper.make_node("Reshape", ["x", "new_shape"], ["y"], name="flatten")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6])])
    model = compiler.compile(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]),
                             target="native", input_shapes={"x": (2, 2, 3)})
    x = rng.standard_normal((2, 2, 3)).astype(np.float32)
    np.testing.assert_array_equal(model(x)[0], x.reshape(2, 6))


@pytest.mark.parametrize("stage", ["block_channels", "fuse", "schedule_pass"])
def test_a_tvm_failure_after_import_names_the_model_and_phase(monkeypatch, stage):
    """Passes and builds raise TVM's bare errors: compile() turns them into a ModelError, never lets them out."""
    import tvm

    import relay_passes.pipeline

    def fail(*args, **kwargs):
        raise tvm.error.InternalError("Check failed: something TVM did not expect")

    monkeypatch.setattr(relay_passes.pipeline, stage, fail)
    with pytest.raises(compiler.ModelError, match=r"<onnx.ModelProto>: .* failed: Check failed: something"):
        compiler.compile(_relu_model(), target="native", input_shapes={"x": (1, 4)})


@pytest.mark.parametrize("epsilon", [float("nan"), float("inf"), -1.0])
def test_a_normalization_with_a_bad_epsilon_is_named(rng, epsilon):
    from tests.fixtures import MODELS

    model = MODELS["depthwise_separable"](rng)
    bn = next(n for n in model.graph.node if n.name == "pw1.bn")
    next(a for a in bn.attribute if a.name == "epsilon").f = epsilon
    with pytest.raises(compiler.ModelError, match=r"BatchNormalization node 'pw1.bn' has epsilon=.*finite"):
        compiler.compile(model, target="native")


def test_a_weight_whose_values_do_not_fill_its_dims_is_named(demo_model_path):
    model = onnx.load(demo_model_path)
    weight = next(t for t in model.graph.initializer if t.name == "stem.bn.weight")
    weight.dims[0] = 8  # raw bytes for 16 values, dims asking for 8 (the checker catches too few, not too many)
    with pytest.raises(compiler.ModelError, match=r"initializer 'stem.bn.weight' holds 16 value\(s\), but its dims "
                                                  r"\[8\] need 8"):
        compiler.compile(model, target="native", input_shapes={"image": (1, 1, 8, 8)})


@pytest.mark.parametrize("elem_type", [TensorProto.UNDEFINED, 99])
def test_an_input_without_a_valid_element_type_is_named(elem_type):
    model = _relu_model(shape=(1, 4))
    model.graph.input[0].type.tensor_type.elem_type = elem_type
    with pytest.raises(compiler.ModelError, match=rf"input 'x' has element type {elem_type} \((UNDEFINED|unknown)\)"):
        compiler.compile(model, target="native")


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_a_split_with_one_output_compiles_and_matches_onnxruntime(rng, opset):
    """Found by fuzzing: TVM's importer typed a one-output Split wrongly, and laying out the conv that reads it
    crashed the process."""
    from tests.fixtures import assert_matches_fp32, onnxruntime_outputs

    attrs = {"num_outputs": 1} if opset >= 18 else {}
    weights = [helper.make_tensor(name, TensorProto.FLOAT, [16, 16, 3, 3],
                                  rng.standard_normal(16 * 16 * 9).astype(np.float32)) for name in ("w1", "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Split", ["a"], ["part"], name="whole", axis=0, **attrs),
             helper.make_node("Conv", ["part", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    x = rng.standard_normal((1, 16, 8, 8)).astype(np.float32)
    assert_matches_fp32(compiler.compile(model, target="native")(x)[0], onnxruntime_outputs(model, {"x": x})[0])


def _any_positive_model():
    """Relu, then ReduceMax over booleans (opset 20 allows it): TVM imports it, then fails to lower it."""
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    nodes = [helper.make_node("Relu", ["x"], ["act"], name="act"),
             helper.make_node("Greater", ["act", "zero"], ["positive"], name="positive"),
             helper.make_node("ReduceMax", ["positive"], ["any"], name="any_positive", keepdims=0),
             helper.make_node("Cast", ["any"], ["y"], name="as_float", to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], [zero])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_a_failure_after_import_names_the_onnx_node_op_and_opset():
    with pytest.raises(compiler.ModelError) as caught:
        compiler.compile(_any_positive_model(), target="native")
    message = str(caught.value)
    assert re.fullmatch(r"<onnx.ModelProto>: node 'any_positive' \(ReduceMax, opset 20\) cannot be compiled: "
                        r"[^\n]*bool[^\n]* \(while [^\n]+\)", message), message


def test_the_cli_names_the_node_and_writes_nothing(tmp_path, capsys):
    from compiler.cli import main

    path, output = tmp_path / "any_positive.onnx", tmp_path / "out.so"
    onnx.save(_any_positive_model(), path)
    assert main(["compile", path, "--target", "native", "-o", output]) != 0
    error = capsys.readouterr().err.strip()
    assert re.search(r"any_positive\.onnx: node 'any_positive' \(ReduceMax, opset 20\) cannot be compiled", error)
    assert len(error.splitlines()) == 1, error
    assert list(tmp_path.iterdir()) == [path]

