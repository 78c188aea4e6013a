"""Layout rules that let TVM's ConvertLayout keep NCHW{c} through the ops around convs.

TVM 0.27's rules stop the blocked layout at: elementwise ops it gives no rule (clip, leaky ReLU, softplus,
(de)quantize), a per-channel constant of lower rank than the tensor it scales (a standalone BatchNorm's
(C, 1, 1) scale and shift), and resize2d (its rule does not handle sub-indexed layouts, though TOPI's
kernel reads NCHW{c}). Its split rule keeps the blocked layout but splits the block axis at channel
indices (wrong shapes), and its conv2d_transpose rule fails on a blocked input. Everything here goes
through ConvertLayout's own machinery: layout rules (FRelaxInferLayout) registered for the duration of
one conversion, and a rewrite into equivalent forms those rules handle before it.
"""

from __future__ import annotations

import contextlib
import re

import numpy as np
import tvm
from tvm import relax

from targets.channel_norm import channel_norm_rule

INFER_LAYOUT = "FRelaxInferLayout"
_LEVEL = 10  # TVM's own rules' level (an attribute is reset before it is registered again)

# Elementwise ops (their other arguments are scalars) that TVM 0.27 gives no layout rule.
ELEMENTWISE_WITHOUT_LAYOUT_RULE = ("relax.clip", "relax.nn.leakyrelu", "relax.nn.softplus")
BINARY_ELEMENTWISE = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum",
                      "relax.minimum", "relax.power")


@contextlib.contextmanager
def override_layout_rules(rules: dict):
    """Register {op name: layout rule} as the ops' FRelaxInferLayout while the context is active; the
    ops' own rules (or none) come back afterwards."""
    saved = {name: tvm.ir.Op.get(name).get_attr(INFER_LAYOUT) for name in rules}
    for name, rule in rules.items():
        tvm.ir.Op.get(name).reset_attr(INFER_LAYOUT)
        tvm.ir.register_op_attr(name, INFER_LAYOUT, rule, level=_LEVEL)
    try:
        yield
    finally:
        for name, rule in saved.items():
            tvm.ir.Op.get(name).reset_attr(INFER_LAYOUT)
            if rule is not None:
                tvm.ir.register_op_attr(name, INFER_LAYOUT, rule, level=_LEVEL)


def follow_input_rule():
    """TVM's rule for unary elementwise ops: the output takes the first argument's layout, the attributes
    stay as they are (the other arguments are left untouched)."""
    return tvm.ir.Op.get("relax.nn.relu").get_attr(INFER_LAYOUT)


def blocked_rules(mod: tvm.IRModule) -> dict:
    """The layout rules this module adds to TVM's for one conversion of `mod`."""
    unary = follow_input_rule()
    rules = {name: unary for name in ELEMENTWISE_WITHOUT_LAYOUT_RULE}
    if not _has_per_channel_quantize(mod):
        # Elementwise when their scale is a scalar, which is all the int8 rewrite emits; a graph with a
        # per-channel (de)quantize on activations keeps the conservative behaviour.
        rules.update({"relax.quantize": unary, "relax.dequantize": unary})
    rules["relax.image.resize2d"] = _resize2d_rule(tvm.ir.Op.get("relax.image.resize2d").get_attr(INFER_LAYOUT))
    rules["relax.split"] = _split_rule(tvm.ir.Op.get("relax.split").get_attr(INFER_LAYOUT))
    rules["relax.strided_slice"] = _spatial_slice_rule(tvm.ir.Op.get("relax.strided_slice").get_attr(INFER_LAYOUT))
    rules["relax.concat"] = _concat_rule(tvm.ir.Op.get("relax.concat").get_attr(INFER_LAYOUT))
    rules["relax.nn.layer_norm"] = channel_norm_rule(tvm.ir.Op.get("relax.nn.layer_norm").get_attr(INFER_LAYOUT))
    rules.update({name: _plain_layout_rule(name, layouts) for name, layouts in PLAIN_LAYOUT_ONLY.items()})
    return rules


# Ops with no blocked-layout kernel (TOPI legalizes conv2d_transpose in NCHW/IOHW only), and the layouts
# they keep: their input is transformed back to NCHW (TVM's own rule fails on a blocked input instead).
PLAIN_LAYOUT_ONLY = {"relax.nn.conv2d_transpose": ["NCHW", "IOHW", "NCHW"]}


def _plain_layout_rule(name: str, layouts: list[str]):
    tvm_rule = tvm.ir.Op.get(name).get_attr(INFER_LAYOUT)

    def rule(call, _desired_layouts, var_layout_map):
        return tvm_rule(call, {name: layouts}, var_layout_map)

    return rule


def _has_per_channel_quantize(mod: tvm.IRModule) -> bool:
    found = False

    def visit(expr):
        nonlocal found
        if (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op)
                and expr.op.name in ("relax.quantize", "relax.dequantize")
                and any(len(arg.ty.shape.values) for arg in expr.args[1:3])):
            found = True

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return found


# A 4-D layout blocked on its second axis, as ConvertLayout names it: ABCD16b.
_CHANNEL_BLOCKED = re.compile(r"ABCD(\d+)b")


def channel_block_of(var_layout_map, expr) -> int | None:
    """The channel block of `expr`'s current layout in a conversion, None when it is not NCHW{c}."""
    if not isinstance(expr, relax.Var) or expr not in var_layout_map:
        return None
    decision = var_layout_map[expr]
    match = _CHANNEL_BLOCKED.fullmatch(getattr(getattr(decision, "layout", None), "name", "") or "")
    return int(match.group(1)) if match else None


def _resize2d_rule(tvm_rule):
    """resize2d of an NCHW{c} tensor stays NCHW{c}: TOPI's resize reads that layout; TVM's rule sends it
    back to NCHW. The follow-input rule applied to the same call with its layout attribute blocked gives
    ConvertLayout the blocked decision."""
    unary = follow_input_rule()

    def rule(call, desired_layouts, var_layout_map):
        block = channel_block_of(var_layout_map, call.args[0])
        if block is None or call.attrs.layout != "NCHW" or "relax.image.resize2d" in desired_layouts:
            return tvm_rule(call, desired_layouts, var_layout_map)
        a = call.attrs
        blocked = relax.op.image.resize2d(
            call.args[0], call.args[1], roi=[float(r) for r in a.roi], layout=f"NCHW{block}c", method=a.method,
            coordinate_transformation_mode=a.coordinate_transformation_mode, rounding_method=a.rounding_method,
            cubic_alpha=float(a.cubic_alpha), cubic_exclude=int(a.cubic_exclude),
            extrapolation_value=float(a.extrapolation_value), out_dtype=str(call.ty.dtype))
        return unary(blocked, desired_layouts, var_layout_map)

    return rule


def _split_rule(tvm_rule):
    """A split of an NCHW{c} tensor at given channel indices stays NCHW: TVM's rule would keep the blocked
    layout but split the block axis at the channel indices. Equal splits, given as a number of sections
    (layout_friendly_forms), stay blocked."""

    def rule(call, desired_layouts, var_layout_map):
        if channel_block_of(var_layout_map, call.args[0]) is not None and not _is_sections(call.attrs):
            return None  # ConvertLayout's default policy: NCHW
        return tvm_rule(call, desired_layouts, var_layout_map)

    return rule


def _spatial_slice_rule(tvm_rule):
    """A strided slice of an NCHW{c} tensor along H and W only stays NCHW{c}: those axes keep their
    positions in the blocked layout (the slices of a conv split into regions of live taps,
    relay_passes.canonicalize_conv_taps). TVM's rule sends it back to NCHW."""
    unary = follow_input_rule()

    def rule(call, desired_layouts, var_layout_map):
        axes = _constant_ints(call.args[1])
        if channel_block_of(var_layout_map, call.args[0]) is not None and axes and all(a in (2, 3) for a in axes):
            return unary(call, desired_layouts, var_layout_map)
        return tvm_rule(call, desired_layouts, var_layout_map) if tvm_rule is not None else None

    return rule


def _concat_rule(tvm_rule):
    """A concat of plain and NCHW{c} inputs takes the blocked layout where the block divides every input's
    channels: TVM's rule blocks a concat only when all its inputs already are, so one plain input (a channel
    gather, targets.channel_padding) took the blocked ones back to NCHW. TVM's rule, asked about the blocked
    input alone in every place, gives that decision (the inputs it leaves plain are then transformed)."""

    def rule(call, desired_layouts, var_layout_map):
        fields = call.args[0].fields if isinstance(call.args[0], relax.Tuple) else []
        blocks = {channel_block_of(var_layout_map, f) for f in fields} - {None}
        if len(blocks) == 1 and None in {channel_block_of(var_layout_map, f) for f in fields}:
            block = blocks.pop()
            if int(call.attrs.axis) == 1 and all(_divides_channels(f, block) for f in fields):
                first = next(f for f in fields if channel_block_of(var_layout_map, f) == block)
                call = relax.Call(call.op, [relax.Tuple([first] * len(fields))], call.attrs)
        return tvm_rule(call, desired_layouts, var_layout_map)

    return rule


def _constant_ints(expr) -> list[int] | None:
    """The values of a tuple of integer constants (a strided slice's axes), else None."""
    values = getattr(expr, "fields", None) or getattr(expr, "values", None)
    try:
        return [int(getattr(v, "value", v)) for v in values] if values is not None else None
    except (TypeError, ValueError):
        return None


def _divides_channels(expr, block: int) -> bool:
    shape = getattr(expr.ty, "shape", None)
    values = getattr(shape, "values", None)
    return (values is not None and len(values) == 4 and isinstance(values[1], tvm.tirx.IntImm)
            and int(values[1]) % block == 0)


def _is_sections(split_attrs) -> bool:
    return isinstance(split_attrs.indices_or_sections, (int, tvm.tirx.IntImm))


@relax.expr_functor.mutator
class _LayoutFriendlyForms(relax.PyExprMutator):
    """Forms of the same computation that TVM's layout rules keep blocked:
    - a constant operand of a binary elementwise op reshaped to the other operand's rank (leading 1s, which
      broadcasting adds anyway), a one-element constant to a scalar: TVM's binary rule follows a blocked
      operand only when the other has the same rank or is a scalar;
    - a split into equal parts given as a number of sections, not as channel indices."""

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op):
            return call
        if call.op.name == "relax.split":
            return self._split_as_sections(call)
        if call.op.name not in BINARY_ELEMENTWISE or len(call.args) != 2:
            return call
        args = [self._aligned(arg, other) for arg, other in (call.args, call.args[::-1])]
        if all(new.same_as(old) for new, old in zip(args, call.args)):
            return call
        return relax.Call(call.op, args, call.attrs)

    @staticmethod
    def _split_as_sections(call):
        if _is_sections(call.attrs) or call.args[0].ty.shape is None:
            return call
        axis = int(call.attrs.axis)
        extent = call.args[0].ty.shape.values[axis]
        indices = [int(i) for i in call.attrs.indices_or_sections]
        if not isinstance(extent, tvm.tirx.IntImm) or not indices:
            return call
        part = indices[0]
        if indices != [part * k for k in range(1, len(indices) + 1)] or int(extent) != part * (len(indices) + 1):
            return call
        return relax.op.split(call.args[0], len(indices) + 1, axis)

    @staticmethod
    def _aligned(arg, other):
        if not isinstance(arg, tvm.ir.expr.GenericConst) or not isinstance(getattr(other, "ty", None), relax.TensorType):
            return arg
        value = arg.value.numpy()
        rank = len(other.ty.shape.values) if other.ty.shape is not None else -1
        if value.ndim == 0 or value.ndim > rank:
            return arg
        if value.size == 1:
            return relax.const(value.reshape(()), str(value.dtype))
        if value.ndim < rank:
            return relax.const(np.ascontiguousarray(value.reshape((1,) * (rank - value.ndim) + value.shape)),
                               str(value.dtype))
        return arg


def layout_friendly_forms(mod: tvm.IRModule) -> tvm.IRModule:
    for gvar, func in mod.functions.items():
        if isinstance(func, relax.Function):
            mod[gvar] = _LayoutFriendlyForms(mod).visit_expr(func)
    return relax.transform.Normalize()(mod)
