"""Rule-based TIR schedules for a transformer's kernels (targets.schedules dispatches here first).

- A layer norm over the channels of a blocked tensor (ConvNeXt's): targets.channel_norm's schedule.
- Row kernels (softmax, layer norm, and any kernel of reductions over the innermost axis with elementwise
  passes over the same rows): parallel over rows, each row's passes computed under its row (its
  intermediates stay in cache), reductions vectorized through an rfactor across the vector's lanes,
  elementwise passes vectorized; elementwise producers and consumers inlined into the row.
- Batch matmul between two activations (attention's Q.K^T and P.V; loops (batch..., i, j, k)): fp32 by
  the dense matmul rule (register tile, FMA on vectors of j); int8 with the second operand packed inside
  the kernel to [batch..., N/lanes, K/4, lanes, 4] so that the target's dot intrinsic
  (targets.intrinsics) takes it, as a packed weight would be.
- GELU's erf and softmax's exp are vector arithmetic (targets.vector_math), wherever they are: a dense
  matmul's GELU epilogue is the matmul rule's (targets.schedules folds it into the register tile).
"""

from __future__ import annotations

import tvm
from tvm import tirx

import targets.vector_math  # noqa: F401 - erf and exp lowered to vector arithmetic for every kernel
from targets.attention import attention_blocks, schedule_attention
from targets.channel_norm import is_blocked_channel_norm, schedule_channel_norm
from targets.intrinsics import int8_dot_intrinsic
from targets.layout import INT8_GROUP, vector_lanes
from targets.register_tiles import MAX_CHANNEL_BLOCKS, TILE_REGISTERS, register_tile
from targets.registry import TargetSpec

ROW_REDUCTION_RULES = {"T_softmax_norm": "softmax", "T_layer_norm": "layer_norm"}


def schedule_transformer_kernel(sch, spec: TargetSpec, tiles) -> str | None:
    """Schedule the kernel in `sch` if it is one of a transformer's and return the rule's name; else None,
    the kernel untouched."""
    from targets.schedules import MATMUL_BLOCK, _all_blocks  # here: targets.schedules imports this module

    attention = attention_blocks(sch)
    if attention is not None:
        rule = schedule_attention(sch, attention, spec)
        if rule is not None:
            return rule
    blocks = {sch.get(b).name_hint: b for b in _all_blocks(sch)}
    for block in blocks.values():
        if _batch_matmul_operands(sch, block) is not None:
            return schedule_batch_matmul(sch, block, spec, tiles)
    if any(name.startswith(MATMUL_BLOCK) for name in blocks):
        return None  # a dense matmul (a weight): the matmul rule's, GELU epilogue and all
    if is_blocked_channel_norm(sch):
        schedule_channel_norm(sch, spec)
        return "channel_norm"
    rule = _row_rule(sch, blocks)
    if rule is not None and _schedules_cleanly(sch, spec):
        schedule_rows(sch, spec)
        return rule
    return None


def _row_rule(sch, blocks: dict) -> str | None:
    """softmax, layer_norm, or row_reduction for other kernels whose every reduction is over the innermost
    axis (a mean or sum with the passes around it); None for the rest."""
    from targets.schedules import _is_reduction

    named = next((r for n, r in ROW_REDUCTION_RULES.items() if n in blocks), None)
    reductions = [b for b in blocks.values() if _is_reduction(sch, b)]
    if named is not None or not reductions:
        return named
    return "row_reduction" if all(_reduces_innermost_only(sch, b) for b in reductions) else None


def _reduces_innermost_only(sch, block) -> bool:
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    return kinds[-1] == tirx.IterVar.CommReduce and all(k == tirx.IterVar.DataPar for k in kinds[:-1])


def _schedules_cleanly(sch, spec: TargetSpec) -> bool:
    """The row schedule tried on a copy: a kernel it does not fit keeps the generic rule, not a failure."""
    try:
        return schedule_rows(sch.copy(), spec)
    except tvm.TVMError:
        return False


# --- row kernels -------------------------------------------------------------------------------------------

def schedule_rows(sch, spec: TargetSpec) -> bool:
    """Parallel rows, each row's reductions and elementwise passes computed under it, vectorized.
    False, with the kernel untouched, where the output is not an elementwise pass over rows."""
    from targets.schedules import _all_blocks, _is_reduction, _parallel_prefix

    if _is_reduction(sch, list(_all_blocks(sch))[-1]):
        return False
    lanes = vector_lanes(spec)
    _inline_row_passes(sch)
    partials = [p for p in (_lane_partials(sch, b, lanes) for b in _all_blocks(sch) if _is_reduction(sch, b)) if p]
    *passes, output = _all_blocks(sch)
    *rows, _ = sch.get_loops(output)
    row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
    for block in reversed(passes):
        sch.compute_at(block, row)
    _parallel_prefix(sch, [row], spec)
    for block in passes:
        if not _is_reduction(sch, block):
            _vectorize_innermost(sch, block, lanes)
    for partial in partials:
        # compute_at made the loops (row, lane, outer): the partials' block iterators' order
        _, lane_loop, outer_loop = sch.get_loops(partial)
        sch.reorder(outer_loop, lane_loop)
        sch.vectorize(lane_loop)  # before the init is split off: TVM refuses it on the update block after
        init = sch.decompose_reduction(partial, outer_loop)
        sch.vectorize(sch.get_loops(init)[-1])
    _vectorize_innermost(sch, output, lanes)
    return True


def _lane_partials(sch, block, lanes: int):
    """A sum/max over a row as `lanes` partial results (one vector register) and a horizontal step
    (rfactor; before compute_at, which rfactor cannot see through); the partials' block, or None."""
    loops = sch.get_loops(block)
    extent = int(sch.get(loops[-1]).extent)
    if extent % lanes or extent < 2 * lanes:
        return None
    _, lane = sch.split(loops[-1], [None, lanes])
    return sch.rfactor(lane, factor_axis=0)


def _inline_row_passes(sch):
    """Inline every elementwise block but the output and the row-wide passes between two reductions
    (softmax's exp: inlined, it would be computed twice): a mask add, a scale, a mean's divide, the
    normalization into a quantize that follows it."""
    from targets.schedules import _all_blocks, _is_reduction

    *blocks, output = _all_blocks(sch)
    rank = len(sch.get(output).writes[0].region)
    for block in blocks:
        if _is_reduction(sch, block):
            continue
        between = (any(_is_reduction(sch, b) for b in sch.get_producers(block))
                   and any(_is_reduction(sch, b) for b in sch.get_consumers(block)))
        if not (between and len(sch.get(block).writes[0].region) == rank):
            sch.compute_inline(block)


def _vectorize_innermost(sch, block, lanes: int):
    """The row's own loop (the one under the row loop), if the block has one that `lanes` divides."""
    loops = sch.get_loops(block)
    if len(loops) < 2:
        return
    extent = int(sch.get(loops[-1]).extent)
    if extent % lanes == 0:
        _, lane = sch.split(loops[-1], [None, lanes])
        sch.vectorize(lane)


# --- batch matmul between activations ----------------------------------------------------------------------

def _batch_matmul_operands(sch, block):
    """(a, b) buffers of out[*batch, i, j] += a[*batch, i, k] * b[*batch, k, j] with at least one batch
    axis and both operands indexed by the block's own iterators, else None."""
    stmt = sch.get(block)
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    if len(kinds) < 4 or kinds[-1] != tirx.IterVar.CommReduce or any(k != tirx.IterVar.DataPar for k in kinds[:-1]):
        return None
    names = [iv.var for iv in stmt.iter_vars]
    *batch, i, j, k = names
    reads = [r for r in stmt.reads if not r.source.same_as(stmt.writes[0].source)]
    if len(reads) != 2:
        return None
    indices = [[rng.min for rng in r.region] for r in reads]
    if not (_same_vars(indices[0], [*batch, i, k]) and _same_vars(indices[1], [*batch, k, j])):
        return None
    return reads[0].source, reads[1].source


def _same_vars(exprs, variables) -> bool:
    return len(exprs) == len(variables) and all(isinstance(e, tirx.Var) and e.same_as(v)
                                                 for e, v in zip(exprs, variables))


def schedule_batch_matmul(sch, block, spec: TargetSpec, tiles) -> str:
    """int8 operands by the dot intrinsic where it fits, fp32 by the dense matmul rule."""
    from targets.schedules import (
        _inline_producers,
        _is_vectorizable_matmul,
        _pad_producers,
        _schedule_generic,
        _schedule_matmul,
        pad_ragged_columns,
    )

    a, b = _batch_matmul_operands(sch, block)
    if str(a.dtype) in ("int8", "uint8"):
        _pad_producers(sch, block, spec)  # a producer pass stays one (the intrinsic reads int8 buffers)
        rule = _schedule_int8_batch_matmul(sch, block, spec, tiles, str(a.dtype), str(b.dtype))
        return rule or f"batch_matmul_int8_{_schedule_generic(sch, spec)}"
    _inline_producers(sch, block)
    pad_ragged_columns(sch, block, spec)
    if _is_vectorizable_matmul(sch, block, spec):
        return f"batch_{_schedule_matmul(sch, block, spec, tiles)}"
    return f"batch_matmul_{_schedule_generic(sch, spec)}"


def _schedule_int8_batch_matmul(sch, block, spec: TargetSpec, tiles, a_dtype: str, b_dtype: str) -> str | None:
    """b packed [*batch, N/lanes, K/4, lanes, 4] by a parallel pass of its own, then a register tile of rows
    x vectors of j, the dot intrinsic on each (lanes x 4) block; None where the shapes or target do not fit
    (nothing changed then)."""
    from targets.schedules import (
        _accumulator_stores,
        _parallel_prefix,
        _schedule_spatial_block,
        _split_init,
        _store_tile_at,
    )

    *outer, row, col, red = sch.get_loops(block)
    columns, depth = int(sch.get(col).extent), int(sch.get(red).extent)
    lanes = vector_lanes(spec)
    if columns % lanes and columns % 8 == 0:
        lanes = 8
    intrinsic = int8_dot_intrinsic(spec, lanes, a_dtype) if b_dtype == "int8" else None
    if intrinsic is None or columns % lanes or depth % INT8_GROUP:
        return None
    batch_rank = len(outer)
    pack = sch.cache_read(block, 1, "global")
    sch.transform_layout(pack, ("write", 0), _packing(batch_rank, lanes))
    _schedule_spatial_block(sch, pack, spec)
    registers = TILE_REGISTERS[vector_lanes(spec)]
    rows, vectors = register_tile(int(sch.get(row).extent), columns // lanes, vector_lanes(spec))
    stores = _accumulator_stores(sch, block)
    col_v, col_l = sch.split(col, [None, lanes])
    col_o, col_v = tiles.split(sch, col_v, vectors, MAX_CHANNEL_BLOCKS)
    row_o, row_i = tiles.split(sch, row, rows, registers)
    red, group = sch.split(red, [None, INT8_GROUP])
    sch.reorder(*outer, row_o, col_o, red, row_i, col_v, col_l, group)
    _store_tile_at(sch, stores, col_o, lanes)
    _parallel_prefix(sch, [*outer, row_o, col_o], spec, block)
    sch.unroll(row_i)
    sch.unroll(col_v)
    _split_init(sch, block, red)
    sch.tensorize(col_l, intrinsic)
    return f"batch_matmul_int8[{intrinsic}]"


def _packing(batch_rank: int, lanes: int):
    """(*batch, k, j) -> (*batch, j/lanes, k/4, j%lanes, k%4): each lanes x 4 block contiguous."""

    def index_map(*axes):
        *batch, k, j = axes
        return (*batch, j // lanes, k // INT8_GROUP, j % lanes, k % INT8_GROUP)

    return index_map
