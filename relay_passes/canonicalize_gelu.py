"""Rewrite GELU written out as elementwise math (as older exporters emit it) into `R.nn.gelu` /
`R.nn.gelu_tanh`, so fusion sees one activation instead of five to eight ops.

    erf form:   0.5 * x * (1 + erf(x / sqrt(2)))           (or x * 1/sqrt(2))
    tanh form:  0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))

The factors may come in any order; every constant is checked before anything is rewritten.
"""

from __future__ import annotations

import math

from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from relay_passes.rewrite_forms import Form, close, either, forms_pass, scalar

_MUL, _ADD = "relax.multiply", "relax.add"
# exporters round sqrt(2/pi) and 0.044715 differently; 1e-4 still tells GELU from anything else
_GELU_TOL = 1e-4


def _gelu_shell(x, core):
    """0.5 * x * (1 + core), in the factor orders exporters produce; returns (pattern, const roles)."""
    one, half = is_const(), is_const()
    one_plus = either(_ADD, core, one)
    pattern = (either(_MUL, either(_MUL, x, one_plus), half)
               | either(_MUL, either(_MUL, x, half), one_plus)
               | either(_MUL, x, either(_MUL, one_plus, half)))
    return pattern, {one: 1.0, half: 0.5}


def _constants_are(matches, roles) -> bool:
    return all(close(scalar(matches[p]), value, _GELU_TOL) for p, value in roles.items())


def _erf_gelu() -> Form:
    x, scale = wildcard(), is_const()
    divided, multiplied = is_op("relax.divide")(x, scale), either(_MUL, x, scale)
    pattern, roles = _gelu_shell(x, is_op("relax.erf")(divided | multiplied))

    def build(matches):
        wanted = math.sqrt(2) if divided in matches else 1 / math.sqrt(2)
        if not _constants_are(matches, {**roles, scale: wanted}):
            return None
        return relax.op.nn.gelu(matches[x])

    return Form("gelu", pattern, build)


def _tanh_gelu() -> Form:
    x, k, s = wildcard(), is_const(), is_const()
    cube = is_op("relax.power")(x, is_const()) | is_op(_MUL)(is_op(_MUL)(x, x), x)
    inner = either(_MUL, either(_ADD, x, either(_MUL, cube, k)), s)
    pattern, roles = _gelu_shell(x, is_op("relax.tanh")(inner))
    roles = {**roles, k: 0.044715, s: math.sqrt(2 / math.pi)}

    def build(matches):
        return relax.op.nn.gelu_tanh(matches[x]) if _constants_are(matches, roles) else None

    return Form("gelu_tanh", pattern, build)


CanonicalizeGelu = forms_pass("quantvm.CanonicalizeGelu", lambda: [_erf_gelu(), _tanh_gelu()])
