"""What the canonicalisation passes share: a decomposed form (`Form`) is a dpl pattern plus a builder that
checks every matched constant and returns the single op, and `forms_pass` applies a list of them to every
Relax function of a module.

A builder returns None when a constant or a shape says the match is not that op after all (a HardSwish
with 5 instead of 6, a mean over another axis); the graph then stays as it was.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import DFPattern, is_op

from relay_passes.kernel_origins import bindings_of, tag_sources

# Exporters write 1/6 as 0.16666670143604279 (Paddle) or 0.16666667 (float32): both are within 1e-6.
REL_TOL = 1e-6


def either(op: str, a: DFPattern, b: DFPattern) -> DFPattern:
    """A commutative binary op with its operands in either order."""
    return is_op(op)(a, b) | is_op(op)(b, a)


def scalar(expr) -> float | None:
    """The value of a one-element constant or a PrimValue (a clip bound), else None."""
    if isinstance(expr, tvm.ir.expr.GenericConst):
        array = expr.value.numpy()
        return float(array.reshape(())) if array.size == 1 else None
    value = getattr(expr, "value", None)  # a FloatImm / IntImm
    return float(value) if isinstance(value, (int, float)) else None


def close(value: float | None, wanted: float, rel_tol: float = REL_TOL) -> bool:
    return value is not None and math.isclose(value, wanted, rel_tol=rel_tol)


def is_value(expr, wanted: float) -> bool:
    """`expr` is a scalar constant (or PrimValue) equal to `wanted`."""
    return close(scalar(expr), wanted)


def all_values(matches, wanted: dict[DFPattern, float]) -> bool:
    """Every pattern in `wanted` matched a scalar equal to its value."""
    return all(is_value(matches[p], v) for p, v in wanted.items())


def float_const(value: float, like: relax.Expr) -> relax.Constant:
    """A scalar constant of `like`'s dtype."""
    return relax.const(np.array(value, dtype=str(like.ty.dtype)))


@dataclass(frozen=True)
class Form:
    """One way exporters write an op: `build(matches)` gives the single op, or None to leave the match alone."""

    name: str
    pattern: DFPattern
    build: Callable[[dict], relax.Expr | None]


def forms_pass(name: str, forms: Callable[[], list[Form]]) -> tvm.transform.Pass:
    """A module pass rewriting `forms()` in order, one sweep each, over every Relax function.

    Sweeps run in list order, so a longer form (layer norm with its gamma) is tried before a form it
    contains (the bare normalisation) can take part of it.
    """

    def apply(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                for form in forms():
                    replaced: dict = {}
                    func = relax.dpl.rewrite_call(form.pattern, _rewriter(form, _bound_names(func), replaced), func)
                    func = _tags_restored(func, replaced)
                mod[gvar] = relax.analysis.remove_all_unused(func)
        return mod

    return tvm.transform.module_pass(apply, opt_level=0, name=name)


def _bound_names(func: relax.Function) -> dict:
    """Each bound call -> the name of its variable, where no other binding has that name."""
    names = Counter(b.var.name for b in bindings_of(func))
    return {b.value: b.var.name for b in bindings_of(func) if isinstance(b.value, relax.Call) and names[b.var.name] == 1}


def _rewriter(form: Form, bound_names: dict, replaced: dict):
    """The rewrite callback. rewrite_call binds a replacement to the replaced call's variable but drops the
    call's span, its source tag (relay_passes.kernel_origins): `replaced` gets variable name -> tag."""
    def rewrite(expr, matches):
        replacement = form.build(matches)
        if replacement is None:
            return expr
        name, span = bound_names.get(expr), expr.span
        if name is not None and span is not None and span.source_name is not None:
            replaced[name] = span.source_name.name
        return replacement

    return rewrite


def _tags_restored(func: relax.Function, replaced: dict) -> relax.Function:
    """`func` with the untagged call bound to each name in `replaced` tagged as the call it replaced."""
    names = Counter(b.var.name for b in bindings_of(func))
    sources = {b.var: replaced[b.var.name] for b in bindings_of(func)
               if b.var.name in replaced and names[b.var.name] == 1 and isinstance(b.value, relax.Call)
               and b.value.span is None}
    return tag_sources(func, sources) if sources else func
