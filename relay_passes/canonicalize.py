"""Rewrite GELU written out as elementwise math (as older exporters emit it) into `R.nn.gelu` /
`R.nn.gelu_tanh`, so fusion sees one activation instead of five to eight ops.

    erf form:   0.5 * x * (1 + erf(x / sqrt(2)))           (or x * 1/sqrt(2))
    tanh form:  0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))

The factors may come in any order; every constant is checked before anything is rewritten.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

_MUL, _ADD = "relax.multiply", "relax.add"


def _either(op, a, b):
    return is_op(op)(a, b) | is_op(op)(b, a)


def _close(const, value: float) -> bool:
    array = const.value.numpy()
    return array.size == 1 and math.isclose(float(array.reshape(())), value, rel_tol=1e-4)


def _gelu_shell(x, core):
    """0.5 * x * (1 + core), in the factor orders exporters produce; returns (pattern, const roles)."""
    one, half = is_const(), is_const()
    one_plus = _either(_ADD, core, one)
    pattern = (_either(_MUL, _either(_MUL, x, one_plus), half)
               | _either(_MUL, _either(_MUL, x, half), one_plus)
               | _either(_MUL, x, _either(_MUL, one_plus, half)))
    return pattern, {"one": (one, 1.0), "half": (half, 0.5)}


def _erf_gelu():
    x, scale = wildcard(), is_const()
    divided, multiplied = is_op("relax.divide")(x, scale), _either(_MUL, x, scale)
    pattern, roles = _gelu_shell(x, is_op("relax.erf")(divided | multiplied))
    return pattern, x, roles, (divided, scale), relax.op.nn.gelu


def _tanh_gelu():
    x, k, s = wildcard(), is_const(), is_const()
    cube = is_op("relax.power")(x, is_const()) | is_op(_MUL)(is_op(_MUL)(x, x), x)
    inner = _either(_MUL, _either(_ADD, x, _either(_MUL, cube, k)), s)
    pattern, roles = _gelu_shell(x, is_op("relax.tanh")(inner))
    roles = {**roles, "k": (k, 0.044715), "s": (s, math.sqrt(2 / math.pi))}
    return pattern, x, roles, None, relax.op.nn.gelu_tanh


def _rewriter(x, roles, erf_scale, make):
    def rewrite(expr, matches):
        for const_pattern, value in roles.values():
            if not _close(matches[const_pattern], value):
                return expr
        if erf_scale is not None:
            divided, scale = erf_scale
            wanted = math.sqrt(2) if divided in matches else 1 / math.sqrt(2)
            if not _close(matches[scale], wanted):
                return expr
        return make(matches[x])

    return rewrite


@tvm.transform.module_pass(opt_level=0, name="quantvm.CanonicalizeGelu")
def CanonicalizeGelu(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 (TVM pass naming)
    for gvar, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            for build in (_erf_gelu, _tanh_gelu):
                pattern, x, roles, erf_scale, make = build()
                func = relax.dpl.rewrite_call(pattern, _rewriter(x, roles, erf_scale, make), func)
            mod[gvar] = relax.analysis.remove_all_unused(func)
    return mod

