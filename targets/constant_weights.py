"""Convs and FCs whose weight is a compile-time constant, also inside fused functions: a fused function reads
its weight as a parameter, and the constants are at its calls in main. The graph rewrites that need the
weight's values (targets.winograd_convs transforms it, targets.bounded_pairs checks it) find them here.
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax
from tvm.ir.expr import GenericConst


def is_op(expr, name: str) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


def is_conv(expr) -> bool:
    return is_op(expr, "relax.nn.conv2d")


def bound_values(func: relax.Function) -> dict:
    """Each variable of `func`'s body -> the expression bound to it."""
    values = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            values[binding.var] = binding.value
    return values


def weight_source(call: relax.Call, values: dict) -> relax.Expr:
    """What a conv or FC reads as its weight: its second argument, or for an FC whose packed weight is
    unpacked by a layout_transform (targets.layout.pack_dense_weights), the packed tensor."""
    weight = call.args[1]
    unpacked = values.get(weight)
    return unpacked.args[0] if is_op(unpacked, "relax.layout_transform") else weight


def weight_readers(func: relax.Function, qualifies: Callable[[relax.Call], bool]) -> dict[int, relax.Call]:
    """Position of each of `func`'s parameters that a qualifying conv or FC reads as its weight -> that op."""
    readers = {}
    values = bound_values(func)

    def visit(expr):
        if isinstance(expr, relax.Call) and qualifies(expr):
            source = weight_source(expr, values)
            readers.update({i: expr for i, p in enumerate(func.params) if p.same_as(source)})

    relax.analysis.post_order_visit(func.body, visit)
    return readers


def weight_parameters(func: relax.Function, qualifies: Callable[[relax.Call], bool]) -> list[int]:
    """Positions of `func`'s parameters that a qualifying conv or FC reads as its weight."""
    return sorted(weight_readers(func, qualifies))


def calls_by_function(mod: tvm.IRModule) -> dict:
    """GlobalVar -> every call of it in the module's relax functions."""
    calls: dict = {}

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, relax.GlobalVar):
            calls.setdefault(expr.op, []).append(expr)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return calls


def fused_with_constant_weights(mod: tvm.IRModule, qualifies: Callable[[relax.Call], bool],
                                accepts: Callable[[GenericConst], bool] = lambda constant: True) -> dict:
    """Fused function -> positions of its qualifying ops' weight parameters, where every call passes a
    constant there that `accepts` takes."""
    calls = calls_by_function(mod)
    fused = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, relax.Function) or gv.name_hint == "main":
            continue
        positions = weight_parameters(func, qualifies)
        if positions and calls.get(gv) and all(isinstance(c.args[i], GenericConst) and accepts(c.args[i])
                                               for c in calls[gv] for i in positions):
            fused[gv] = positions
    return fused
