"""Bilinear resize of an NCHW tensor as two passes over tables computed at compile time.

TOPI's linear resize computes, for every output element, both source coordinates from the output index
(float multiply-adds, floors, clamps) and reads four inputs; the generic rule then vectorizes nothing when
the width is not a multiple of a vector (a segmentation head's 520). The shapes are static, so the source
rows and columns and their weights are tables, and the interpolation is separable: each source row is first
interpolated along the width (rows x output width, gathers), then each output row is a weighted sum of two
of those rows (contiguous and vectorized). The sums are TOPI's, in its order:
(x00 (1 - wx) + x01 wx) (1 - wy) + (x10 (1 - wx) + x11 wx) wy.
"""

from __future__ import annotations

import numpy as np
from tvm import relax, te

from targets.channel_padding import static_shape
from targets.dense import legalize_default

ROWS_BLOCK = "resize_rows"  # the width pass; its consumer is the output pass
MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric")


def source_table(in_size: int, out_size: int, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first source index, second source index, weight of the second) per output index, in float32 as
    TOPI's get_inx computes them."""
    f32 = np.float32
    out = np.arange(out_size, dtype=f32)
    scale = f32(in_size) / f32(out_size)
    if mode == "half_pixel" or (mode == "pytorch_half_pixel" and out_size > 1):
        position = (out + f32(0.5)) * scale - f32(0.5)
    elif mode == "pytorch_half_pixel":
        position = np.zeros_like(out)
    elif mode == "align_corners":
        position = (f32(in_size - 1) / f32(max(out_size - 1, 1))) * out
    else:  # asymmetric
        position = scale * out
    floor = np.floor(position)
    first = np.clip(floor, 0, in_size - 1).astype("int32")
    second = np.clip(floor + 1, 0, in_size - 1).astype("int32")
    return first, second, (position - floor).astype(f32)


def _two_pass_resize(data, row0, row1, row_weight, col0, col1, col_weight):
    batch, channels, height, _ = data.shape
    out_height, out_width = row0.shape[0], col0.shape[0]
    one = te.const(1.0, data.dtype)

    def along_width(n, c, y, x):
        return data[n, c, y, col0[x]] * (one - col_weight[x]) + data[n, c, y, col1[x]] * col_weight[x]

    rows = te.compute((batch, channels, height, out_width), along_width, name=ROWS_BLOCK)
    return te.compute((batch, channels, out_height, out_width),
                      lambda n, c, y, x: rows[n, c, row0[y], x] * (one - row_weight[y]) + rows[n, c, row1[y], x] * row_weight[y],
                      name="resize")


def _is_table_resize(call: relax.Call) -> bool:
    a = call.attrs
    return (a.layout == "NCHW" and a.method == "linear" and a.coordinate_transformation_mode in MODES
            and str(call.args[0].ty.dtype) == "float32" and str(call.ty.dtype) == "float32"
            and static_shape(call.args[0]) is not None and static_shape(call) is not None)


def legalize_resize2d():
    """A LegalizeOps override for relax.image.resize2d: float32 bilinear NCHW with static shapes here, the rest
    TOPI's."""
    default = legalize_default("relax.image.resize2d")

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        if not _is_table_resize(call):
            return default(bb, call)
        mode = call.attrs.coordinate_transformation_mode
        (*_, in_h, in_w), (*_, out_h, out_w) = static_shape(call.args[0]), static_shape(call)
        tables = [relax.const(t) for t in (*source_table(in_h, out_h, mode), *source_table(in_w, out_w, mode))]
        return bb.call_te(_two_pass_resize, call.args[0], *tables, primfunc_name_hint="resize2d")

    return legalize


def schedule_resize(sch, spec) -> str | None:
    """The width pass, then the output rows: each parallel over its rows and vectorized along the output
    width by the widest vector that divides it. None (nothing changed) for other kernels."""
    from targets.schedules import _all_blocks, _dividing_lanes, _is_reduction

    blocks = {sch.get(b).name_hint: b for b in _all_blocks(sch)}
    if ROWS_BLOCK not in blocks or any(_is_reduction(sch, b) for b in blocks.values()):
        return None
    *_, output = _all_blocks(sch)
    for name, block in blocks.items():
        if name != ROWS_BLOCK and not sch.get(block).same_as(sch.get(output)):
            sch.compute_inline(block)  # an elementwise epilogue fused after the resize
    rows = sch.get_sblock(ROWS_BLOCK)
    # two passes, each parallel over its planes (the output's reads of `rows` go through a table: compute_at
    # cannot bound them); the width pass's result is 1/scale of the output, it stays in cache
    for block in (rows, output):
        n, c, y, x = sch.get_loops(block)
        lanes = _dividing_lanes(int(sch.get(x).extent), spec)
        if lanes is not None:
            _, inner = sch.split(x, [None, lanes])
            sch.vectorize(inner)
        sch.parallel(sch.fuse(n, c, y))
    return "resize_linear"
