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
