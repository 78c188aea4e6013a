"""int8 FCs whose rows no register tile divides, legalized to compute whole tiles.

A u8/s8 x s8 FC runs on the dot intrinsic (targets.intrinsics), which cannot be tensorized under the predicate
that a cut-short tile needs. Where the rows have no divisor that makes a good tile (ViT's 197 tokens: only
1 x 4 accumulators), the FC computes whole tiles of rows, the extra rows reading the last real row again, and
a copy keeps the real ones (the FC's epilogue reads through it, so it costs no pass of its own). Other
matmuls keep TVM's legalization.
"""

from __future__ import annotations

import tvm
from tvm import relax, te

from targets.layout import channel_block
from targets.register_tiles import matmul_tile

MATMUL_BLOCK = "matmul"  # TVM's legalization of relax.matmul, loops (batch..., i, j, k), and ours
BOUNDED_PAIRS = "quantvm.bounded_pairs"  # the block attribute of an int8 conv or FC whose weight has bounded pairs
WHOLE_ROWS_CUT = "fc_whole_rows_cut"  # not "matmul...": the rules find the FC by that prefix


def matmul_whole_rows(data, weight, whole_rows: int | None = None, bounded_pairs: bool = False):
    """data [..., M, K] @ weight [K, N] -> int32 [..., M, N], computed over `whole_rows` >= M rows (None: M).
    `bounded_pairs`: the weight's pairs are bounded (marks the block BOUNDED_PAIRS, targets.bounded_pairs)."""
    *batch, rows, depth = (int(d) for d in data.shape)
    columns = int(weight.shape[1])
    whole_rows = whole_rows or rows
    k = te.reduce_axis((0, depth), name="k")
    product = te.compute(
        (*batch, whole_rows, columns),
        lambda *i: te.sum(data[(*i[:-2], te.min(i[-2], rows - 1), k)].astype("int32")
                          * weight[k, i[-1]].astype("int32"), axis=k),
        name=MATMUL_BLOCK, attrs={BOUNDED_PAIRS: 1} if bounded_pairs else None)
    if whole_rows == rows:
        return product
    return te.compute((*batch, rows, columns), lambda *i: product(*i), name=WHOLE_ROWS_CUT)


def whole_rows(call: relax.Call, tile_lanes: int) -> int | None:
    """The rows an int8 FC computes when its register tile is ragged, else None (TVM's legalization)."""
    data, weight = call.args
    if (str(data.ty.dtype) not in ("uint8", "int8") or str(weight.ty.dtype) != "int8" or weight.ty.ndim != 2
            or data.ty.ndim < 2 or str(call.ty.dtype) != "int32"):
        return None
    rows, columns = int(data.ty.shape.values[-2]), int(weight.ty.shape.values[1])
    lanes = channel_block(columns, tile_lanes)
    if lanes is None:
        return None
    tile_rows, _, ragged = matmul_tile(rows, columns // lanes, tile_lanes)
    return -(-rows // tile_rows) * tile_rows if ragged else None


def legalize_matmul(default, tile_lanes: int):
    """A LegalizeOps override for relax.matmul: int8 FCs with ragged row tiles here, the rest to `default`."""

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        rows = whole_rows(call, tile_lanes)
        if rows is None:
            return default(bb, call)
        return bb.call_te(matmul_whole_rows, call.args[0], call.args[1], rows, primfunc_name_hint="matmul")

    return legalize


def legalize_default(op_name: str):
    return tvm.ir.Op.get(op_name).get_attr("FLegalize")
