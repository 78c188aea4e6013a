"""ONNX LSTM and GRU converters for TVM 0.27's Relax importer, which has none.

The sequence length is static once input shapes are fixed, so the recurrence is unrolled over time: the whole
input is multiplied by W once, then each step multiplies the hidden state by R and applies the gates. Supported:
forward/reverse/bidirectional, layout 0 and 1, optional B/initial_h/initial_c, LSTM peepholes, GRU
linear_before_reset 0 and 1, sequence_lens absent or all equal to the sequence length. Non-default activations,
clip and LSTM input_forget raise a ModelError naming the attribute.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compiler.errors import ModelError

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
    """Only absent lengths or lengths that all equal the sequence length (a per-batch mask is not unrolled)."""
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
    """Small helpers over the block builder, so the gate formulas read like the ONNX spec."""

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

    def mul(self, a, b):
        return self.emit(self.op.multiply(a, b))

    def sigmoid(self, x):
        return self.emit(self.op.sigmoid(x))

    def tanh(self, x):
        return self.emit(self.op.tanh(x))

    def stack(self, items, axis: int):
        """R.stack, written as expand_dims + concat: ConvertLayout fails on R.stack in TVM 0.27
        ("String index out of bounds"), and the layout phase runs it on the whole graph."""
        return self.emit(self.op.concat([self.emit(self.op.expand_dims(i, axis)) for i in items], axis=axis))

    def gates(self, x, count: int, hidden: int):
        return [self.take(x, 1, g * hidden, (g + 1) * hidden) for g in range(count)]


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


def _initial_state(em: _Emitter, state, d: int, shape: RnnShape, dtype: str):
    if state is None:
        return em.emit(em.op.zeros((shape.batch, shape.hidden), dtype))
    return em.take(state, 0, d, squeeze=True)


def _bias_halves(em: _Emitter, bias, d: int, count: int, shape: RnnShape, dtype: str):
    """(Wb, Rb) of direction d, each [count * hidden], zeros when B is absent."""
    if bias is None:
        zeros = em.emit(em.op.zeros((count * shape.hidden,), dtype))
        return zeros, zeros
    b = em.take(bias, 0, d, squeeze=True)
    size = count * shape.hidden
    return em.take(b, 0, 0, size), em.take(b, 0, size, 2 * size)


def _time_steps(direction: str, seq_len: int) -> range:
    return range(seq_len - 1, -1, -1) if direction == "reverse" else range(seq_len)


def _outputs(em: _Emitter, per_direction: list, finals: list[list], layout: int):
    """Y [seq, dirs, batch, hidden] and the final states [dirs, batch, hidden] (layout 1: batch first)."""
    y = em.stack([em.stack(steps, axis=0) for steps in per_direction], axis=1)
    states = [em.stack(final, axis=0) for final in finals]
    if layout == 1:
        y = em.emit(em.op.permute_dims(y, [2, 0, 1, 3]))
        states = [em.emit(em.op.permute_dims(s, [1, 0, 2])) for s in states]
    return [y, *states]


def _lstm_direction(em: _Emitter, x, inputs, d: int, shape: RnnShape, dtype: str):
    """Unrolled LSTM for direction slot d: (h per time step in time order, final h, final c)."""
    w, r, bias, _, initial_h, initial_c, peepholes = (inputs[i] for i in range(1, 8))
    wb, rb = _bias_halves(em, bias, d, 4, shape, dtype)
    projected = em.add(em.matmul_t(x, em.take(w, 0, d, squeeze=True)), wb, rb)
    r_d = em.take(r, 0, d, squeeze=True)
    p_i = p_o = p_f = None
    if peepholes is not None:
        p_d = em.take(peepholes, 0, d, squeeze=True)
        p_i, p_o, p_f = (em.take(p_d, 0, k * shape.hidden, (k + 1) * shape.hidden) for k in range(3))
    h = _initial_state(em, initial_h, d, shape, dtype)
    c = _initial_state(em, initial_c, d, shape, dtype)
    steps = [None] * shape.seq_len
    for t in _time_steps(shape.directions[d], shape.seq_len):
        pre = em.add(em.take(projected, 0, t, squeeze=True), em.matmul_t(h, r_d))
        i, o, f, cand = em.gates(pre, 4, shape.hidden)
        if peepholes is not None:
            i, f = em.add(i, em.mul(p_i, c)), em.add(f, em.mul(p_f, c))
        c = em.add(em.mul(em.sigmoid(f), c), em.mul(em.sigmoid(i), em.tanh(cand)))
        if peepholes is not None:
            o = em.add(o, em.mul(p_o, c))
        h = em.mul(em.sigmoid(o), em.tanh(c))
        steps[t] = h
    return steps, h, c


def _gru_direction(em: _Emitter, x, inputs, d: int, shape: RnnShape, dtype: str, linear_before_reset: bool):
    """Unrolled GRU for direction slot d: (h per time step in time order, final h)."""
    w, r, bias, _, initial_h = (inputs[i] for i in range(1, 6))
    hid = shape.hidden
    wb, rb = _bias_halves(em, bias, d, 3, shape, dtype)
    projected = em.add(em.matmul_t(x, em.take(w, 0, d, squeeze=True)), wb)
    r_d = em.take(r, 0, d, squeeze=True)
    r_zr, r_h = em.take(r_d, 0, 0, 2 * hid), em.take(r_d, 0, 2 * hid, 3 * hid)
    rb_zr, rb_h = em.take(rb, 0, 0, 2 * hid), em.take(rb, 0, 2 * hid, 3 * hid)
    h = _initial_state(em, initial_h, d, shape, dtype)
    steps = [None] * shape.seq_len
    for t in _time_steps(shape.directions[d], shape.seq_len):
        x_z, x_r, x_h = em.gates(em.take(projected, 0, t, squeeze=True), 3, hid)
        h_z, h_r = em.gates(em.add(em.matmul_t(h, r_zr), rb_zr), 2, hid)
        z, reset = em.sigmoid(em.add(x_z, h_z)), em.sigmoid(em.add(x_r, h_r))
        if linear_before_reset:
            recurrent = em.mul(reset, em.add(em.matmul_t(h, r_h), rb_h))
        else:
            recurrent = em.add(em.matmul_t(em.mul(reset, h), r_h), rb_h)
        cand = em.tanh(em.add(x_h, recurrent))
        # h = (1 - z) * cand + z * h, written as cand + z * (h - cand)
        h = em.add(cand, em.mul(z, em.emit(em.op.subtract(h, cand))))
        steps[t] = h
    return steps, h


def _lstm(em: _Emitter, x, inputs, attr, shape: RnnShape, dtype: str) -> tuple[list, list]:
    """Per direction (Y, Y_h, Y_c): the step outputs and the final states, Y_h then Y_c."""
    results = [_lstm_direction(em, x, inputs, d, shape, dtype) for d in range(len(shape.directions))]
    return [r[0] for r in results], [[r[1] for r in results], [r[2] for r in results]]


def _gru(em: _Emitter, x, inputs, attr, shape: RnnShape, dtype: str) -> tuple[list, list]:
    """Per direction (Y, Y_h): the step outputs and the final state."""
    lbr = bool(attr.get("linear_before_reset", 0))
    results = [_gru_direction(em, x, inputs, d, shape, dtype, lbr) for d in range(len(shape.directions))]
    return [r[0] for r in results], [[r[1] for r in results]]


def _make_converter(op_type: str, directions):
    """An importer converter for `op_type`, unrolled by `directions` (_lstm or _gru)."""
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend

    def impl(cls, bb, inputs, attr, params):
        em, inputs, shape, layout = _prepare(op_type, bb, inputs, attr, params)
        x = inputs[0]
        steps, states = directions(em, x, inputs, attr, shape, str(x.ty.dtype))
        return relax.Tuple(_outputs(em, steps, states, layout))

    return type(op_type, (onnx_frontend.OnnxOpConverter,), {"_impl_v7": classmethod(impl)})


def rnn_converters() -> dict:
    """The converters to add to the importer's map, by ONNX op type."""
    return {"LSTM": _make_converter("LSTM", _lstm), "GRU": _make_converter("GRU", _gru)}


RNN_OP_TYPES = ("LSTM", "GRU")
