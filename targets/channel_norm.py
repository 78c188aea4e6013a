"""A layer norm over the channels of a blocked tensor, computed in the blocked layout.

A channels-first layer norm (ConvNeXt's, relay_passes.canonicalize_channels_last) normalises each pixel over
axis 1. TVM's layout rule for layer_norm fails on an NCHW{c} input, so the conversion leaves it in NCHW between
two layout transforms: NCHW{b}c -> NCHW -> layer_norm -> NCHW -> NCHW{b}c. In the blocked layout the channels
are axes 1 and 4, so this rewrites that chain into one layer norm over both axes, its gamma and beta reshaped
to [C/b, b], and no tensor is transformed between the two blocked ops.
"""

from __future__ import annotations

import tvm
from tvm import relax

from targets.channel_gather import is_channel_blocking
from targets.channel_padding import op_name, static_shape


def is_channel_norm(call: relax.Call) -> bool:
    """A layer norm of a 4-D tensor over axis 1 alone."""
    if op_name(call) != "relax.nn.layer_norm":
        return False
    shape = static_shape(call.args[0])
    return shape is not None and len(shape) == 4 and [int(a) % 4 for a in call.attrs.axes] == [1]


def channel_norm_rule(tvm_rule):
    """A channel norm of a blocked tensor takes ConvertLayout's default policy (NCHW, its input transformed
    back) instead of TVM's rule, which fails on it; `blocked_channel_norms` then moves it into the blocked
    layout."""

    def rule(call, desired_layouts, var_layout_map):
        if is_channel_norm(call):
            return None
        return tvm_rule(call, desired_layouts, var_layout_map)

    return rule


def _blocked_parameter(param: relax.Expr, blocks: int, lanes: int) -> relax.Expr:
    if isinstance(param, tvm.ir.expr.GenericConst):
        return relax.const(param.value.numpy().reshape(blocks, lanes))
    return relax.op.reshape(param, (blocks, lanes))


# Elementwise ops that may stand between the norm and the transform back to the blocked layout (the int8
# rewrite quantizes the norm's output there): they take any layout when their other arguments are scalars.
ELEMENTWISE_AFTER_NORM = ("relax.quantize", "relax.dequantize", "relax.clip", "relax.nn.relu")


def _scalar_arguments(call: relax.Call) -> bool:
    return all(not isinstance(a.ty, relax.TensorType) or a.ty.ndim == 0 for a in call.args[1:])


@relax.expr_functor.mutator
class _BlockedChannelNorms(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if op_name(call) != "relax.layout_transform":
            return call
        after, value = [], self._bound(call.args[0])
        while op_name(value) in ELEMENTWISE_AFTER_NORM and _scalar_arguments(value):
            after.append(value)
            value = self._bound(value.args[0])
        norm = value
        if norm is None or not is_channel_norm(norm):
            return call
        unblock = self._bound(norm.args[0])
        if op_name(unblock) != "relax.layout_transform":
            return call
        source, plain, out = static_shape(unblock.args[0]), static_shape(unblock), static_shape(call)
        if not (source and plain and out and source == out and len(out) == 5
                and is_channel_blocking(source, plain) and is_channel_blocking(out, static_shape(norm))
                and _maps_channel(unblock, out[4], to_blocked=False) and _maps_channel(call, out[4], to_blocked=True)):
            return call
        blocks, lanes = out[1], out[4]
        a = norm.attrs
        value = relax.op.nn.layer_norm(unblock.args[0], _blocked_parameter(norm.args[1], blocks, lanes),
                                       _blocked_parameter(norm.args[2], blocks, lanes), axes=[1, 4],
                                       epsilon=float(a.epsilon), center=bool(a.center), scale=bool(a.scale))
        for op in reversed(after):
            value = relax.Call(op.op, [self.builder_.emit(value), *op.args[1:]], op.attrs)
        return value

    def _bound(self, expr):
        return self.lookup_binding(expr) if isinstance(expr, relax.Var) else None


def _maps_channel(transform: relax.Call, lanes: int, to_blocked: bool) -> bool:
    """The transform's index map is NCHW <-> NCHW{lanes}c (checked on one index with every axis distinct)."""
    index_map = transform.attrs.index_map
    if transform.attrs.pad_value is not None:
        return False
    indices, wanted = ([0, lanes + 1, 2, 3], [0, 1, 2, 3, 1]) if to_blocked else ([0, 1, 2, 3, 4], [0, lanes + 4, 2, 3])
    try:
        mapped = [int(v) for v in index_map.map_indices(indices)]  # constants in, constants out
    except (TypeError, ValueError):
        return False
    return mapped == wanted


def blocked_channel_norms(mod: tvm.IRModule) -> tvm.IRModule:
    """Every channel norm between blocked tensors as a layer norm in the blocked layout (see the module)."""
    mutator = _BlockedChannelNorms(mod)
    for gvar, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gvar] = relax.analysis.remove_all_unused(mutator.visit_expr(func))
    return relax.transform.Normalize()(mod)


# --- the kernel's schedule ---------------------------------------------------------------------------------

def is_blocked_channel_norm(sch) -> bool:
    """The kernel is TOPI's layer norm (its T_layer_norm block) over axes 1 and 4 of a 5-D (NCHW{c}) tensor:
    its reductions run (n, h, w, k1, k4) and write [n, h, w]."""
    from targets.schedules import _all_blocks, _is_reduction

    blocks = list(_all_blocks(sch))
    reductions = [b for b in blocks if _is_reduction(sch, b)]
    if (not reductions or not any(sch.get(b).name_hint == "T_layer_norm" for b in blocks)
            or len(sch.get(blocks[-1]).writes[0].region) != 5):
        return False
    kinds = "".join("R" if iv.iter_type == tvm.tirx.IterVar.CommReduce else "S" for iv in
                    sch.get(reductions[0]).iter_vars)
    return all(len(sch.get(b).writes[0].region) == 3 for b in reductions) and kinds == "SSSRR"


def schedule_channel_norm(sch, spec) -> None:
    """Parallel over image rows (n, h); under each row, every pixel's sums over the channels as one vector of
    lane partials (the block axis summed into it, the lanes summed once at the end), then the normalization
    vectorized over the lanes. TOPI's order would redo a pixel's reduction for every channel block."""
    from targets.schedules import _all_blocks, _is_reduction

    *passes, output = _all_blocks(sch)
    for block in passes:
        if not _is_reduction(sch, block):
            sch.compute_inline(block)  # the mean into the variance, the normalization into an epilogue
    passes = list(_all_blocks(sch))[:-1]
    n, blocks, h, w, lanes = sch.get_loops(output)
    sch.reorder(n, h, blocks, w, lanes)
    row = sch.fuse(n, h)
    partials = []
    for block in passes:
        if _is_reduction(sch, block):
            partials.append(sch.rfactor(sch.get_loops(block)[-1], factor_axis=3))
    for block in reversed(list(_all_blocks(sch))[:-1]):
        sch.compute_at(block, row)
    sch.parallel(row)
    for partial in partials:
        # under the row: (w, k1, k4): the lanes innermost, the block axis summed into them
        _, lane, width, block = sch.get_loops(partial)  # compute_at's order: the rfactor block's iterators
        sch.reorder(width, block, lane)
        sch.vectorize(lane)
        init = sch.decompose_reduction(partial, block)
        sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(lanes)
