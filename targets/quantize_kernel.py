"""relax.quantize by one scale for the whole tensor, as a multiply by its reciprocal.

TVM's own lowering divides each element by the scale: `vdivps`, which on Zen 3 issues once every 3.5 cycles
against two multiplies a cycle. Every int8 conv's epilogue ends in the quantize of its output (the next conv's
input), so the divide sat on each tile's store: SqueezeNet's int8 build ran 2-3% faster without it. The scale
is a compile-time constant (a calibrated range), or a scalar computed at run time (dynamic quantization), whose
reciprocal the loop computes once. A per-channel scale keeps TVM's lowering.

x * (1/s) can differ from x / s by one rounding, so a value within an ulp of a rounding boundary may land on
the neighbouring integer: the error a quantize already makes, half a step, is at most one ulp larger.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.relax.transform.legalize_ops.qdq import clip_cast

from targets.channel_padding import static_shape
from targets.rounding import round_half_even


def _one_element(expr) -> bool:
    """A tensor of one element (any rank), by its static shape."""
    shape = static_shape(expr)
    return shape is not None and all(d == 1 for d in shape)


def _constant(expr) -> float | None:
    """The value of a one-element constant, else None (a run-time scalar)."""
    return float(expr.value.numpy().reshape(())) if isinstance(expr, tvm.ir.expr.GenericConst) else None


def quantized_by_reciprocal(scale, zero_point, out_dtype: str):
    """(compute, its parameters after the data) for clip(round(data * (1 / scale)) + zero_point): constants
    are written into the kernel, a run-time scale or zero point is read from a parameter."""
    scale_value, zero_value = _constant(scale), _constant(zero_point)

    def compute(data, *params):
        given = iter(params)

        def read():
            tensor = next(given)
            return tensor[(0,) * len(tensor.shape)].astype("float32")

        if scale_value is None:  # divided once, outside the loop (the load does not vary in it)
            inverse = tirx.const(1.0, "float32") / read()
        else:
            inverse = tirx.const(float(np.float32(1) / np.float32(scale_value)), "float32")
        offset = read() if zero_value is None else tirx.const(zero_value, "float32")
        return te.compute(data.shape, lambda *i: clip_cast(round_half_even(data[i] * inverse) + offset, out_dtype),
                          name="quantized")

    return compute, [e for e, v in ((scale, scale_value), (zero_point, zero_value)) if v is None]


def legalize_quantize(default):
    """A LegalizeOps override for relax.quantize to float32 data: one scale and zero point here, the rest
    (per-channel) to `default`."""

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        data, scale, zero_point = call.args
        if not (_one_element(scale) and _one_element(zero_point) and str(data.ty.dtype) == "float32"):
            return default(bb, call)
        compute, params = quantized_by_reciprocal(scale, zero_point, str(call.attrs.out_dtype))
        return bb.call_te(compute, data, *params, primfunc_name_hint="quantize")

    return legalize
