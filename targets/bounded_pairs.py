"""int8 convs and FCs whose constant weight has bounded pairs (|w[2j]| + |w[2j+1]| <= PAIR_BOUND), marked for
the `vpmaddubsw` intrinsic on a CPU without VNNI (targets.intrinsics). The quantizer bounds the pairs on such
a target (relay_passes.weight_pairs); here each op's constant is checked, at every call of its fused
function, so a weight that misses the bound (or is computed at run time) keeps the exact `vpmaddwd` form.

Runs on the fused graph, before LegalizeOps: the marked ops become their kernel's call here, the others are
legalized as usual.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.ir.expr import GenericConst

from targets.constant_weights import fused_with_constant_weights, is_conv, is_op, weight_source
from targets.conv2d import conv2d_call
from targets.dense import matmul_whole_rows, whole_rows
from targets.intrinsics import GROUP, needs_bounded_pairs, pairs_are_bounded
from targets.layout import vector_lanes
from targets.registry import TargetSpec


def qualifies(call: relax.Call) -> bool:
    """A blocked int8 conv reading its weight in the dot intrinsics' packing [O/b, C/4, KH, KW, b, 4], or an
    int8 FC whose weight is unpacked from [N/b, K/4, b, 4] (targets.layout)."""
    if is_conv(call):
        weight = call.args[1].ty
        return (len(call.attrs.data_layout) != 4 and call.args[0].ty.dtype in ("uint8", "int8")
                and weight.dtype == "int8" and weight.ndim == 6 and int(weight.shape[5]) == GROUP)
    return (is_op(call, "relax.matmul") and call.args[0].ty.dtype in ("uint8", "int8")
            and call.args[1].ty.dtype == "int8" and call.args[1].ty.ndim == 2 and call.ty.dtype == "int32")


def bounded_constant(constant: GenericConst) -> bool:
    """A packed weight (a conv's 6-D one, an FC's 4-D one; a plain [K, N] FC weight is not read in pairs)
    with bounded pairs."""
    shape = [int(d) for d in constant.ty.shape.values]
    return len(shape) in (4, 6) and shape[-1] == GROUP and pairs_are_bounded(constant.value.numpy())


@relax.expr_functor.mutator
class _MarkBounded(relax.PyExprMutator):
    """Qualifying ops whose weight is a bounded constant, or a parameter in `weights`, as marked kernels."""

    def __init__(self, mod, tile_lanes: int):
        super().__init__(mod)
        self.tile_lanes = tile_lanes
        self.weights = set()
        self.values = {}

    def visit_call_(self, call):
        source = weight_source(call, self.values) if isinstance(call, relax.Call) and qualifies(call) else None
        call = super().visit_call_(call)
        if source is None or not (source in self.weights or (isinstance(source, GenericConst) and bounded_constant(source))):
            return call
        if is_conv(call):
            return conv2d_call(self.builder_, call, self.tile_lanes, bounded_pairs=True)
        return self.builder_.call_te(matmul_whole_rows, call.args[0], call.args[1], whole_rows(call, self.tile_lanes),
                                     True, primfunc_name_hint="matmul")

    def visit_var_binding_(self, binding):
        self.values[binding.var] = binding.value
        super().visit_var_binding_(binding)


def bounded_pair_ops(mod: tvm.IRModule, spec: TargetSpec) -> tvm.IRModule:
    """Every qualifying op with bounded constant weights as its marked kernel, on a target without VNNI."""
    if not needs_bounded_pairs(spec):
        return mod
    mutator = _MarkBounded(mod, vector_lanes(spec))
    for gv, positions in fused_with_constant_weights(mod, qualifies, bounded_constant).items():
        func = mod[gv]
        mutator.weights = {func.params[i] for i in positions}
        body = mutator.visit_expr(func.body)
        mutator.builder_.update_func(gv, relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs))
    mutator.weights = set()
    main = mutator.visit_expr(mod["main"])
    mutator.builder_.update_func(mod.get_global_var("main"), main)
    return mutator.builder_.get()
