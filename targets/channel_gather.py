"""A gather of channels between two blocked tensors as one blocked kernel.

TVM's take has no layout rule, so the layout conversion leaves a channel gather (targets.channel_padding)
in NCHW between two layout transforms: NCHW{b}c -> NCHW -> take -> NCHW -> NCHW{b'}c. This rewrites that
chain into one kernel reading the blocked source and writing the blocked result,

    out[n, c, h, w, i] = x[n, k // b, h, w, k % b],  k = index[c * b' + i],

so no tensor is ever transformed between the two blocked ops.
"""

from __future__ import annotations

import tvm
from tvm import relax, te

from targets.channel_padding import op_name, static_shape

GATHER_KERNEL = "channel_gather"


def _blocked_channel_gather(data, index, out_lanes: int):
    batch, _, height, width, lanes = data.shape
    blocks = index.shape[0] // out_lanes

    def element(n, c, h, w, i):
        k = index[c * out_lanes + i]
        return data[n, k // lanes, h, w, k % lanes]

    return te.compute((batch, blocks, height, width, out_lanes), element, name=GATHER_KERNEL)


@relax.expr_functor.mutator
class _BlockedGathers(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if op_name(call) != "relax.layout_transform":
            return call
        take = self._bound(call.args[0])
        if op_name(take) != "relax.take" or int(take.attrs.axis) != 1:
            return call
        unblock = self._bound(take.args[0])
        index = take.args[1].value.numpy() if isinstance(take.args[1], tvm.ir.expr.GenericConst) else None
        if op_name(unblock) != "relax.layout_transform" or index is None or index.ndim != 1:
            return call
        source, plain, out = static_shape(unblock.args[0]), static_shape(unblock), static_shape(call)
        if not (source and plain and out and len(source) == len(out) == 5 and len(plain) == 4
                and is_channel_blocking(source, plain) and is_channel_blocking(out, static_shape(take))
                and out[1] * out[4] == len(index) and index.max() < plain[1]):
            return call
        return self.builder_.call_te(_blocked_channel_gather, unblock.args[0],
                                     relax.const(index.astype("int32")), out[4],
                                     primfunc_name_hint=GATHER_KERNEL)

    def _bound(self, expr):
        return self.lookup_binding(expr) if isinstance(expr, relax.Var) else None


def is_channel_blocking(blocked: list[int], plain: list[int] | None) -> bool:
    """[N, C/b, H, W, b] is the NCHW{b}c form of [N, C, H, W] (C a multiple of b)."""
    return (plain is not None and len(plain) == 4 and blocked[0] == plain[0] and blocked[2:4] == plain[2:4]
            and blocked[1] * blocked[4] == plain[1])


def blocked_gathers(mod: tvm.IRModule) -> tvm.IRModule:
    """Every channel gather between blocked tensors as one blocked kernel (see the module)."""
    mutator = _BlockedGathers(mod)
    for gvar, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, relax.analysis.remove_all_unused(mutator.visit_expr(func)))
    # the builder's module: it holds the kernels call_te added
    return relax.transform.Normalize()(mutator.builder_.get())
