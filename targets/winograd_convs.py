"""Which convs run as Winograd (targets.winograd), with which output tile, and the graph rewrite that makes
them: each one's constant weight transformed at compile time, its conv2d a call of the Winograd kernel.

A conv qualifies when it is fp32 in the blocked layout, 3x3, stride 1 (any dilation), no groups, with a
constant weight, and whole tiles do at most half the multiply-adds of the direct conv (a dilation of d, d x d
phases of whole tiles). Its tile is F(4x4, 3x3) where every transformed weight serves enough tiles, else
F(2x2, 3x3). F(4x4)'s weights are 36/9 = 4x the direct conv's and F(2x2)'s 16/9: with few tiles a
F(4x4) GEMM streams its weights from memory. Measured on Zen 5 (2 FMAs of 512 bits a cycle), ResNet-50 at
batch 1, against the direct conv: 7x7 maps (4 tiles of 4x4) 0.7x, so they stay direct (F(2x2) does over
half the direct work there); 14x14 of 256 channels F(4x4) 1.4x, F(2x2) 1.6x; 28x28 F(4x4) 2.3x, F(2x2)
1.7x; 56x56 F(4x4) 2.3x, F(2x2) 1.4x. At batch 8 a 7x7 map's 32 tiles make F(4x4) about 2x (2.2-2.7 ms,
where the strided conv with the same multiply-adds takes 5.5 ms). (On Zen 4, whose
FMAs are half as fast, F(4x4) won everywhere, 7x7 maps at batch 1 1.5x.) The error to an fp64 conv is about
3x the direct conv's for F(4x4) (~3e-6 of the output's range), less for F(2x2).

The rewrite runs on the fused graph, before the ops become kernels: a fused function reads its weight as a
parameter, so it is rewritten once and every call of it given its transformed constant (one that some call
passes a computed weight to stays direct).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.ir.expr import GenericConst

from targets.constant_weights import (
    fused_with_constant_weights,
    is_conv,
    weight_readers,
)
from targets.winograd import (
    KERNEL,
    conv2d_winograd_nchwc,
    winograd_weight,
    winograd_weight_shape,
)

TILES = (4, 2)  # F(m x m, 3x3) output tiles, preferred first
MAX_WORK_SHARE = 0.5  # of the direct conv's multiply-adds, that whole tiles may do
# F(4x4) only where each transformed weight serves this many tiles (images included): below it, streaming
# its weights costs more than the multiply-adds it saves (see above).
MIN_TILES_PER_WEIGHT = 32
# Input channel blocks narrower than this (a 3-channel image) stay direct: the transforms' share grows as the
# GEMMs' reduction shrinks, and their vectors are only as wide as the block.
MIN_INPUT_BLOCK = 8


def winograd_tile(call: relax.Call) -> int | None:
    """The output tile m of the F(m x m, 3x3) that computes this conv2d, its weight aside (targets.winograd's
    shapes); None where it stays direct."""
    if not is_conv(call):
        return None
    attrs, data, weight = call.attrs, call.args[0].ty, call.args[1].ty
    if (len(attrs.data_layout) == 4 or data.dtype != "float32" or weight.dtype != "float32"
            or call.ty.dtype != "float32" or weight.ndim != 6 or int(attrs.groups) != 1
            or any(int(s) != 1 for s in attrs.strides)
            or (int(weight.shape[2]), int(weight.shape[3])) != (KERNEL, KERNEL)
            or int(weight.shape[4]) < MIN_INPUT_BLOCK):
        return None
    images, out_h, out_w = int(call.ty.shape[0]), int(call.ty.shape[2]), int(call.ty.shape[3])
    dil_h, dil_w = (int(d) for d in attrs.dilation)
    for tile in TILES:
        tiles = -(-out_h // (tile * dil_h)) * -(-out_w // (tile * dil_w)) * dil_h * dil_w
        if tiles * (tile + KERNEL - 1) ** 2 > MAX_WORK_SHARE * KERNEL * KERNEL * out_h * out_w:
            continue
        if tile == TILES[-1] or images * tiles >= MIN_TILES_PER_WEIGHT:
            return tile
    return None


def qualifies(call: relax.Call) -> bool:
    return winograd_tile(call) is not None


def _transformed(constant: GenericConst, tile: int) -> GenericConst:
    return relax.const(winograd_weight(constant.value.numpy(), tile))


def _weight_tiles(func: relax.Function) -> dict[int, int]:
    """Positions of `func`'s parameters that Winograd convs read as their weight -> those convs' tiles."""
    return {i: winograd_tile(conv) for i, conv in weight_readers(func, qualifies).items()}


@relax.expr_functor.mutator
class _WinogradCalls(relax.PyExprMutator):
    """Qualifying conv2d calls -> the Winograd kernel. A conv's weight is a constant (transformed here) or a
    parameter in `weights` (a fused function's, mapped to its transformed replacement); calls of a function
    in `fused` (-> its weight parameters' positions -> their tiles) pass their constants transformed."""

    def __init__(self, mod, weights: dict, fused: dict):
        super().__init__(mod)
        self.weights, self.fused = weights, fused
        self.replaced = {}  # fused function -> its rewritten self

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if isinstance(call.op, relax.GlobalVar) and call.op in self.fused:
            tiles = self.fused[call.op]
            args = [_transformed(a, tiles[i]) if i in tiles else a for i, a in enumerate(call.args)]
            return relax.Call(self.replaced[call.op], args)
        tile = winograd_tile(call)
        if tile is None:
            return call
        weight = call.args[1]
        if isinstance(weight, GenericConst):
            weight = _transformed(weight, tile)
        elif weight in self.weights:
            weight = self.weights[weight]
        else:
            return call
        return self.builder_.call_te(conv2d_winograd_nchwc, call.args[0], weight,
                                     [int(p) for p in call.attrs.padding], [int(d) for d in call.attrs.dilation],
                                     tile,
                                     primfunc_name_hint="conv2d_winograd_nchwc")


def winograd_convs(mod: tvm.IRModule) -> tvm.IRModule:
    """Every qualifying conv with a constant weight computed by the Winograd kernel."""
    fused = {gv: _weight_tiles(mod[gv]) for gv in fused_with_constant_weights(mod, qualifies)}
    mutator = _WinogradCalls(mod, {}, fused)
    for gv, tiles in fused.items():
        func = mod[gv]
        params = list(func.params)
        for i, tile in tiles.items():
            shape = winograd_weight_shape(params[i].ty.shape, tile)
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
