"""Blocked int8 convs on s8 data, on a target whose dot instruction reads u8 (VNNI's `vpdpbusd`; `vpmaddubsw`
on a weight with bounded pairs): the kernel reads the data sign-flipped, as the u8 a + 128, and takes
128 * sum(w) per output channel off its sums (targets.conv2d). Those offsets are computed here from the
constant weight and passed to the kernel as an argument. Otherwise each step of such a conv's dot runs twice:
the dot of a + 128, less that of 128 alone (targets.intrinsics).

The quantizer already stores the s8 data of unpadded convs and of FCs as u8 + 128 (relay_passes.quantize); a
padded conv pads with 0, so its data stays s8 up to here, where the kernel pads the flipped data with 128.

Runs on the fused graph, before LegalizeOps and targets.bounded_pairs: a conv made a kernel call here is
marked for bounded pairs here too. A fused function gets one parameter per such weight; each of its calls
passes the offsets of its own constant.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import GenericConst

from targets.bounded_pairs import bounded_constant, qualifies
from targets.constant_weights import calls_by_function, is_conv, weight_parameters
from targets.conv2d import conv2d_call
from targets.intrinsics import SIGN_FLIP, dot_reads_unsigned, needs_bounded_pairs
from targets.layout import vector_lanes
from targets.registry import TargetSpec


def _signed_conv(call: relax.Call) -> bool:
    return is_conv(call) and qualifies(call) and call.args[0].ty.dtype == "int8"


def signed_offsets(weight: np.ndarray) -> np.ndarray:
    """128 * the sum of each output channel's weights: [O/b, b] from the packed [O/b, C/4, KH, KW, b, 4]."""
    return (SIGN_FLIP * weight.astype(np.int64).sum(axis=(1, 2, 3, 5))).astype(np.int32)


def _kernel_for(spec: TargetSpec, constants: list) -> tuple[bool, bool]:
    """(flipped, bounded) for a signed conv whose weight is each of `constants` at its calls: whether the
    target's dot for it reads u8, and whether that dot is `vpmaddubsw` on bounded pairs."""
    bounded = needs_bounded_pairs(spec) and all(bounded_constant(k) for k in constants)
    return dot_reads_unsigned(spec, bounded), bounded


def _offset_constant(weight: GenericConst) -> relax.Constant:
    return relax.const(signed_offsets(weight.value.numpy()))


@relax.expr_functor.mutator
class _SignFlipped(relax.PyExprMutator):
    """Signed convs as sign-flipped kernel calls: those on a constant weight, and inside a fused function
    those on a weight parameter in `offsets` (-> the offsets' parameter; `bounded`: the parameters whose every
    constant has bounded pairs). Calls of a function in `appended` (-> the positions of its flipped weights)
    call its rewritten self in `replaced`, with the offsets of those weights as extra arguments."""

    def __init__(self, mod, spec: TargetSpec):
        super().__init__(mod)
        self.spec, self.lanes = spec, vector_lanes(spec)
        self.offsets: dict = {}
        self.bounded: set = set()
        self.appended: dict = {}
        self.replaced: dict = {}

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if isinstance(call.op, relax.GlobalVar) and call.op in self.appended:
            offsets = [_offset_constant(call.args[i]) for i in self.appended[call.op]]
            return relax.Call(self.replaced[call.op], list(call.args) + offsets)
        if not _signed_conv(call):
            return call
        weight = call.args[1]
        if isinstance(weight, GenericConst):
            flipped, bounded = _kernel_for(self.spec, [weight])
            return conv2d_call(self.builder_, call, self.lanes, bounded, _offset_constant(weight)) if flipped else call
        if weight in self.offsets:
            return conv2d_call(self.builder_, call, self.lanes, weight in self.bounded, self.offsets[weight])
        return call


def _flipped_weights(spec: TargetSpec, func: relax.Function, calls: list) -> list[tuple[int, bool]]:
    """(position, bounded) of each weight parameter of `func` read by a signed conv, constant at every call,
    on which the target's dot reads u8."""
    flipped = []
    for i in weight_parameters(func, _signed_conv):
        constants = [c.args[i] for c in calls]
        if not all(isinstance(k, GenericConst) for k in constants):
            continue
        reads_unsigned, bounded = _kernel_for(spec, constants)
        if reads_unsigned:
            flipped.append((i, bounded))
    return flipped


def sign_flipped_convs(mod: tvm.IRModule, spec: TargetSpec) -> tvm.IRModule:
    """Every blocked int8 conv on s8 data with a constant weight as a sign-flipped kernel call, on a target
    whose int8 dot reads u8."""
    if not (dot_reads_unsigned(spec) or needs_bounded_pairs(spec)):
        return mod
    calls = calls_by_function(mod)
    mutator = _SignFlipped(mod, spec)
    for gv, func in mod.functions.items():
        if not isinstance(func, relax.Function) or gv.name_hint == "main" or not calls.get(gv):
            continue
        flipped = _flipped_weights(spec, func, calls[gv])
        if not flipped:
            continue
        mutator.offsets, mutator.bounded = {}, set()
        for i, bounded in flipped:
            weight = func.params[i]
            chunks, _, _, _, block, _ = (int(d) for d in weight.ty.shape.values)
            mutator.offsets[weight] = relax.Var(f"{weight.name}_signed_offset",
                                                relax.TensorType([chunks, block], "int32"))
            if bounded:
                mutator.bounded.add(weight)
        body = mutator.visit_expr(func.body)
        params = list(func.params) + [mutator.offsets[func.params[i]] for i, _ in flipped]
        # a new function (a GlobalVar's type is its function's: the old one cannot be updated)
        mutator.replaced[gv] = mutator.builder_.add_func(
            relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs), gv.name_hint + "_signed")
        mutator.appended[gv] = [i for i, _ in flipped]
    mutator.offsets, mutator.bounded = {}, set()
    main = mutator.visit_expr(mod["main"])
    mutator.builder_.update_func(mod.get_global_var("main"), main)
    result = mutator.builder_.get()
    for gv in mutator.appended:
        del result[gv]
    return result
