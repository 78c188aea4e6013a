"""The fused attention kernel (relay_passes.patterns' `attention` rule): scores, softmax and context for one
block of query rows at a time, so the [.., queries, keys] scores stay in cache instead of going through
memory three times (SVTR's 960 tokens: 22 MB per layer).

Inside a block, the query rows run across the vector lanes: every intermediate is laid out [.., key, row]
and every pass is a loop over keys of vector operations on rows.
- scores[key, rows] = sum_k keys_t[k, key] * queries_t[k, rows]: a register tile of keys x a vector of rows,
  the key a broadcast scalar, the queries a transposed copy of the block's rows;
- the softmax's max and sum over the keys are vector max/add across key steps (no horizontal reduction),
  its exp and normalization vector passes (the scale and mask inlined into them);
- context[d, rows] = sum_key v[key, d] * probs[key, rows]: a register tile of head columns x a vector of rows,
  stored transposed into [.., rows, d] once per tile.
Nothing depends on the key count or the head size being a multiple of a vector (SVTR's heads are 20 wide);
the query count is (the fusion rule checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

from targets.layout import vector_lanes
from targets.register_tiles import (
    ACCUMULATOR_SCOPE,
    MIN_TILE_ACCUMULATORS,
    TILE_REGISTERS,
    max_accumulators,
)
from targets.registry import TargetSpec

SOFTMAX_BLOCKS = ("T_softmax_maxelem", "T_softmax_exp", "T_softmax_expsum", "T_softmax_norm")
# Vectors of query rows per block, by vector lanes. Two give each broadcast key twice the FMAs: on AVX2
# (16 registers) SVTR ran 25% faster in all (its attention 6.8 -> 5.4 ms a layer; four: 10% slower than
# two). On AVX-512 two measured slower: SVTR's 960-token attention 3.7 vs 3.3 ms, 128-token heads of 64
# 0.37 vs 0.36 ms.
ROW_VECTORS = {8: 2, 16: 1}


@dataclass(frozen=True)
class AttentionBlocks:
    scores: object
    between: tuple  # the scale and mask passes between the scores and the softmax (inlined)
    maxelem: object
    exp: object
    expsum: object
    norm: object
    context: object


def attention_blocks(sch) -> AttentionBlocks | None:
    """The blocks of a fused attention kernel (two batch matmuls around TOPI's softmax blocks, the context
    the kernel's output), or None."""
    from targets.schedules import _all_blocks
    from targets.transformer import _batch_matmul_operands

    blocks = list(_all_blocks(sch))
    names = [sch.get(b).name_hint for b in blocks]
    if not all(n in names for n in SOFTMAX_BLOCKS):
        return None
    matmuls = [i for i, b in enumerate(blocks) if _batch_matmul_operands(sch, b) is not None]
    softmax = [names.index(n) for n in SOFTMAX_BLOCKS]
    if len(matmuls) != 2 or not matmuls[0] < min(softmax) < max(softmax) < matmuls[1] == len(blocks) - 1:
        return None
    maxelem, exp, expsum, norm = (blocks[i] for i in softmax)
    between = tuple(blocks[matmuls[0] + 1:softmax[0]])
    return AttentionBlocks(blocks[matmuls[0]], between, maxelem, exp, expsum, norm, blocks[matmuls[1]])


def _swap_last_two(*axes):
    *outer, a, b = axes
    return (*outer, b, a)


def schedule_attention(sch, blocks: AttentionBlocks, spec: TargetSpec) -> str | None:
    """Schedule the fused kernel; None (nothing changed) where the query count is not whole blocks of rows."""
    lanes = vector_lanes(spec)
    queries = int(sch.get(sch.get_loops(blocks.context)[-3]).extent)
    rows_per_block = lanes * ROW_VECTORS.get(lanes, 1)  # (the fusion rule's query multiple is one of these)
    if queries % rows_per_block:
        return None
    for block in blocks.between:
        sch.compute_inline(block)
    queries_t = sch.cache_read(blocks.scores, 0, "global")
    for block in (queries_t, blocks.scores, blocks.exp, blocks.norm):
        sch.transform_layout(block, ("write", 0), _swap_last_two)
    store = sch.cache_write(blocks.context, 0, ACCUMULATOR_SCOPE)
    sch.transform_layout(blocks.context, ("write", 0), _swap_last_two)

    # one parallel loop over (batch..., vectors of query rows); every pass computed under it
    *batch, rows, _ = sch.get_loops(store)
    row_block, _ = sch.split(rows, [None, rows_per_block])
    anchor = sch.fuse(*batch, row_block)
    sch.parallel(anchor)
    for block in (blocks.context, blocks.norm, blocks.expsum, blocks.exp, blocks.maxelem, blocks.scores, queries_t):
        sch.compute_at(block, anchor)

    vectors = rows_per_block // lanes
    _register_tile(sch, blocks.scores, sch.cache_write(blocks.scores, 0, ACCUMULATOR_SCOPE), lanes, vectors,
                   vectorized_store=True)
    for block in (blocks.maxelem, blocks.exp, blocks.expsum):
        _rows_in_lanes(sch, block)
    # the normalization inside the context's tile: one multiply per key and row vector (the same product for
    # every head column of the tile), not a pass of its own over the probabilities
    sch.compute_inline(blocks.norm)
    _register_tile(sch, blocks.context, store, lanes, vectors, vectorized_store=False)  # a transposing store
    return "attention"


def _register_tile(sch, block, store, lanes: int, vectors: int, vectorized_store: bool) -> None:
    """loops (rows, cols, red) -> (col tiles, red, cols in tile, rows): a tile of cols x `vectors` vectors of
    rows accumulated in registers, stored by `store` once per tile."""
    from targets.schedules import _split_init

    rows, cols, red = sch.get_loops(block)[-3:]
    col_tile, col = sch.split(cols, [None, _tile_width(int(sch.get(cols).extent), lanes, vectors)])
    sch.reorder(col_tile, red, col, rows)
    sch.reverse_compute_at(store, col_tile, preserve_unit_loops=True)
    if vectorized_store:
        sch.vectorize(sch.get_loops(store)[-1])
    sch.unroll(col)
    sch.vectorize(rows)
    _split_init(sch, block, red)


def _tile_width(extent: int, lanes: int, vectors: int) -> int:
    """Columns (keys, or head columns) per register tile of `vectors` vectors of rows: the widest that
    divides the extent with enough accumulators, else the widest that fits (the last tile cut short)."""
    # a register for each vector of rows; the accumulators' buffer small enough to stay in registers
    widest = min((TILE_REGISTERS[lanes] - vectors) // vectors, max_accumulators(lanes) // vectors)
    exact = max(w for w in range(1, min(widest, extent) + 1) if extent % w == 0)
    return exact if exact * vectors >= min(MIN_TILE_ACCUMULATORS, extent * vectors) else min(widest, extent)


def _rows_in_lanes(sch, block) -> None:
    """loops (rows, keys) -> (keys, rows): a vector operation per key; a reduction's accumulators zeroed in a
    vector pass before the keys loop."""
    from targets.schedules import _is_reduction, _split_init

    rows, keys = sch.get_loops(block)[-2:]
    sch.reorder(keys, rows)
    sch.vectorize(rows)
    if _is_reduction(sch, block):
        _split_init(sch, block, keys)
