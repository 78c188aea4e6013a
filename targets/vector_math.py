"""LLVM lowerings of float32 `erf` and `exp` to arithmetic that vectorizes, instead of libm's `erff`/`expf`,
which LLVM calls one element at a time (a GELU or softmax loop then stays scalar). Registered on import,
above TVM's own lowering (level 10); other dtypes keep TVM's. The forms are topi.fast_erf's and
topi.fast_exp's: within 2e-7 of erf, and 3e-7 relative of exp.
"""

from __future__ import annotations

import tvm
from tvm import tirx

# Eigen's float erf: x * P(x^2) / Q(x^2) on x clamped to [-4, 4] (erf is +-1 to float precision beyond).
ERF_CLAMP = 4.0
ERF_NUMERATOR = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
                 -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
ERF_DENOMINATOR = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
                   -1.42647390514189e-02)
# exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2]; exp(r) by its Taylor-like
# polynomial 1 + r + r^2 * P(r). x is clamped where 2^n stays a normal float.
EXP_HIGH, EXP_LOW = 88.3762626647950, -88.3762626647949
LOG2E, LN2 = 1.44269504088896341, 0.6931471805599453
EXP_POLYNOMIAL = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
                  5.0000001201e-1)
FLOAT_EXPONENT_BIAS, FLOAT_MANTISSA_BITS = 127, 23


def _f32(value: float):
    return tirx.const(value, "float32")


def _horner(x, coefficients):
    result = _f32(coefficients[0])
    for c in coefficients[1:]:
        result = result * x + _f32(c)
    return result


def _is_float32(call) -> bool:
    """float32 or a float32 vector (the loop may be vectorized already when intrinsics are lowered)."""
    dtype = str(call.ty)
    return dtype == "float32" or dtype.startswith("float32x")


def polynomial_erf(call):
    x = tirx.max(tirx.min(call.args[0], _f32(ERF_CLAMP)), _f32(-ERF_CLAMP))
    square = x * x
    return x * _horner(square, ERF_NUMERATOR) / _horner(square, ERF_DENOMINATOR)


def polynomial_exp(call):
    x_in = call.args[0]
    x = tirx.max(tirx.min(x_in, _f32(EXP_HIGH)), _f32(EXP_LOW))
    n = tirx.floor(x * _f32(LOG2E) + _f32(0.5))
    r = x - n * _f32(LN2)
    mantissa = _horner(r, EXP_POLYNOMIAL) * r * r + r + _f32(1.0)
    int_type = str(call.ty).replace("float32", "int32")
    exponent = tirx.Cast(int_type, n + _f32(FLOAT_EXPONENT_BIAS)) << tirx.const(FLOAT_MANTISSA_BITS, "int32")
    power = tirx.call_intrin(str(call.ty), "tirx.reinterpret", exponent)
    return tirx.max(power * mantissa, x_in)


LOWERING_KEY = "llvm.FLowerIntrinsic"


def _float32_only(op_name: str, lowering):
    """`lowering` for float32, and for other dtypes what TVM registered before (an attribute has one value:
    registering ours replaces TVM's; returning the call unchanged would leave LLVM an unknown intrinsic)."""
    tvm_lowering = tvm.ir.Op.get(op_name).get_attr(LOWERING_KEY)

    def lower(call):
        if _is_float32(call):
            return lowering(call)
        return tvm_lowering(call) if tvm_lowering is not None else call

    return lower


for _op, _lowering in (("tirx.erf", polynomial_erf), ("tirx.exp", polynomial_exp)):
    tvm.ir.register_op_attr(_op, LOWERING_KEY, _float32_only(_op, _lowering), level=11)
