"""Whole-sequence LSTM and GRU kernels: one kernel runs every time step of every direction.

Unrolled into graph ops, a recurrence costs a dozen kernel launches per time step (a bidirectional LSTM over
80 steps was 2000 kernels, each a few microseconds of work). Here the time loop is inside the kernel: per
step, the gates are the precomputed input projection plus h @ R^T, accumulated several vectors of gate columns
at a time (R packed as [dirs, hidden, gates * hidden], so a column block walks k through one row), then the
cell update, vectorized over the hidden units. Directions run in parallel (a bidirectional layer on two
cores); the steps of one direction cannot.

The kernels are written as loops, not scheduled by targets.schedules: they carry `RULE_ATTR` (the rule name
the compile report shows) and TVM's scheduled mark. A value bound to a Python name inside a `T.vectorized`
loop becomes a scalar let, computed once for all lanes, so every statement here stores into a buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.script import tirx as T

import targets.vector_math  # noqa: F401 - exp (in sigmoid and tanh) lowered to vector arithmetic
from targets.schedules import IS_SCHEDULED, RULE_ATTR

LSTM_RULE, GRU_RULE = "lstm_sequence", "gru_sequence"


@dataclass(frozen=True)
class SequenceShape:
    """A recurrent layer's static sizes: `reverse[d]` is whether direction slot d runs from the last step."""
    steps: int
    batch: int
    hidden: int
    reverse: tuple[bool, ...]

    @property
    def directions(self) -> int:
        return len(self.reverse)

    @property
    def lanes(self) -> int:
        """The widest vector (up to 16 float32) that divides the hidden units: the cell loop's vector."""
        return next(lanes for lanes in (16, 8, 4, 2, 1) if self.hidden % lanes == 0)


# Independent vector accumulators in the recurrent product: one alone waits out each FMA's latency (4 cycles
# on Zen 4) and left a GRU step (128 x 384) at a third of the speed that 8 reach; 32 zmm registers hold them.
MAX_ACCUMULATORS = 8


def accumulators(count: int, lanes: int) -> int:
    """Vectors of columns accumulated at once over `count` columns: the most, up to MAX_ACCUMULATORS, that
    divide its vector blocks (uneven blocks would need a remainder loop)."""
    blocks = count // lanes
    return next(u for u in range(min(MAX_ACCUMULATORS, blocks), 0, -1) if blocks % u == 0)


@T.macro(hygienic=False)
def _add_product(gates, state, r_t, d, start, count, L, H, U):
    """gates[start:start + count] += state @ r_t[d][:, start:start + count], U vectors of columns at a time,
    held in `acc` (a small local buffer, unrolled to constant indices: LLVM keeps it in registers)."""
    for jo in range(count // (L * U)):
        acc = T.decl_buffer((U * L,), "float32", scope="local")
        for u in T.unroll(U):
            for ji in T.vectorized(L):
                acc[u * L + ji] = gates[start + (jo * U + u) * L + ji]
        for k in range(H):
            for u in T.unroll(U):
                for ji in T.vectorized(L):
                    acc[u * L + ji] = acc[u * L + ji] + state[k] * r_t[d, k, start + (jo * U + u) * L + ji]
        for u in T.unroll(U):
            for ji in T.vectorized(L):
                gates[start + (jo * U + u) * L + ji] = acc[u * L + ji]


def _direction_loop(directions: int):
    """Directions in parallel when there are two; one runs on the calling thread (a parallel loop of one
    iteration still wakes the thread pool)."""
    return T.parallel if directions > 1 else T.serial


def _mark(func, rule: str):
    """Named by the module it joins (TVMScript names it `kernel`: two recurrent layers would clash)."""
    return func.without_attr("global_symbol").with_attr(RULE_ATTR, rule).with_attr(IS_SCHEDULED, True)


def lstm_sequence(shape: SequenceShape):
    """(proj [D, S, B, 4H], r_t [D, H, 4H], peepholes [D, 3H], h0 [D, B, H], c0 [D, B, H]) ->
    (Y [S, D, B, H], Y_h [D, B, H], Y_c [D, B, H]), gates in ONNX's order i, o, f, c; proj holds x @ W^T and
    both biases."""
    D, S, B, H, L = shape.directions, shape.steps, shape.batch, shape.hidden, shape.lanes
    G = 4 * H
    U = accumulators(G, L)
    direction_loop = _direction_loop(D)
    rev0, rev1 = int(shape.reverse[0]), int(shape.reverse[-1])

    @T.prim_func
    def kernel(proj: T.Buffer((D, S, B, G), "float32"), r_t: T.Buffer((D, H, G), "float32"),
               peep: T.Buffer((D, 3 * H), "float32"), h0: T.Buffer((D, B, H), "float32"),
               c0: T.Buffer((D, B, H), "float32"), y: T.Buffer((S, D, B, H), "float32"),
               y_h: T.Buffer((D, B, H), "float32"), y_c: T.Buffer((D, B, H), "float32")):
        T.func_attr({"tir.noalias": True})
        for d in direction_loop(D):
            gates = T.decl_buffer((G,), "float32")
            state = T.decl_buffer((H,), "float32")
            for b, j in T.grid(B, H):
                y_h[d, b, j] = h0[d, b, j]
                y_c[d, b, j] = c0[d, b, j]
            for t in range(S):
                tt = T.if_then_else(T.if_then_else(d == 0, rev0, rev1) == 1, S - 1 - t, t)
                for b in range(B):
                    for j in range(G):
                        gates[j] = proj[d, tt, b, j]
                    for j in range(H):
                        state[j] = y_h[d, b, j]
                    _add_product(gates, state, r_t, d, 0, G, L, H, U)
                    for jo in range(H // L):
                        for ji in T.vectorized(L):
                            # i and f (with their peepholes on the old cell), then the cell, then o on the new one
                            gates[jo * L + ji] = T.sigmoid(
                                gates[jo * L + ji] + peep[d, jo * L + ji] * y_c[d, b, jo * L + ji])
                            gates[2 * H + jo * L + ji] = T.sigmoid(
                                gates[2 * H + jo * L + ji] + peep[d, 2 * H + jo * L + ji] * y_c[d, b, jo * L + ji])
                            y_c[d, b, jo * L + ji] = (gates[2 * H + jo * L + ji] * y_c[d, b, jo * L + ji]
                                                      + gates[jo * L + ji] * T.tanh(gates[3 * H + jo * L + ji]))
                            gates[H + jo * L + ji] = T.sigmoid(
                                gates[H + jo * L + ji] + peep[d, H + jo * L + ji] * y_c[d, b, jo * L + ji])
                            y_h[d, b, jo * L + ji] = gates[H + jo * L + ji] * T.tanh(y_c[d, b, jo * L + ji])
                            y[tt, d, b, jo * L + ji] = y_h[d, b, jo * L + ji]

    return _mark(kernel, LSTM_RULE)


def gru_sequence(shape: SequenceShape, linear_before_reset: bool):
    """(proj [D, S, B, 3H], r_t [D, H, 3H], r_bias [D, 3H], h0 [D, B, H]) -> (Y [S, D, B, H], Y_h [D, B, H]),
    gates in ONNX's order z, r, h; proj holds x @ W^T and W's bias. linear_before_reset: the candidate reads
    r * (h @ R_h^T + Rb_h), else (r * h) @ R_h^T + Rb_h."""
    D, S, B, H, L = shape.directions, shape.steps, shape.batch, shape.hidden, shape.lanes
    G = 3 * H
    # the recurrent product's columns computed before the reset gate is known: all, or z and r only
    first = G if linear_before_reset else 2 * H
    lbr = int(linear_before_reset)
    U_first, U_h = accumulators(first, L), accumulators(H, L)
    direction_loop = _direction_loop(D)
    rev0, rev1 = int(shape.reverse[0]), int(shape.reverse[-1])

    @T.prim_func
    def kernel(proj: T.Buffer((D, S, B, G), "float32"), r_t: T.Buffer((D, H, G), "float32"),
               r_bias: T.Buffer((D, G), "float32"), h0: T.Buffer((D, B, H), "float32"),
               y: T.Buffer((S, D, B, H), "float32"), y_h: T.Buffer((D, B, H), "float32")):
        T.func_attr({"tir.noalias": True})
        for d in direction_loop(D):
            gates = T.decl_buffer((G,), "float32")
            state = T.decl_buffer((H,), "float32")
            reset_h = T.decl_buffer((H,), "float32")
            for b, j in T.grid(B, H):
                y_h[d, b, j] = h0[d, b, j]
            for t in range(S):
                tt = T.if_then_else(T.if_then_else(d == 0, rev0, rev1) == 1, S - 1 - t, t)
                for b in range(B):
                    for j in range(G):
                        gates[j] = r_bias[d, j]
                    for j in range(H):
                        state[j] = y_h[d, b, j]
                    _add_product(gates, state, r_t, d, 0, first, L, H, U_first)
                    for jo in range(H // L):
                        for ji in T.vectorized(L):
                            gates[jo * L + ji] = T.sigmoid(proj[d, tt, b, jo * L + ji] + gates[jo * L + ji])
                            gates[H + jo * L + ji] = T.sigmoid(proj[d, tt, b, H + jo * L + ji] + gates[H + jo * L + ji])
                            reset_h[jo * L + ji] = gates[H + jo * L + ji] * y_h[d, b, jo * L + ji]
                    if lbr == 0:  # the candidate's product reads r * h (its bias is in gates already)
                        _add_product(gates, reset_h, r_t, d, 2 * H, H, L, H, U_h)
                    for jo in range(H // L):
                        for ji in T.vectorized(L):
                            # the candidate (into the h gate's slot), then h = cand + z * (h - cand)
                            gates[2 * H + jo * L + ji] = T.tanh(proj[d, tt, b, 2 * H + jo * L + ji] + T.if_then_else(
                                lbr == 1, gates[H + jo * L + ji] * gates[2 * H + jo * L + ji],
                                gates[2 * H + jo * L + ji]))
                            y_h[d, b, jo * L + ji] = gates[2 * H + jo * L + ji] + gates[jo * L + ji] * (
                                y_h[d, b, jo * L + ji] - gates[2 * H + jo * L + ji])
                            y[tt, d, b, jo * L + ji] = y_h[d, b, jo * L + ji]

    return _mark(kernel, GRU_RULE)
