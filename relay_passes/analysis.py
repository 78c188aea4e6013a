"""Small questions about a Relax function that several passes ask."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax


def op_name(expr) -> str | None:
    """The operator's name of a call to a Relax op (relax.nn.conv2d), else None."""
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return None


def static_shape(expr) -> list[int] | None:
    """The shape of a tensor-typed expression when every dimension is a known integer, else None."""
    shape = getattr(expr.ty, "shape", None)
    values = getattr(shape, "values", None)
    if values is None or not all(isinstance(d, tvm.tirx.IntImm) for d in values):
        return None
    return [int(d) for d in values]


def use_counts(func: relax.Function) -> dict:
    """{var: how many times it is read}; a function output counts one read more (the caller's)."""
    uses = {}
    for block in func.body.blocks:
        for var, users in relax.analysis.udchain(block).items():
            uses[var] = len(users) + (0 if isinstance(var, relax.DataflowVar) else 1)
    return uses


class SingleUse:
    """Is the value bound to a var read exactly once? (Names repeat in Relax: match vars by identity.)"""

    def __init__(self, func: relax.Function):
        self.var_of = [(value, var) for var, value in relax.analysis.get_var2val(func).items()]
        self.uses = use_counts(func)

    def __call__(self, value) -> bool:
        var = next((v for val, v in self.var_of if val.same_as(value)), None)
        return var is not None and self.uses.get(var, 2) == 1


def channel_vector(values: np.ndarray, producer: relax.Call) -> np.ndarray | None:
    """`values` as one number per output channel of a conv2d (NCHW: axis 1; blocked NCHW{c}: axes 1 and 4)
    or matmul (last axis), where it is broadcast along the channels only (a bias, a BatchNorm scale); None
    where it varies elsewhere."""
    out_shape = [int(d) for d in producer.ty.shape.values]
    if values.ndim > len(out_shape):
        return None
    if producer.op.name == "relax.nn.conv2d":
        axes = (1, 4) if len(out_shape) == 5 else (1,)
    else:
        axes = (len(out_shape) - 1,)
    padded = values.reshape((1,) * (len(out_shape) - values.ndim) + values.shape)
    if any(d != 1 for i, d in enumerate(padded.shape) if i not in axes):
        return None
    if all(padded.shape[a] == 1 for a in axes):
        return np.broadcast_to(padded.reshape(-1), (int(np.prod([out_shape[a] for a in axes])),))
    if any(padded.shape[a] != out_shape[a] for a in axes):
        return None
    # Blocked channels are (chunk, lane): row-major order is channel order.
    return padded.reshape(-1)
