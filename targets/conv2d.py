"""conv2d in blocked layouts as TE computations, and the legalization that emits them.

TVM 0.27 legalizes conv2d only in plain layouts. Blocked convs (targets.layout) are computed here:
  fp32       data [N, C/b, H, W, b]  weight [O/b, C/b, KH, KW, b(i), b(o)]
  int8       data [N, C/b, H, W, b]  weight [O/b, C/4, KH, KW, b(o), 4(i)]   (the dot intrinsics' packing)
  depthwise  data [N, C/b, H, W, b]  weight [C/b, 1, KH, KW, 1, b]
  grouped    as fp32 or int8, with the weight's C the channels of one group (whole blocks)
Block names (CONV_BLOCK, DEPTHWISE_BLOCK) are how targets.schedules finds the reduction to schedule. An int8
conv whose constant weight has bounded pairs (targets.bounded_pairs) is marked BOUNDED_PAIRS, for the
`vpmaddubsw` intrinsic on CPUs without VNNI.

An int8 conv whose row has no good tile divisor (71 or 17 columns) computes whole register tiles and keeps
the real columns: the dot intrinsic cannot be tensorized under the predicate that a cut-short tile needs
(fp32 convs cut their last tile short instead). The extra columns read the row's last input column again.

An int8 conv on s8 data given a `signed_offset` (targets.signed_data) reads its data with the sign bit
flipped, as u8 (a + 128; the padding is 128, the flipped 0), for a dot instruction that reads u8, and takes
the offset (128 * the sum of each output channel's weights) off its sums: SIGNED_OFFSET_REMOVED.
"""

from __future__ import annotations

from tvm import relax, te, tirx, topi

from targets.dense import BOUNDED_PAIRS
from targets.intrinsics import SIGN_FLIP
from targets.register_tiles import whole_tiles_columns, whole_tiles_tile

CONV_BLOCK = "conv2d_nchwc"
DEPTHWISE_BLOCK = "depthwise_conv2d_nchwc"
WHOLE_TILES_CUT = "conv2d_whole_tiles_cut"  # the real columns of an int8 conv computed in whole tiles
SIGNED_OFFSET_REMOVED = "conv2d_signed_offset_removed"  # an s8 conv's sums of (a + 128) * w, less 128 * sum(w)


def _padded(data, padding):
    top, left, bottom, right = padding
    if not any(padding):
        return data
    return topi.nn.pad(data, [0, 0, top, left, 0], [0, 0, bottom, right, 0], pad_value=0, name="data_pad")


def _sign_flipped_padded(data, padding):
    """s8 data as the u8 a + 128, padded with 128 (the flipped 0), in one pass."""
    top, left, bottom, right = padding
    n, chunks, height, width, block = (int(d) for d in data.shape)

    def value(b, c, y, x, lane):
        inside = tirx.all(y >= top, y < top + height, x >= left, x < left + width)
        flipped = (data[b, c, y - top, x - left, lane].astype("int32") + SIGN_FLIP).astype("uint8")
        return tirx.if_then_else(inside, flipped, tirx.const(SIGN_FLIP, "uint8"))

    return te.compute((n, chunks, height + top + bottom, width + left + right, block), value, name="data_pad")


def _out_size(size, kernel, stride, dilation, pad_before, pad_after):
    return (size + pad_before + pad_after - (kernel - 1) * dilation - 1) // stride + 1


def conv2d_nchwc(data, weight, strides, padding, dilation, groups, out_dtype, tile_lanes: int | None = None,
                 bounded_pairs: bool = False, signed_offset=None):
    """A blocked conv2d; which of the three forms is decided by the weight's rank and the group count.
    `tile_lanes`: the target's vector lanes, for an int8 conv's whole register tiles (None: never pad).
    `bounded_pairs`: the int8 weight's pairs are bounded (marks the block BOUNDED_PAIRS).
    `signed_offset`: [O/b, b] int32, 128 * the sum of each output channel's weights, for an int8 conv on s8
    data read sign-flipped (see the module's doc)."""
    n, in_chunks, height, width, block = (int(d) for d in data.shape)
    kernel_h, kernel_w = int(weight.shape[2]), int(weight.shape[3])
    (stride_h, stride_w), (dil_h, dil_w) = strides, dilation
    out_h = _out_size(height, kernel_h, stride_h, dil_h, padding[0], padding[2])
    out_w = _out_size(width, kernel_w, stride_w, dil_w, padding[1], padding[3])
    pad = _padded(data, padding) if signed_offset is None else _sign_flipped_padded(data, padding)
    kh = te.reduce_axis((0, kernel_h), name="kh")
    kw = te.reduce_axis((0, kernel_w), name="kw")

    def rows(y):
        return y * stride_h + kh * dil_h

    def cols(x):
        return x * stride_w + kw * dil_w

    if groups != 1 and groups == in_chunks * block:  # depthwise: each channel with its own filter
        return te.compute(
            (n, in_chunks, out_h, out_w, block),
            lambda b, c, y, x, lane: te.sum(
                pad[b, c, rows(y), cols(x), lane].astype(out_dtype)
                * weight[c, 0, kh, kw, 0, lane].astype(out_dtype), axis=[kh, kw]),
            name=DEPTHWISE_BLOCK)

    out_chunks, out_block = int(weight.shape[0]), int(weight.shape[4 if _is_int8(weight) else 5])
    # Grouped: each group's channels are whole blocks, and output block `oc` reads its group's input blocks.
    group_in_chunks, group_out_chunks = in_chunks // groups, out_chunks // groups
    ic_outer = te.reduce_axis((0, group_in_chunks), name="ic_outer")

    def chunk(oc):
        return ic_outer if groups == 1 else oc // group_out_chunks * group_in_chunks + ic_outer

    if _is_int8(weight):
        group = int(weight.shape[5])
        ic_mid = te.reduce_axis((0, block // group), name="ic_mid")
        ic_inner = te.reduce_axis((0, group), name="ic_inner")
        whole_w = _whole_tiles_width(out_w, out_chunks, tile_lanes, group_in_chunks * block * kernel_h * kernel_w)
        conv = te.compute(
            (n, out_chunks, out_h, whole_w, out_block),
            lambda b, oc, y, x, lane: te.sum(
                pad[b, chunk(oc), rows(y), cols(te.min(x, out_w - 1)), ic_mid * group + ic_inner].astype("int32")
                * weight[oc, ic_outer * (block // group) + ic_mid, kh, kw, lane, ic_inner].astype("int32"),
                axis=[ic_outer, kh, kw, ic_mid, ic_inner]),
            name=CONV_BLOCK, attrs={BOUNDED_PAIRS: 1} if bounded_pairs else None)
        sums = conv if whole_w == out_w else te.compute(
            (n, out_chunks, out_h, out_w, out_block), lambda *i: conv(*i), name=WHOLE_TILES_CUT)
        if signed_offset is None:
            return sums
        return te.compute(sums.shape, lambda b, oc, y, x, lane: sums[b, oc, y, x, lane] - signed_offset[oc, lane],
                          name=SIGNED_OFFSET_REMOVED)
    ic_inner = te.reduce_axis((0, block), name="ic_inner")
    return te.compute(
        (n, out_chunks, out_h, out_w, out_block),
        lambda b, oc, y, x, lane: te.sum(
            pad[b, chunk(oc), rows(y), cols(x), ic_inner].astype(out_dtype) * weight[oc, ic_outer, kh, kw, ic_inner, lane].astype(out_dtype),
            axis=[ic_outer, kh, kw, ic_inner]),
        name=CONV_BLOCK)


def _whole_tiles_width(out_w: int, out_chunks: int, tile_lanes: int | None, depth: int) -> int:
    """The columns an int8 conv computes: whole tiles of the register tile targets.schedules will pick (`depth`:
    the inputs an output reads)."""
    if tile_lanes is None:
        return out_w
    tile_w, _, ragged = whole_tiles_tile(out_w, out_chunks, tile_lanes, depth)
    return whole_tiles_columns(out_w, tile_w) if ragged else out_w


def _is_int8(weight) -> bool:
    return weight.dtype in ("int8", "uint8")


def conv2d_call(bb: relax.BlockBuilder, call: relax.Call, tile_lanes: int, bounded_pairs: bool = False,
                signed_offset: relax.Expr | None = None):
    """A blocked relax.nn.conv2d as a call of its TE kernel (`signed_offset`: see conv2d_nchwc)."""
    attrs = call.attrs
    out_dtype = call.ty.dtype  # out_dtype=None in the attrs means "as the data"
    return bb.call_te(conv2d_nchwc, call.args[0], call.args[1],
                      [int(s) for s in attrs.strides], [int(p) for p in attrs.padding],
                      [int(d) for d in attrs.dilation], int(attrs.groups), str(out_dtype), tile_lanes,
                      bounded_pairs, signed_offset, primfunc_name_hint="conv2d_nchwc")


def legalize_conv2d(default, tile_lanes: int):
    """A LegalizeOps override for relax.nn.conv2d: blocked layouts here, anything else to `default`."""

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        if len(call.attrs.data_layout) == 4:
            return default(bb, call)
        return conv2d_call(bb, call, tile_lanes)

    return legalize
