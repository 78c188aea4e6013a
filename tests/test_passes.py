"""relay_passes: the Relax graph before and after preparation."""

import numpy as np

from compiler.frontend import import_onnx
from relay_passes import prepare_graph
from tests.fixtures import MODELS


def _ops(mod):
    from tvm import relax

    seen = []

    def visit(expr):
        if isinstance(expr, relax.Call) and hasattr(expr.op, "name"):
            seen.append(expr.op.name)

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return seen


def test_prepare_graph_removes_batchnorm_and_unused_values(rng):
    mod = import_onnx(MODELS["resnet_bottleneck"](rng)).mod
    before, after = _ops(mod), _ops(prepare_graph(mod))
    assert before.count("relax.nn.batch_norm") == 7
    assert "relax.nn.batch_norm" not in after
    assert after.count("relax.nn.conv2d") == before.count("relax.nn.conv2d") == 7
    # BN's unused running-stat outputs are gone: no tuple projections remain
    assert "relax.TupleGetItem" not in prepare_graph(mod).script()


def test_prepare_graph_folds_constant_subgraphs():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    a = numpy_helper.from_array(np.full((4,), 2.0, np.float32), "a")
    b = numpy_helper.from_array(np.full((4,), 3.0, np.float32), "b")
    nodes = [helper.make_node("Mul", ["a", "b"], ["ab"], name="const_mul"),
             helper.make_node("Add", ["x", "ab"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [a, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    assert _ops(prepare_graph(import_onnx(model).mod)) == ["relax.add"]


def _conv_bn_model(rng, conv_bias=True, second_consumer=False, spatial_scale=False):
    from tests.fixtures import GraphBuilder

    g = GraphBuilder(rng)
    y = g.conv("data", "conv", 3, 8, bias=conv_bias)
    out = [g.bn(y, "bn", 8)]
    if second_consumer:
        out.append(g.op("Relu", [y], "other_consumer"))
    if spatial_scale:  # varies over H and W: not a per-channel scale
        out = [g.op("Mul", [out[0], g.const("s", rng.uniform(1, 2, (1, 8, 6, 6)).astype(np.float32))], "scale")]
    return g.model("conv_bn", {"data": (1, 3, 6, 6)}, out)


def _check_against_onnxruntime(model, rng):
    import compiler
    from tests.fixtures import onnxruntime_outputs, random_inputs

    feeds = random_inputs(model, rng)
    got = compiler.compile(model, target="native").run(**feeds)
    for g, want in zip(got, onnxruntime_outputs(model, feeds)):
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4)


def test_batchnorm_folds_into_conv_with_and_without_bias(rng):
    for bias in (True, False):
        model = _conv_bn_model(rng, conv_bias=bias)
        ops = _ops(prepare_graph(import_onnx(model).mod))
        assert ops == ["relax.nn.conv2d", "relax.add"], ops
        _check_against_onnxruntime(model, rng)


def test_batchnorm_does_not_fold_through_a_conv_output_that_another_op_reads(rng):
    model = _conv_bn_model(rng, second_consumer=True)
    ops = _ops(prepare_graph(import_onnx(model).mod))
    assert ops.count("relax.nn.conv2d") == 1 and "relax.multiply" in ops
    _check_against_onnxruntime(model, rng)


def test_a_scale_that_is_not_per_channel_is_not_folded(rng):
    model = _conv_bn_model(rng, spatial_scale=True)
    ops = _ops(prepare_graph(import_onnx(model).mod))
    assert ops[-1] == "relax.multiply"
    _check_against_onnxruntime(model, rng)


def test_batchnorm_after_a_fully_connected_layer_folds(rng):
    from tests.fixtures import GraphBuilder

    g = GraphBuilder(rng)
    y = g.op("Flatten", [g.gemm("data", "fc", 16, 12)], "flat")
    y = g.op("Reshape", [y, g.const("shape", np.array([4, 12, 1, 1]))], "to_nchw")
    y = g.bn(y, "bn", 12)
    model = g.model("fc_bn", {"data": (4, 16)}, [y])
    mod = prepare_graph(import_onnx(model).mod)
    _check_against_onnxruntime(model, rng)
    # through a reshape the channel axis moves: nothing may fold there
    assert "relax.matmul" in _ops(mod)
    g = GraphBuilder(rng)
    w = g.const("w", rng.normal(0, 0.3, (16, 12)).astype(np.float32))
    y = g.op("MatMul", ["data", w], "fc")
    y = g.op("Mul", [y, g.const("gamma", rng.uniform(0.5, 2, 12).astype(np.float32))], "scale")
    y = g.op("Add", [y, g.const("beta", rng.normal(0, 1, 12).astype(np.float32))], "shift")
    model = g.model("fc_scale", {"data": (4, 16)}, [y])
    assert _ops(prepare_graph(import_onnx(model).mod)) == ["relax.matmul", "relax.add"]
    _check_against_onnxruntime(model, rng)


def test_gelu_written_as_math_becomes_one_op_only_with_the_right_constants(rng):
    from onnx import numpy_helper

    from tests.fixtures import conv_act

    for form, op in (("erf", "relax.nn.gelu"), ("tanh", "relax.nn.gelu_tanh")):
        model = conv_act(rng, f"gelu_{form}_math")
        assert _ops(prepare_graph(import_onnx(model).mod))[-1] == op
        half = next(t for t in model.graph.initializer if t.name == "act.const.half")
        half.CopyFrom(numpy_helper.from_array(np.float32(0.6), half.name))  # no longer GELU
        ops = _ops(prepare_graph(import_onnx(model).mod))
        assert op not in ops and ("relax.tanh" in ops or "relax.erf" in ops)
        _check_against_onnxruntime(model, rng)


def test_quantize_moves_above_max_pooling_reshape_and_concat(rng):
    import tvm
    from tvm import relax

    import compiler
    from tests.fixtures import GraphBuilder, onnxruntime_outputs

    g = GraphBuilder(rng)
    a = g.op("MaxPool", [g.conv_bn("data", "a", 4, 8)], "pool", kernel_shape=[2, 2], strides=[2, 2])
    b = g.op("MaxPool", [g.conv_bn("data", "b", 4, 8)], "pool_b", kernel_shape=[2, 2], strides=[2, 2])
    y = g.conv_bn(g.op("Concat", [a, b], "cat", axis=1), "c", 16, 8, k=1)
    model = g.model("pool_concat", {"data": (1, 4, 8, 8)}, [y])
    calib = [rng.standard_normal((1, 4, 8, 8)).astype(np.float32) for _ in range(4)]
    built = compiler.compile(model, target="native", calib=calib, calib_mode="naive")
    unfused = dict(built.report.unfused_ops)
    # only the input's quantize, and its padding for the two 4-channel stem convs (128: the u8 form of s8 zero)
    assert unfused == {"concat": 1, "max_pool2d": 2, "quantize": 1, "pad": 1}

    from relay_passes.quantize import find_quantizable, plan_op, quantize_graph

    mod = prepare_graph(import_onnx(model).mod)
    ops = find_quantizable(mod, model)
    for op in ops:
        op.plan = plan_op(op, -3.0, 3.0) if op.name == "a.conv" or op.name == "b.conv" else plan_op(op, 0.0, 4.0)
    dtypes = {}

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            dtypes.setdefault(expr.op.name, set()).add(str(expr.ty.dtype) if hasattr(expr.ty, "dtype") else "")

    relax.analysis.post_order_visit(quantize_graph(mod, ops)["main"].body, visit)
    assert dtypes["relax.nn.max_pool2d"] == {"uint8"} and dtypes["relax.concat"] == {"uint8"}
    feeds = {"data": calib[0]}
    got, want = built.run(**feeds)[0], onnxruntime_outputs(model, feeds)[0]
    assert float(got.ravel() @ want.ravel() / (np.linalg.norm(got) * np.linalg.norm(want))) > 0.99
