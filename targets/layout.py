"""Blocked channel layouts (NCHW{c}) for a target: which conv2d gets which data and weight layout.

A tensor's block depends only on its channel count and the target's vector width, so a conv's output is
already in the layout the next conv reads: layout transforms appear at the graph's edges (inputs, outputs,
ops without blocked kernels), never between two convs. Weights are constants, so their packing is folded
at compile time.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from targets.channel_gather import blocked_gathers
from targets.channel_norm import blocked_channel_norms
from targets.channel_padding import pad_channels
from targets.layout_fallback import (CONVERSION_ERRORS, LayoutFallback, convert_pinning_failures, error_reason,
                                     plain_layout_readers)
from targets.layout_rules import (INFER_LAYOUT, layout_friendly_forms, blocked_rules, channel_block_of,
                                  override_layout_rules)
from targets.registry import TargetSpec

# The int8 dot intrinsics read 4 consecutive input channels per output lane (vpdpbusd's u8x4 . s8x4).
INT8_GROUP = 4


def vector_lanes(spec: TargetSpec) -> int:
    """32-bit lanes in one vector register: the output-channel block of fp32 and int8 convs."""
    return 16 if spec.has("avx512f") else 8


# CPUs whose 512-bit instructions run as two 256-bit halves (Zen 4): there a full AVX-512 vector does no
# more work a cycle than a half one.
HALF_RATE_WIDE_VECTORS = frozenset({"znver4"})


def wide_vectors_full_rate(spec: TargetSpec) -> bool:
    """Whether a full vector does twice a half one's multiply-adds a cycle (AVX-512 but Zen 4)."""
    return spec.has("avx512f") and spec.mcpu not in HALF_RATE_WIDE_VECTORS


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


def conv_layouts(call: relax.Call, lanes: int, mixed: bool = True,
                 data_block: int | None = None) -> tuple[str, str, str] | None:
    """(data, kernel, output layout) for a conv2d, or None to leave it NCHW (channels that fit no block,
    grouped convs that are not depthwise). `data_block`: the block its input already has (a concat of
    narrower tensors), which it then reads as it is."""
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
        block = data_block or out_block
        return f"NCHW{block}c", f"OIHW1i{block}o", f"NCHW{block}c"
    in_block = data_block or channel_block(in_channels, lanes, mixed) or stem_block(in_channels, lanes, dtype)
    if in_block is None or not _groups_are_whole_blocks(attrs.groups, in_per_group, out_channels, in_block,
                                                        out_block):
        return None
    kernel = f"OIHW{out_block}o{INT8_GROUP}i" if dtype in ("uint8", "int8") else f"OIHW{in_block}i{out_block}o"
    return f"NCHW{in_block}c", kernel, f"NCHW{out_block}c"


def _groups_are_whole_blocks(groups: int, in_per_group: int, out_channels: int, in_block: int,
                             out_block: int) -> bool:
    """A grouped conv runs blocked (targets.conv2d) when each group's input and output channels are whole
    blocks."""
    return groups == 1 or (in_per_group % in_block == 0 and out_channels // groups % out_block == 0)


@relax.expr_functor.mutator
class _MergeGroupsToBlock(relax.PyExprMutator):
    """A grouped conv whose groups are narrower than a channel block (RegNet's groups of 8 channels against
    AVX-512's 16) as one with k times fewer, k times wider groups that are whole blocks: each merged group's
    weight is block-diagonal, zero between the original groups. k times the multiply-adds, on the blocked
    kernel instead of TVM's generic one, and no layout transform around it."""

    def __init__(self, mod, lanes):
        super().__init__(mod)
        self.lanes = lanes

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d"
                and call.attrs.data_layout == "NCHW" and call.attrs.kernel_layout == "OIHW"
                and isinstance(call.args[1], tvm.ir.expr.GenericConst)):
            return call
        weight = call.args[1].value.numpy()
        groups, (out_channels, in_per_group) = int(call.attrs.groups), weight.shape[:2]
        in_block = channel_block(in_per_group * groups, self.lanes)
        out_block = channel_block(out_channels, self.lanes)
        if groups == 1 or in_per_group == 1 or in_block is None or out_block is None or in_block % in_per_group:
            return call  # ungrouped, depthwise, or no block fits
        merge = in_block // in_per_group
        out_per_group = out_channels // groups
        if merge == 1 or groups % merge or merge * out_per_group % out_block:
            return call  # already whole blocks, or merged groups still would not be
        merged = np.zeros((out_channels, merge, *weight.shape[1:]), weight.dtype)
        outputs = np.arange(out_channels)
        merged[outputs, outputs // out_per_group % merge] = weight
        attrs = call.attrs
        weight = relax.const(merged.reshape(out_channels, in_block, *weight.shape[2:]))
        return relax.op.nn.conv2d(call.args[0], weight, strides=attrs.strides, padding=attrs.padding,
                                  dilation=attrs.dilation, groups=groups // merge, data_layout="NCHW",
                                  kernel_layout="OIHW", out_dtype=str(call.ty.dtype))


def merge_groups_to_block(mod: tvm.IRModule, lanes: int) -> tvm.IRModule:
    return _rewrite_functions(mod, _MergeGroupsToBlock, lanes)


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
class _PackDenseWeights(relax.PyExprMutator):
    """An FC's constant weight [K, N] stored in the block its kernel reads (`packing`), behind a
    layout_transform back to [K, N] that the FC's kernel inlines (its reads then index the packed constant
    directly)."""

    def __init__(self, mod, lanes, packing):
        super().__init__(mod)
        self.lanes, self.packing = lanes, packing

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul"
                and isinstance(call.args[1], tvm.ir.expr.GenericConst)):
            return call
        unpack = self.packing(call.args[0], call.args[1].value.numpy(), self.lanes)
        if unpack is None:
            return call
        rows, columns = (int(d) for d in call.args[1].value.shape)
        packed = relax.Call(call.op, [call.args[0], unpack], call.attrs)
        if int(np.prod(unpack.args[0].value.shape)) == rows * columns:
            return packed
        # zero columns padded to whole vectors: computed with the rest, then cropped
        rank = call.ty.ndim
        return relax.op.strided_slice(self.builder_.emit(packed), axes=[rank - 1], begin=[0], end=[columns])


def _column_block(columns: int, lanes: int) -> int | None:
    """The column block of an FC's packed weight: the target's block, or half of it for widths like 1000
    (AVX-512 has 256-bit forms too), else whole vectors over zero columns (PP-OCR's 6625 characters: its
    classifier ran as scalar code at a fifth of the speed); None for one narrower than a vector."""
    return channel_block(columns, lanes) or (lanes if columns > lanes else None)


def _padded_columns(weight: np.ndarray, block: int) -> np.ndarray:
    return np.pad(weight, [(0, 0), (0, -weight.shape[1] % block)])


def _int8_packing(data, weight: np.ndarray, lanes: int):
    """[N/lanes, K/4, lanes, 4]: the block the dot intrinsics read."""
    if (data.ty.dtype not in ("uint8", "int8") or weight.ndim != 2 or weight.dtype != np.int8
            or weight.shape[0] % INT8_GROUP):
        return None
    k, n = weight.shape
    lanes = _column_block(n, lanes)
    if lanes is None:
        return None
    packed = _padded_columns(weight, lanes).reshape(k // INT8_GROUP, INT8_GROUP, -1, lanes).transpose(2, 0, 3, 1)
    return relax.op.layout_transform(
        relax.const(np.ascontiguousarray(packed)),
        index_map=lambda block, group, lane, i: (group * INT8_GROUP + i, block * lanes + lane))


def _fp32_packing(data, weight: np.ndarray, lanes: int):
    """[N/lanes, K, lanes]: a register tile's column block then walks K through one contiguous panel, not a
    strided row of the whole weight per k (over whole blocks: `_column_block`). One narrower than a vector
    stays [K, N] (the generic rule)."""
    if data.ty.dtype != "float32" or data.ty.ndim < 2 or weight.ndim != 2 or weight.dtype != np.float32:
        return None
    k, n = weight.shape
    lanes = _column_block(n, lanes)
    if lanes is None:
        return None
    packed = _padded_columns(weight, lanes).reshape(k, -1, lanes).transpose(1, 0, 2)
    return relax.op.layout_transform(relax.const(np.ascontiguousarray(packed)),
                                     index_map=lambda block, row, lane: (row, block * lanes + lane))


def pack_dense_weights(mod: tvm.IRModule, lanes: int) -> tvm.IRModule:
    """Every int8 and fp32 FC weight in its kernel's block."""
    for packing in (_int8_packing, _fp32_packing):
        mod = _rewrite_functions(mod, lambda m, n, p=packing: _PackDenseWeights(m, n, p), lanes)
    return mod


def _conv_rule(lanes: int, mixed: bool):
    """conv2d's layout rule for one conversion: TVM's, given the layouts `conv_layouts` chooses for the
    call and the block its input has by then."""
    tvm_rule = tvm.ir.Op.get("relax.nn.conv2d").get_attr(INFER_LAYOUT)

    def rule(call, _desired_layouts, var_layout_map):
        layouts = conv_layouts(call, lanes, mixed, data_block=channel_block_of(var_layout_map, call.args[0]))
        return tvm_rule(call, {"relax.nn.conv2d": list(layouts or ("NCHW", "OIHW", "NCHW"))}, var_layout_map)

    return rule


def _convert_conv_layouts(mod: tvm.IRModule) -> tvm.IRModule:
    return relax.transform.ConvertLayout({})(mod)


@dataclass
class LayoutReport:
    """What the layout phase did: the channel block chosen, and each op left in NCHW with the reason."""
    block: int | None = None  # None: the whole graph stayed NCHW
    fallbacks: list[LayoutFallback] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"block": self.block, "fallbacks": [f.to_json() for f in self.fallbacks]}


# Op attributes are process-wide: one layout conversion at a time.
_CONVERSION_LOCK = threading.Lock()
# Ops pinned to NCHW one at a time before the whole graph is given up on.
MAX_PINNED_OPS = 64


def _convert_with_fallbacks(mod: tvm.IRModule, lanes: int, report: LayoutReport) -> tvm.IRModule:
    """The graph in blocked layouts; ops ConvertLayout fails on stay NCHW, and if even that fails, all do.

    An 8-channel-block tensor reaching a 16-block conv through a concat or a split: TVM cannot transform
    between two block sizes, so the whole graph then takes the one block that fits every tensor, before
    any op is pinned to NCHW."""
    attempts = [(lanes, True)] + ([(lanes // 2, False)] if lanes > 8 else [])
    error = None
    for max_pins in (0, MAX_PINNED_OPS):
        for block, mixed in attempts:
            try:
                with override_layout_rules({"relax.nn.conv2d": _conv_rule(block, mixed)}):
                    converted, fallbacks = convert_pinning_failures(mod, _convert_conv_layouts, max_pins)
                converted = blocked_channel_norms(blocked_gathers(converted))
            except CONVERSION_ERRORS as err:
                error = err
                continue
            report.block = block
            pinned = {(f.at, f.op) for f in fallbacks}
            report.fallbacks += fallbacks + [f for f in plain_layout_readers(converted) if (f.at, f.op) not in pinned]
            return converted
    report.fallbacks.append(LayoutFallback("graph", "*", error_reason(error)))
    return mod


def block_channels(mod: tvm.IRModule, spec: TargetSpec,
                   fold_constants: tvm.transform.Pass | None = None) -> tuple[tvm.IRModule, LayoutReport]:
    """Rewrite convs (and the ops around them) to NCHW{lanes}c with packed, folded weights. `fold_constants`:
    the pass that folds the weights' layout transforms (TVM's FoldConstant if None)."""
    report = LayoutReport()
    lanes = vector_lanes(spec)
    mod = merge_groups_to_block(pad_int8_stem(mod, lanes), lanes)
    mod = layout_friendly_forms(pad_channels(mod, lanes, lambda channels: channel_block(channels, lanes) is not None,
                                             widen_deep=wide_vectors_full_rate(spec)))
    with _CONVERSION_LOCK, override_layout_rules(blocked_rules(mod)):
        mod = _convert_with_fallbacks(mod, lanes, report)
    mod = tvm.transform.Sequential([fold_constants or relax.transform.FoldConstant(),
                                    # one transform of a value read blocked by several ops, not one each
                                    relax.transform.EliminateCommonSubexpr(),
                                    relax.transform.DeadCodeElimination()])(mod)
    # after folding, which would unpack them again
    return pack_dense_weights(mod, lanes), report
