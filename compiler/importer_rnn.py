"""ONNX LSTM and GRU converters for TVM 0.27's Relax importer, which has none.

The sequence length is static once input shapes are fixed. The whole input is multiplied by W once per
direction (an FC, which int8 quantizes like any other), then one kernel runs every time step of every direction
(targets.recurrent: h @ R^T and the gates per step, directions in parallel). Supported:
forward/reverse/bidirectional, layout 0 and 1, optional B/initial_h/initial_c, LSTM peepholes, GRU
linear_before_reset 0 and 1, sequence_lens absent or all equal to the sequence length. Non-default activations,
clip, LSTM input_forget and tensors other than float32 raise a ModelError naming what is at fault.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compiler.errors import ModelError
from targets.recurrent import GRU_RULE, LSTM_RULE, SequenceShape, gru_sequence, lstm_sequence

_DEFAULT_ACTIVATIONS = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh")}
_GATES = {"LSTM": 4, "GRU": 3}


@dataclass(frozen=True)
class RnnShape:
    """Static sizes of one RNN node after layout normalisation (X as [seq, batch, input])."""

    seq_len: int
    batch: int
    hidden: int
    directions: tuple  # "forward" / "reverse", one per direction slot of W


def _static_dims(expr, what: str) -> list[int]:
    dims = []
    for dim in expr.ty.shape.values:
        if not isinstance(getattr(dim, "value", None), int):
            raise ModelError(f"{what} has a dynamic shape {list(expr.ty.shape.values)}; give static input_shapes")
        dims.append(dim.value)
    return dims


def _check_attributes(op: str, attr: dict) -> None:
    directions = 2 if attr.get("direction", b"forward") == b"bidirectional" else 1
    activations = tuple(a.decode() if isinstance(a, bytes) else a for a in attr.get("activations", ()))
    if activations and activations != _DEFAULT_ACTIVATIONS[op] * directions:
        raise ModelError(f"{op} activations {list(activations)} are not supported (only the defaults "
                         f"{list(_DEFAULT_ACTIVATIONS[op])})")
    if attr.get("clip") is not None:
        raise ModelError(f"{op} clip={attr['clip']} is not supported")
    if attr.get("input_forget", 0):
        raise ModelError(f"{op} input_forget=1 is not supported")


def _check_sequence_lens(op: str, sequence_lens, params, shape: RnnShape) -> None:
    """Only absent lengths or lengths that all equal the sequence length (the kernel has no per-batch mask)."""
    import tvm
    from tvm.relax.frontend.onnx import onnx_frontend

    if sequence_lens is None:
        return
    value = onnx_frontend.get_constant(sequence_lens, params)
    if isinstance(value, tvm.ir.GenericConst):
        lengths = value.value.numpy()
        if lengths.size == 0 or np.all(lengths == shape.seq_len):
            return
        raise ModelError(f"{op} sequence_lens {lengths.tolist()} differ from the sequence length "
                         f"{shape.seq_len}; only full-length sequences are supported")
    raise ModelError(f"{op} sequence_lens is a runtime input; only absent or constant full lengths are supported")


class _Emitter:
    """Small helpers over the block builder for the ops around the kernel."""

    def __init__(self, bb):
        from tvm import relax

        self.bb, self.op = bb, relax.op

    def emit(self, expr):
        return self.bb.emit(expr)

    def take(self, x, axis: int, begin: int, end: int | None = None, squeeze: bool = False):
        """x[begin:end] along axis (end defaults to begin+1), squeezing that axis if asked."""
        end = begin + 1 if end is None else end
        part = self.emit(self.op.strided_slice(x, axes=[axis], begin=[begin], end=[end]))
        return self.emit(self.op.squeeze(part, axis=[axis])) if squeeze else part

    def matmul_t(self, x, weight):
        """x @ weight^T (x of any rank)."""
        return self.emit(self.op.matmul(x, self.emit(self.op.permute_dims(weight, [1, 0]))))

    def add(self, *terms):
        total = terms[0]
        for term in terms[1:]:
            total = self.emit(self.op.add(total, term))
        return total

    def stack(self, items, axis: int):
        """R.stack, written as expand_dims + concat: ConvertLayout fails on R.stack in TVM 0.27
        ("String index out of bounds"), and the layout phase runs it on the whole graph."""
        return self.emit(self.op.concat([self.emit(self.op.expand_dims(i, axis)) for i in items], axis=axis))


def _prepare(op: str, bb, inputs, attr, params):
    from tvm.relax.frontend.onnx.onnx_frontend import onnx_input

    """Validate the node; return (emitter, inputs with X [seq, batch, input] and the initial states
    [dirs, batch, hidden] whatever the layout, shape, layout)."""
    _check_attributes(op, attr)
    em = _Emitter(bb)
    layout = attr.get("layout", 0)
    if layout == 1:  # batch first: X [batch, seq, input], initial_h/initial_c [batch, dirs, hidden]
        inputs = [em.emit(em.op.permute_dims(v, [1, 0, 2])) if i in (0, 5, 6) and v is not None else v
                  for i, v in enumerate(inputs)]
    inputs = onnx_input(inputs)  # None past the last given input
    x, w = inputs[0], inputs[1]
    if str(x.ty.dtype) != "float32":
        raise ModelError(f"{op} input X is {x.ty.dtype}; only float32 recurrences are supported")
    seq_len, batch, _ = _static_dims(x, f"{op} input X")
    num_dir, gate_rows, _ = _static_dims(w, f"{op} weight W")
    direction = attr.get("direction", b"forward").decode()
    directions = ("forward", "reverse") if direction == "bidirectional" else (direction,)
    if len(directions) != num_dir:
        raise ModelError(f"{op} direction={direction} but W has {num_dir} directions")
    hidden = attr.get("hidden_size", gate_rows // _GATES[op])
    shape = RnnShape(seq_len, batch, hidden, directions)
    _check_sequence_lens(op, inputs[4], params, shape)
    return em, inputs, shape, layout


def _initial_states(em: _Emitter, state, shape: RnnShape, dtype: str):
    """[dirs, batch, hidden]: the given initial state, else zeros."""
    if state is None:
        return em.emit(em.op.zeros((len(shape.directions), shape.batch, shape.hidden), dtype))
    return state


def _bias_halves(em: _Emitter, bias, d: int, count: int, shape: RnnShape, dtype: str):
    """(Wb, Rb) of direction d, each [count * hidden], zeros when B is absent."""
    if bias is None:
        zeros = em.emit(em.op.zeros((count * shape.hidden,), dtype))
        return zeros, zeros
    b = em.take(bias, 0, d, squeeze=True)
    size = count * shape.hidden
    return em.take(b, 0, 0, size), em.take(b, 0, size, 2 * size)


def _projections(em: _Emitter, x, w, bias, count: int, shape: RnnShape, dtype: str, with_recurrent_bias: bool):
    """[dirs, seq, batch, count * hidden]: x @ W^T + Wb per direction (+ Rb when it can be added up front),
    one FC each over the whole sequence."""
    per_direction = []
    for d in range(len(shape.directions)):
        wb, rb = _bias_halves(em, bias, d, count, shape, dtype)
        terms = (wb, rb) if with_recurrent_bias else (wb,)
        per_direction.append(em.add(em.matmul_t(x, em.take(w, 0, d, squeeze=True)), *terms))
    return em.stack(per_direction, axis=0)


def _recurrent_biases(em: _Emitter, bias, count: int, shape: RnnShape, dtype: str):
    """Rb of every direction, [dirs, count * hidden] (zeros when B is absent)."""
    size = count * shape.hidden
    if bias is None:
        return em.emit(em.op.zeros((len(shape.directions), size), dtype))
    return em.emit(em.op.strided_slice(bias, axes=[1], begin=[size], end=[2 * size]))


def _sequence_shape(shape: RnnShape) -> SequenceShape:
    return SequenceShape(shape.seq_len, shape.batch, shape.hidden,
                         tuple(direction == "reverse" for direction in shape.directions))


def _run_kernel(em: _Emitter, kernel, name: str, args: list, shape: RnnShape, dtype: str, states: int):
    """The whole-sequence kernel as one call: (Y [seq, dirs, batch, hidden], [its final states])."""
    from tvm import relax

    dirs = len(shape.directions)
    state = relax.TensorType((dirs, shape.batch, shape.hidden), dtype)
    outputs = [relax.TensorType((shape.seq_len, dirs, shape.batch, shape.hidden), dtype)] + [state] * states
    call = em.emit(relax.call_tir(em.bb.add_func(kernel, name), relax.Tuple(args), out_ty=outputs))
    items = [em.emit(relax.TupleGetItem(call, i)) for i in range(1 + states)]
    return items[0], items[1:]


def _lstm(em: _Emitter, x, inputs, attr, shape: RnnShape, dtype: str):
    """(Y, [Y_h, Y_c]) from one lstm_sequence kernel; the input projection is an FC before it."""
    w, r, bias, _, initial_h, initial_c, peepholes = (inputs[i] for i in range(1, 8))
    if peepholes is None:
        peepholes = em.emit(em.op.zeros((len(shape.directions), 3 * shape.hidden), dtype))
    args = [_projections(em, x, w, bias, 4, shape, dtype, with_recurrent_bias=True),
            em.emit(em.op.permute_dims(r, [0, 2, 1])), peepholes,
            _initial_states(em, initial_h, shape, dtype), _initial_states(em, initial_c, shape, dtype)]
    return _run_kernel(em, lstm_sequence(_sequence_shape(shape)), LSTM_RULE, args, shape, dtype, states=2)


def _gru(em: _Emitter, x, inputs, attr, shape: RnnShape, dtype: str):
    """(Y, [Y_h]) from one gru_sequence kernel; Rb stays in the kernel (the reset gate scales part of it)."""
    w, r, bias, _, initial_h = (inputs[i] for i in range(1, 6))
    lbr = bool(attr.get("linear_before_reset", 0))
    args = [_projections(em, x, w, bias, 3, shape, dtype, with_recurrent_bias=False),
            em.emit(em.op.permute_dims(r, [0, 2, 1])), _recurrent_biases(em, bias, 3, shape, dtype),
            _initial_states(em, initial_h, shape, dtype)]
    return _run_kernel(em, gru_sequence(_sequence_shape(shape), lbr), GRU_RULE, args, shape, dtype, states=1)


def _make_converter(op_type: str, layer):
    """An importer converter for `op_type`, whose layer `layer` (_lstm or _gru) emits."""
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend

    def impl(cls, bb, inputs, attr, params):
        em, inputs, shape, layout = _prepare(op_type, bb, inputs, attr, params)
        x = inputs[0]
        y, states = layer(em, x, inputs, attr, shape, str(x.ty.dtype))
        if layout == 1:  # batch first: Y [batch, seq, dirs, hidden], states [batch, dirs, hidden]
            y = em.emit(em.op.permute_dims(y, [2, 0, 1, 3]))
            states = [em.emit(em.op.permute_dims(s, [1, 0, 2])) for s in states]
        return relax.Tuple([y, *states])

    return type(op_type, (onnx_frontend.OnnxOpConverter,), {"_impl_v7": classmethod(impl)})


def rnn_converters() -> dict:
    """The converters to add to the importer's map, by ONNX op type."""
    return {"LSTM": _make_converter("LSTM", _lstm), "GRU": _make_converter("GRU", _gru)}


RNN_OP_TYPES = ("LSTM", "GRU")
