"""Blocked channel layouts (NCHW{c}) for a target: which conv2d gets which data and weight layout.

A tensor's block depends only on its channel count and the target's vector width, so a conv's output is
already in the layout the next conv reads: layout transforms appear at the graph's edges (inputs, outputs,
ops without blocked kernels), never between two convs. Weights are constants, so their packing is folded
at compile time.
"""

from __future__ import annotations

import contextlib

import numpy as np
import tvm
from tvm import relax

from targets.registry import TargetSpec

# The int8 dot intrinsics read 4 consecutive input channels per output lane (vpdpbusd's u8x4 . s8x4).
INT8_GROUP = 4


def vector_lanes(spec: TargetSpec) -> int:
    """32-bit lanes in one vector register: the output-channel block of fp32 and int8 convs."""
    return 16 if spec.has("avx512f") else 8


def channel_block(channels: int, lanes: int, mixed: bool = True) -> int | None:
    """The channel block of a tensor with `channels` channels: a full vector, else (`mixed`) half of an
    AVX-512 one (24, 40, 200 channels run on 8-lane ymm code there); None when none divides it.

    It depends only on the channel count, so a conv's output is in the block its consumer reads. With
    `mixed` False, `lanes` is the one block of the whole graph."""
    blocks = (lanes, lanes // 2) if mixed else (lanes,)
    return next((b for b in blocks if b >= 8 and channels % b == 0), None)


def stem_block(channels: int, lanes: int, dtype: str) -> int | None:
    """The data block of a conv reading fewer channels than a vector (an RGB image: 3): all of them in
    one block, so the stem conv multiplies no padding (int8 reads channels in groups of 4: pad_int8_stem
    rounds them up first)."""
    if channels >= lanes or (dtype in ("uint8", "int8") and channels % INT8_GROUP):
        return None
    return channels


def conv_layouts(call: relax.Call, lanes: int, mixed: bool = True) -> tuple[str, str, str] | None:
    """(data, kernel, output layout) for a conv2d, or None to leave it NCHW (channels that fit no block,
    grouped convs that are not depthwise)."""
    attrs = call.attrs
    if attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" or attrs.out_layout != "NCHW":
        return None
    out_channels, in_per_group = (int(d) for d in call.args[1].ty.shape.values[:2])
    in_channels = int(call.args[0].ty.shape.values[1])
    dtype = call.args[0].ty.dtype
    out_block = channel_block(out_channels, lanes, mixed)
    if out_block is None:
        return None
    if attrs.groups == in_channels == out_channels and in_per_group == 1:
        return f"NCHW{out_block}c", f"OIHW1i{out_block}o", f"NCHW{out_block}c"
    in_block = channel_block(in_channels, lanes, mixed) or stem_block(in_channels, lanes, dtype)
    if attrs.groups != 1 or in_block is None:
        return None
    kernel = f"OIHW{out_block}o{INT8_GROUP}i" if dtype in ("uint8", "int8") else f"OIHW{in_block}i{out_block}o"
    return f"NCHW{in_block}c", kernel, f"NCHW{out_block}c"


# Elementwise ops (their other arguments are scalars) that TVM 0.27 gives no layout rule.
ELEMENTWISE_WITHOUT_LAYOUT_RULE = ("relax.clip", "relax.nn.leakyrelu", "relax.nn.softplus")


@contextlib.contextmanager
def _scalar_ops_follow_layout(mod: tvm.IRModule):
    """Let clip, leaky ReLU, softplus and per-tensor (de)quantize keep their input's layout in ConvertLayout.

    TVM 0.27 gives them no layout rule, so every ReLU6 or requantize would transform back to NCHW. The
    (de)quantizes act elementwise when their scale is a scalar, which is all the int8 rewrite emits; a
    graph with a per-channel (de)quantize on activations keeps the conservative behaviour for those.
    """
    unary = tvm.ir.Op.get("relax.nn.relu").get_attr("FRelaxInferLayout")
    names = list(ELEMENTWISE_WITHOUT_LAYOUT_RULE)
    if not _has_per_channel_quantize(mod):
        names += ["relax.quantize", "relax.dequantize"]
    for name in names:
        tvm.ir.register_op_attr(name, "FRelaxInferLayout", unary)
    try:
        yield
    finally:
        for name in names:
            tvm.ir.Op.get(name).reset_attr("FRelaxInferLayout")


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


@relax.expr_functor.mutator
class _PadInt8Stem(relax.PyExprMutator):
    """An int8 conv reading too few channels for a block (an RGB image: 3) reads them zero-padded to a
    multiple of the dot intrinsics' group of 4, with zero weights for the padding (so the padded values,
    and any zero point, never count)."""

    def __init__(self, mod, lanes):
        super().__init__(mod)
        self.lanes = lanes

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d" and call.attrs.groups == 1
                and call.attrs.data_layout == "NCHW" and call.attrs.kernel_layout == "OIHW"
                and call.args[0].ty.dtype in ("uint8", "int8")
                and isinstance(call.args[1], tvm.ir.expr.GenericConst)):
            return call
        weight = call.args[1].value.numpy()
        extra = -weight.shape[1] % INT8_GROUP
        if not extra or weight.shape[1] >= self.lanes or channel_block(weight.shape[0], self.lanes) is None:
            return call
        data = relax.op.nn.pad(call.args[0], [0, 0, 0, extra, 0, 0, 0, 0])
        weight = relax.const(np.pad(weight, [(0, 0), (0, extra), (0, 0), (0, 0)]))
        return relax.Call(call.op, [data, weight], call.attrs)


def _rewrite_functions(mod: tvm.IRModule, mutator, lanes: int) -> tvm.IRModule:
    for gvar, func in mod.functions.items():
        if isinstance(func, relax.Function):
            mod[gvar] = mutator(mod, lanes).visit_expr(func)
    return relax.transform.Normalize()(mod)


def pad_int8_stem(mod: tvm.IRModule, lanes: int) -> tvm.IRModule:
    return _rewrite_functions(mod, _PadInt8Stem, lanes)


@relax.expr_functor.mutator
class _PackInt8DenseWeights(relax.PyExprMutator):
    """An int8 FC's weight [K, N] stored as [N/lanes, K/4, lanes, 4], the block the dot intrinsics read,
    behind a layout_transform back to [K, N] that the FC's kernel inlines (its reads then index the
    packed constant directly)."""

    def __init__(self, mod, lanes):
        super().__init__(mod)
        self.lanes = lanes

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul"
                and isinstance(call.args[1], tvm.ir.expr.GenericConst)
                and call.args[0].ty.dtype in ("uint8", "int8")):
            return call
        weight = call.args[1].value.numpy()
        if weight.ndim != 2 or weight.dtype != np.int8 or weight.shape[0] % INT8_GROUP:
            return call
        # the target's block, or half of it for widths like 1000 (AVX-512 has 256-bit dot forms too)
        lanes = next((b for b in (self.lanes, self.lanes // 2) if b >= 8 and weight.shape[1] % b == 0), None)
        if lanes is None:
            return call
        k, n = weight.shape
        packed = weight.reshape(k // INT8_GROUP, INT8_GROUP, n // lanes, lanes).transpose(2, 0, 3, 1)
        unpack = relax.op.layout_transform(
            relax.const(np.ascontiguousarray(packed)),
            index_map=lambda block, group, lane, i: (group * INT8_GROUP + i, block * lanes + lane))
        return relax.Call(call.op, [call.args[0], unpack], call.attrs)


def pack_int8_dense_weights(mod: tvm.IRModule, lanes: int) -> tvm.IRModule:
    return _rewrite_functions(mod, _PackInt8DenseWeights, lanes)


def _convert_conv_layouts(mod: tvm.IRModule, lanes: int, mixed: bool) -> tvm.IRModule:
    def desired(call):
        layouts = conv_layouts(call, lanes, mixed) if call.op.name == "relax.nn.conv2d" else None
        return {"relax.nn.conv2d": list(layouts or ("NCHW", "OIHW", "NCHW"))}

    return relax.transform.ConvertLayout({}, desired)(mod)


def block_channels(mod: tvm.IRModule, spec: TargetSpec) -> tvm.IRModule:
    """Rewrite convs (and the elementwise ops around them) to NCHW{lanes}c with packed, folded weights."""
    lanes = vector_lanes(spec)
    mod = pad_int8_stem(mod, lanes)
    # An 8-channel-block tensor reaching a 16-block conv through a concat or a split: TVM cannot transform
    # between two block sizes, so the whole graph then takes the one that fits every tensor. Where TVM's
    # ConvertLayout fails even so (e.g. a Reshape to a higher rank after a conv), the graph stays NCHW.
    attempts = [(lanes, True)] + ([(lanes // 2, False)] if lanes > 8 else [])
    with _scalar_ops_follow_layout(mod):
        for block, mixed in attempts:
            try:
                mod = _convert_conv_layouts(mod, block, mixed=mixed)
                break
            except tvm.error.InternalError:
                continue
    mod = tvm.transform.Sequential([relax.transform.FoldConstant(),
                                    relax.transform.DeadCodeElimination()])(mod)
    return pack_int8_dense_weights(mod, lanes)  # after folding, which would unpack them again
