"""ONNX LSTM and GRU (compiler/importer_rnn.py, one whole-sequence kernel from targets/recurrent.py) against
onnxruntime, and that kernel's code."""

import re

import numpy as np
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

import compiler
from compiler.errors import ModelError
from targets.registry import resolve_target
from targets.recurrent import GRU_RULE, LSTM_RULE, SequenceShape, gru_sequence, lstm_sequence
from tests.fixtures import onnxruntime_outputs

SEQ, BATCH, INPUT, HIDDEN = 5, 2, 3, 4
_GATES = {"LSTM": 4, "GRU": 3}


def _rnn_model(rng, op: str, outputs: list[str], direction: str = "forward", initial_states: bool = False,
               opset: int = 17, seq: int = SEQ, hidden: int = HIDDEN, **attrs):
    """One RNN node on X [seq, batch, input] with random weights and biases (R scaled by 1/sqrt(hidden), as
    trained recurrences are, so a long sequence does not saturate every gate)."""
    dirs = 2 if direction == "bidirectional" else 1
    gates = _GATES[op] * hidden
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in
             [("W", rng.standard_normal((dirs, gates, INPUT))),
              ("R", rng.standard_normal((dirs, gates, hidden)) / np.sqrt(hidden)),
              ("B", rng.standard_normal((dirs, 2 * gates)))]]
    node_inputs = ["x", "W", "R", "B", ""]
    graph_inputs = {"x": [seq, BATCH, INPUT]}
    if initial_states:
        states = ["h0", "c0"] if op == "LSTM" else ["h0"]
        node_inputs += states
        graph_inputs.update({s: [dirs, BATCH, hidden] for s in states})
    node = helper.make_node(op, node_inputs, outputs, name="rnn", hidden_size=hidden, direction=direction,
                            **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
                                            for n, s in graph_inputs.items()],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs if o],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), graph_inputs


def _matches_onnxruntime(model, shapes: dict, rng):
    """The compiled model's outputs are onnxruntime's; returns the compiled model."""
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    compiled = compiler.compile(model, target="native")
    got = compiled(**feeds)
    expected = onnxruntime_outputs(model, feeds)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert np.asarray(g).shape == e.shape
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)
    return compiled


def _recurrent_kernels(compiled) -> list[str]:
    return [rule for rule in compiled.report.schedules.applied.values() if rule in (LSTM_RULE, GRU_RULE)]


@pytest.mark.parametrize("op, attrs", [("LSTM", {}), ("GRU", {"linear_before_reset": 0}),
                                       ("GRU", {"linear_before_reset": 1})])
def test_a_long_bidirectional_sequence_is_one_kernel(rng, op, attrs):
    """64 steps, 2 directions, 16-lane hidden units: one recurrent kernel, and as many kernels in all as
    for 2 steps (an unrolled recurrence grows by a dozen kernels a step)."""
    counts = []
    for seq in (2, 64):
        model, shapes = _rnn_model(rng, op, ["y", "y_h"], "bidirectional", initial_states=True, seq=seq,
                                   hidden=32, **attrs)
        compiled = _matches_onnxruntime(model, shapes, rng)
        assert _recurrent_kernels(compiled) == [LSTM_RULE if op == "LSTM" else GRU_RULE]
        counts.append(compiled.report.kernels)
    assert counts[0] == counts[1]


@pytest.mark.parametrize("target, register", [("cascadelake", "zmm"), ("avx2", "ymm")])
@pytest.mark.parametrize("kernel", ["lstm", "gru"])
def test_recurrent_kernels_are_vector_code_with_no_libm_calls(target, register, kernel):
    """Built, not run (a target this host may lack): the gate products are vector FMAs, and sigmoid and tanh
    are vector arithmetic, not expf called once per hidden unit."""
    shape = SequenceShape(steps=8, batch=1, hidden=96, reverse=(False, True))
    func = lstm_sequence(shape) if kernel == "lstm" else gru_sequence(shape, linear_before_reset=False)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      resolve_target(target).tvm_target())
    asm = lib.mod.inspect_source("asm")
    assert re.search(rf"\bvfmadd\w+ps\s+[^\n]*%{register}", asm), f"no {register} FMA"
    assert not re.search(r"call\w*\s+(expf|tanhf)", asm), "a libm call per element"


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_lstm_all_outputs(rng, direction):
    model, shapes = _rnn_model(rng, "LSTM", ["y", "y_h", "y_c"], direction)
    _matches_onnxruntime(model, shapes, rng)


def test_bidirectional_lstm_with_initial_states_and_only_y_h(rng):
    """Y unused (empty name), as an encoder taking only the final state exports it."""
    model, shapes = _rnn_model(rng, "LSTM", ["", "y_h"], "bidirectional", initial_states=True)
    _matches_onnxruntime(model, shapes, rng)


def test_lstm_batch_first_layout(rng):
    """layout=1 (batch first; onnxruntime has no kernel for it): checked against layout 0 on transposed data."""
    model, shapes = _rnn_model(rng, "LSTM", ["y", "y_h"], "bidirectional", initial_states=True)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    expected_y, expected_h = onnxruntime_outputs(model, feeds)
    model.graph.node[0].attribute.append(helper.make_attribute("layout", 1))
    for value in model.graph.input:  # x [seq, batch, input] and the states [dirs, batch, hidden]: swap 0 and 1
        dims = value.type.tensor_type.shape.dim
        dims[0].dim_value, dims[1].dim_value = dims[1].dim_value, dims[0].dim_value
    got_y, got_h = compiler.compile(model, target="native")(**{n: a.transpose(1, 0, 2) for n, a in feeds.items()})
    np.testing.assert_allclose(got_y, expected_y.transpose(2, 0, 1, 3), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_h, expected_h.transpose(1, 0, 2), rtol=1e-4, atol=1e-5)


def test_lstm_with_peepholes(rng):
    model, shapes = _rnn_model(rng, "LSTM", ["y", "y_c"], initial_states=True)
    node = model.graph.node[0]
    node.input.append("P")
    model.graph.initializer.append(numpy_helper.from_array(rng.standard_normal((1, 3 * HIDDEN)).astype(np.float32),
                                                           "P"))
    _matches_onnxruntime(model, shapes, rng)


@pytest.mark.parametrize("linear_before_reset", [0, 1])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_gru(rng, linear_before_reset, direction):
    model, shapes = _rnn_model(rng, "GRU", ["y", "y_h"], direction, initial_states=True,
                               linear_before_reset=linear_before_reset)
    _matches_onnxruntime(model, shapes, rng)


def test_gru_of_opset_7_without_bias_or_state(rng):
    model, _ = _rnn_model(rng, "GRU", ["y"], opset=7, linear_before_reset=1)
    node = model.graph.node[0]
    del node.input[3:]
    _matches_onnxruntime(model, {"x": [SEQ, BATCH, INPUT]}, rng)


@pytest.mark.parametrize("attrs, message", [
    ({"activations": ["Relu", "Tanh", "Tanh"]}, "activations"),
    ({"clip": 3.0}, "clip"),
])
def test_unsupported_attributes_name_the_node(rng, attrs, message):
    model, _ = _rnn_model(rng, "LSTM", ["y"], **attrs)
    with pytest.raises(ModelError, match=rf"(?s)'rnn'.*{message}"):
        compiler.compile(model, target="native")


def test_partial_sequence_lengths_are_refused(rng):
    model, _ = _rnn_model(rng, "GRU", ["y"])
    model.graph.node[0].input[4] = "lens"
    model.graph.initializer.append(numpy_helper.from_array(np.array([SEQ, SEQ - 2], np.int32), "lens"))
    with pytest.raises(ModelError, match="sequence_lens"):
        compiler.compile(model, target="native")


def test_full_sequence_lengths_are_accepted(rng):
    model, shapes = _rnn_model(rng, "GRU", ["y", "y_h"])
    model.graph.node[0].input[4] = "lens"
    model.graph.initializer.append(numpy_helper.from_array(np.full(BATCH, SEQ, np.int32), "lens"))
    _matches_onnxruntime(model, shapes, rng)


def test_crnn_style_conv_then_bidirectional_lstm(rng):
    """A CRNN text recognizer's shape, as torch's legacy exporter writes it: conv features [1, C, 1, W]
    squeezed and transposed to [W, 1, C], a bidirectional LSTM with initial states, then a per-step classifier
    on Y reshaped to [W, 1, 2 * hidden]."""
    channels, width, classes = INPUT, 6, 5  # the LSTM input size is the conv channels
    lstm, shapes = _rnn_model(rng, "LSTM", ["y", "y_h", "y_c"], "bidirectional", initial_states=True)
    conv_w = numpy_helper.from_array(rng.standard_normal((channels, 1, 2, 3)).astype(np.float32), "conv_w")
    classifier = numpy_helper.from_array(rng.standard_normal((2 * HIDDEN, classes)).astype(np.float32), "cls")
    seq_shape = numpy_helper.from_array(np.array([width, 1, 2 * HIDDEN], np.int64), "seq_shape")
    lstm.graph.node[0].input[0] = "seq"
    del lstm.graph.input[0]
    lstm.graph.input.insert(0, helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 2, width]))
    for state in lstm.graph.input[1:]:
        state.type.tensor_type.shape.dim[1].dim_value = 1  # batch 1
    lstm.graph.node.insert(0, helper.make_node("Conv", ["image", "conv_w"], ["features"], name="conv",
                                               pads=[0, 1, 0, 1]))
    lstm.graph.node.insert(1, helper.make_node("Relu", ["features"], ["relu"], name="relu"))
    lstm.graph.node.insert(2, helper.make_node("Squeeze", ["relu", "axis2"], ["squeezed"], name="squeeze"))
    lstm.graph.node.insert(3, helper.make_node("Transpose", ["squeezed"], ["seq"], name="to_seq", perm=[2, 0, 1]))
    lstm.graph.node.extend([helper.make_node("Transpose", ["y"], ["y_t"], name="y_t", perm=[0, 2, 1, 3]),
                            helper.make_node("Reshape", ["y_t", "seq_shape"], ["y_seq"], name="y_seq"),
                            helper.make_node("MatMul", ["y_seq", "cls"], ["logits"], name="classify")])
    lstm.graph.initializer.extend([conv_w, classifier, seq_shape,
                                   numpy_helper.from_array(np.array([2], np.int64), "axis2")])
    del lstm.graph.output[:]
    lstm.graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, None))
    shapes = {"image": [1, 1, 2, width], "h0": [2, 1, HIDDEN], "c0": [2, 1, HIDDEN]}
    _matches_onnxruntime(lstm, shapes, rng)


def test_sequence_lengths_given_at_run_time_are_refused(rng):
    model, _ = _rnn_model(rng, "LSTM", ["y"])
    model.graph.node[0].input[4] = "lens"
    model.graph.input.append(helper.make_tensor_value_info("lens", TensorProto.INT32, [BATCH]))
    with pytest.raises(ModelError, match=r"'rnn'.*sequence_lens is a runtime input"):
        compiler.compile(model, target="native")
