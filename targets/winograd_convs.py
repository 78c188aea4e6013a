"""Which convs run as Winograd (targets.winograd), and the graph rewrite that makes them: each one's constant
weight transformed at compile time, its conv2d a call of the Winograd kernel.

A conv qualifies when it is fp32 in the blocked layout, 3x3, stride 1 (any dilation), no groups, with a
constant weight, and whole tiles do at most half the multiply-adds of the direct conv (a 7x7 map computes
two 4x4 tiles a side: 36 x 4 against 9 x 49; a dilation of d, d x d phases of whole tiles). Measured
against the direct conv on Zen 4: 1.5x at 7x7, 2-3x from 14x14 up, 1.5x for 16 input channels; the error to an fp64 conv is about 3x the direct conv's (~3e-6
of the output's range).

The rewrite runs on the fused graph, before the ops become kernels: a fused function reads its weight as a
parameter, so it is rewritten once and every call of it given its transformed constant (one that some call
passes a computed weight to stays direct).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.ir.expr import GenericConst

from targets.constant_weights import fused_with_constant_weights, is_conv
from targets.winograd import (
    KERNEL,
    conv2d_winograd_nchwc,
    winograd_weight,
    winograd_weight_shape,
)

TILE = 4  # F(4x4, 3x3): faster than F(2x2, 3x3) on every shape measured, 7x7 maps and batch 8 included
MAX_WORK_SHARE = 0.5  # of the direct conv's multiply-adds, that whole tiles may do
# Input channel blocks narrower than this (a 3-channel image) stay direct: the transforms' share grows as the
# GEMMs' reduction shrinks, and their vectors are only as wide as the block.
MIN_INPUT_BLOCK = 8


def qualifies(call: relax.Call) -> bool:
    """A conv2d the Winograd kernel computes, its weight aside (targets.winograd's shapes)."""
    if not is_conv(call):
        return False
    attrs, data, weight = call.attrs, call.args[0].ty, call.args[1].ty
    if (len(attrs.data_layout) == 4 or data.dtype != "float32" or weight.dtype != "float32"
            or call.ty.dtype != "float32" or weight.ndim != 6 or int(attrs.groups) != 1
            or any(int(s) != 1 for s in attrs.strides)
            or (int(weight.shape[2]), int(weight.shape[3])) != (KERNEL, KERNEL)
            or int(weight.shape[4]) < MIN_INPUT_BLOCK):
        return False
    out_h, out_w = int(call.ty.shape[2]), int(call.ty.shape[3])
    dil_h, dil_w = (int(d) for d in attrs.dilation)
    tiles = -(-out_h // (TILE * dil_h)) * -(-out_w // (TILE * dil_w)) * dil_h * dil_w
    return tiles * (TILE + KERNEL - 1) ** 2 <= MAX_WORK_SHARE * KERNEL * KERNEL * out_h * out_w


def _transformed(constant: GenericConst) -> GenericConst:
    return relax.const(winograd_weight(constant.value.numpy(), TILE))


@relax.expr_functor.mutator
class _WinogradCalls(relax.PyExprMutator):
    """Qualifying conv2d calls -> the Winograd kernel. A conv's weight is a constant (transformed here) or a
    parameter in `weights` (a fused function's, mapped to its transformed replacement); calls of a function
    in `fused` (-> its weight parameters' positions) pass their constants transformed."""

    def __init__(self, mod, weights: dict, fused: dict):
        super().__init__(mod)
        self.weights, self.fused = weights, fused
        self.replaced = {}  # fused function -> its rewritten self

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if isinstance(call.op, relax.GlobalVar) and call.op in self.fused:
            args = [_transformed(a) if i in self.fused[call.op] else a for i, a in enumerate(call.args)]
            return relax.Call(self.replaced[call.op], args)
        if not qualifies(call):
            return call
        weight = call.args[1]
        if isinstance(weight, GenericConst):
            weight = _transformed(weight)
        elif weight in self.weights:
            weight = self.weights[weight]
        else:
            return call
        return self.builder_.call_te(conv2d_winograd_nchwc, call.args[0], weight,
                                     [int(p) for p in call.attrs.padding], [int(d) for d in call.attrs.dilation],
                                     TILE,
                                     primfunc_name_hint="conv2d_winograd_nchwc")


def winograd_convs(mod: tvm.IRModule) -> tvm.IRModule:
    """Every qualifying conv with a constant weight computed by the Winograd kernel."""
    fused = fused_with_constant_weights(mod, qualifies)
    mutator = _WinogradCalls(mod, {}, fused)
    for gv, positions in fused.items():
        func = mod[gv]
        params = list(func.params)
        for i in positions:
            shape = winograd_weight_shape(params[i].ty.shape, TILE)
            params[i] = relax.Var(params[i].name, relax.TensorType(shape, "float32"))
            mutator.weights[func.params[i]] = params[i]
        body = mutator.visit_expr(func.body)
        # a new function, its name marked (a GlobalVar's type is its function's: the old one cannot be updated)
        mutator.replaced[gv] = mutator.builder_.add_func(
            relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs), gv.name_hint + "_winograd")
    main = mutator.visit_expr(mod["main"])
    mutator.builder_.update_func(mod.get_global_var("main"), main)
    result = mutator.builder_.get()
    for gv in fused:
        del result[gv]
    return result
