"""Bounds the graph itself puts on a tensor: Clip/ReLU6 to [a, b], Sigmoid, HardSigmoid and Softmax to
[0, 1], Tanh to [-1, 1], carried through the ops that keep values inside them (pooling, reshapes, concat,
scaling by a positive constant). Calibration then never clips inside a bound it can trust."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

UNIT = {"relax.sigmoid": (0.0, 1.0), "relax.nn.softmax": (0.0, 1.0), "relax.tanh": (-1.0, 1.0)}
# one input, values only moved or averaged: the output stays within the input's bounds
KEEPS = {"relax.reshape", "relax.permute_dims", "relax.nn.max_pool2d", "relax.nn.avg_pool2d",
         "relax.nn.adaptive_avg_pool2d", "relax.mean", "relax.squeeze", "relax.expand_dims", "relax.flatten",
         "relax.strided_slice", "relax.layout_transform", "relax.astype"}


def tensor_bounds(func: relax.Function) -> dict:
    """{var: (lo, hi)} for every var of `func` whose values the graph bounds on both sides."""
    bounds: dict = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            found = _bound_of(binding.value, bounds)
            if found is not None and np.isfinite(found).all():
                bounds[binding.var] = (float(found[0]), float(found[1]))
    return bounds


def _scalar(expr) -> float | None:
    if isinstance(expr, tvm.ir.expr.GenericConst) and expr.value.numpy().size == 1:
        return float(expr.value.numpy().reshape(()))
    value = getattr(expr, "value", None)  # clip's bounds: a FloatImm / IntImm
    return float(value) if isinstance(value, (int, float)) else None


def _bound_of(value, bounds):
    if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)):
        return None
    name, args = value.op.name, value.args
    if name in UNIT:
        return UNIT[name]
    if name == "relax.clip":
        lo, hi = _scalar(args[1]), _scalar(args[2])
        return None if lo is None or hi is None else (lo, hi)
    if name in KEEPS:
        return bounds.get(args[0])
    if name == "relax.concat":
        parts = [bounds.get(f) for f in args[0].fields] if isinstance(args[0], relax.Tuple) else [None]
        return None if None in parts else (min(p[0] for p in parts), max(p[1] for p in parts))
    if name in ("relax.multiply", "relax.divide", "relax.add", "relax.subtract"):
        return _affine(name, args, bounds)
    return None


def _affine(name, args, bounds):
    """A bounded tensor times, over, plus or minus a scalar constant."""
    a, b = args
    if name in ("relax.multiply", "relax.add") and a not in bounds:
        a, b = b, a  # x * c and c * x alike
    c = _scalar(b)
    if a not in bounds or c is None:
        return None
    lo, hi = bounds[a]
    if name == "relax.add":
        return lo + c, hi + c
    if name == "relax.subtract":
        return lo - c, hi - c
    if c == 0 or (name == "relax.divide" and c == 0):
        return None
    factor = c if name == "relax.multiply" else 1.0 / c
    return tuple(sorted((lo * factor, hi * factor)))
