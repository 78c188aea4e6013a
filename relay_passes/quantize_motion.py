"""Move each int8 op's input quantize above max-pooling, reshapes and concat, so those run on int8 data.

All three commute exactly with a per-tensor quantize (round and clip are monotone, so the max of quantized
values is the quantized max; reshapes and concat move values without touching them):

    quantize(max_pool2d(x))   -> max_pool2d(quantize(x))
    quantize(reshape(x))      -> reshape(quantize(x))
    quantize(concat(a, b))    -> concat(quantize(a), quantize(b))   (one shared scale for every input)

Moved up, the quantize can then end its producer's kernel (requantize in the epilogue), and the pooling or
concat moves a quarter of the bytes. Nothing moves past a value that another op also reads.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from relay_passes.analysis import SingleUse


def _requantize(value, scale, zero_point, attrs):
    return relax.op.quantize(value, scale, zero_point, axis=attrs.axis, out_dtype=str(attrs.out_dtype))


def _rewrite(single_use, movable):
    def rewrite(expr, matches):
        inner = matches[movable]  # the pooling / reshape / concat call itself (expr.args[0] is its var)
        if not single_use(inner):
            return expr
        scale, zero_point, attrs = expr.args[1], expr.args[2], expr.attrs
        if inner.op.name == "relax.concat":
            parts = inner.args[0].fields
            quantized = [_requantize(p, scale, zero_point, attrs) for p in parts]
            return relax.op.concat(quantized, axis=inner.attrs.axis)
        moved = _requantize(inner.args[0], scale, zero_point, attrs)
        if inner.op.name == "relax.nn.max_pool2d":
            a = inner.attrs
            return relax.op.nn.max_pool2d(moved, pool_size=a.pool_size, strides=a.strides, padding=a.padding,
                                          dilation=a.dilation, ceil_mode=a.ceil_mode, layout=a.layout,
                                          out_layout=a.out_layout)
        return relax.op.reshape(moved, inner.args[1])

    return rewrite


def _pattern():
    movable = (is_op("relax.nn.max_pool2d")(wildcard()) | is_op("relax.reshape")(wildcard(), wildcard())
               | is_op("relax.concat")(wildcard()))
    return is_op("relax.quantize")(movable, is_const(), is_const()), movable


@tvm.transform.module_pass(opt_level=0, name="quantvm.MoveQuantizeUp")
def MoveQuantizeUp(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 (TVM pass naming)
    func = mod["main"]
    while True:  # one step per round: a quantize can climb a chain of pool and reshape
        before = func
        pattern, movable = _pattern()
        func = relax.dpl.rewrite_call(pattern, _rewrite(SingleUse(func), movable), func)
        func = relax.analysis.remove_all_unused(func)
        if tvm_ffi.structural_equal(before, func):
            break
    out = tvm.IRModule(dict(mod.functions))
    out["main"] = func
    return relax.transform.Normalize()(out)
