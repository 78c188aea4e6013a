"""Winograd F(m x m, 3 x 3) for fp32 blocked 3x3 convs of stride 1: each m x m tile of output pixels costs
(m + 2)^2 multiplies per input x output channel instead of 9 m^2 (F(2x2, 3x3): 2.25x fewer).

The kernel is three passes over NCHW{b} tensors (b: the channel block):
- input transform: every (m+2) x (m+2) input patch d, as V = B^T d B, into V[k, C/b, tile, b] (k = xi * (m+2) + nu);
- (m+2)^2 independent GEMMs over the input channels, M[k, O/b, tile, b] = sum_c V[k, c, tile] * U[k, c, o], with
  the weight's transform U = G g G^T done once, at compile time (winograd_weight);
- output transform Y = A^T M A into the conv's [N, O/b, H, W, b], with the conv's fused epilogue (bias,
  activation, residual add) inlined into it.
Tiles run over the batch too, so a batch of images is one longer GEMM. The transforms are written as sums of
their nonzero terms (+-1 as adds), one expression per k selected by the unrolled k loop.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx, topi
from tvm.topi.nn.winograd_util import (  # TVM's Cook-Toom construction (public only as TE constants)
    _cook_toom_convolution,
    _interpolation_points,
)

from targets.layout import vector_lanes
from targets.register_tiles import (
    ACCUMULATOR_SCOPE,
    MAX_CHANNEL_BLOCKS,
    TILE_REGISTERS,
    conv_tile,
)

KERNEL = 3
INPUT_ROWS = "winograd_input_rows"
INPUT_BLOCK = "winograd_input"
OUTPUT_COLUMNS = "winograd_output_columns"
GEMM_BLOCK = "winograd_gemm"
# the GEMM block's annotations: what the schedule of the output pass needs of the conv
TILE_ATTR, DILATION_ATTR = "winograd_tile", "winograd_dilation"
OUTPUT_BLOCK = "winograd_output"


def transform_matrices(tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A [alpha, m], B [alpha, alpha], G [alpha, 3]) of F(m, 3), alpha = m + 2: Y = A^T [(G g G^T) * (B^T d B)] A."""
    return _cook_toom_convolution(_interpolation_points(tile + KERNEL - 2), tile, KERNEL)


def winograd_weight_shape(shape, tile: int) -> list:
    """The shape winograd_weight gives a blocked weight of `shape` [O/b, C/b, 3, 3, b(i), b(o)]."""
    chunks_out, chunks_in, _, _, block_in, block_out = shape
    return [(tile + KERNEL - 1) ** 2, chunks_out, chunks_in, block_in, block_out]


def winograd_weight(weight: np.ndarray, tile: int) -> np.ndarray:
    """A blocked fp32 conv weight [O/b, C/b, 3, 3, b(i), b(o)] as the GEMMs read it: U [alpha^2, O/b, C/b, b(i), b(o)]."""
    _, _, g = transform_matrices(tile)
    u = np.einsum("xr,ocrsij,ys->xyocij", g, weight.astype(np.float64), g)
    return np.ascontiguousarray(u.reshape(winograd_weight_shape(weight.shape, tile)).astype(np.float32))


def _combination(coefficients, terms):
    """sum(c * t) over the nonzero coefficients, +-1 as adds and subtracts."""
    result = None
    for c, term in zip(coefficients, terms):
        if c == 0:
            continue
        if abs(c) != 1:
            term = term * tirx.const(float(abs(c)), "float32")
        if result is None:
            result = term if c > 0 else -term
        else:
            result = result + term if c > 0 else result - term
    return result if result is not None else tirx.const(0.0, "float32")


def _select(index, choices):
    """choices[index]: folds to one choice once the loop over `index` is unrolled."""
    expr = choices[-1]
    for i in range(len(choices) - 2, -1, -1):
        expr = tirx.Select(index == i, choices[i], expr)
    return expr


def conv2d_winograd_nchwc(data, weight, padding, dilation, tile: int):
    """conv2d(data [N, C/b, H, W, b], 3x3, stride 1) with `weight` from winograd_weight(.., tile).

    A conv of dilation d is d x d convs without, one per phase of the output (its rows y = p + d q read rows
    p + d (q + r)): tiles run over (image, tile row, tile column, phase row, phase column)."""
    n, in_chunks, height, width, block = (int(d) for d in data.shape)
    out_chunks, out_block = int(weight.shape[1]), int(weight.shape[4])
    a, b, _ = transform_matrices(tile)
    alpha = tile + KERNEL - 1
    top, left, bottom, right = padding
    dil_h, dil_w = dilation
    out_h = height + top + bottom - (KERNEL - 1) * dil_h
    out_w = width + left + right - (KERNEL - 1) * dil_w
    tiles_h, tiles_w = -(-out_h // (tile * dil_h)), -(-out_w // (tile * dil_w))
    tiles = n * tiles_h * tiles_w * dil_h * dil_w
    # whole tiles: the last ones read zeros past the padding, and their extra outputs are never stored
    pad = topi.nn.pad(data, [0, 0, top, left, 0],
                      [0, 0, dil_h * (tiles_h * tile + KERNEL - 1) - height - top,
                       dil_w * (tiles_w * tile + KERNEL - 1) - width - left, 0],
                      pad_value=0.0, name="winograd_pad")

    def tile_index(image, tile_y, tile_x, phase_y, phase_x):
        return (((image * tiles_h + tile_y) * tiles_w + tile_x) * dil_h + phase_y) * dil_w + phase_x

    def patch(t):
        """(image, first row, first column) of tile t's patch in the padded input"""
        phases = dil_h * dil_w
        image, tile_y, tile_x = t // (phases * tiles_w * tiles_h), t // (phases * tiles_w) % tiles_h, t // phases % tiles_w
        phase_y, phase_x = t // dil_w % dil_h, t % dil_w
        return image, phase_y + dil_h * tile_y * tile, phase_x + dil_w * tile_x * tile

    # B^T d B in two passes of alpha-term sums (one pass of alpha^2-term sums: 30x the code to compile)
    def input_rows(xi, s, chunk, t, lane):
        image, y0, x0 = patch(t)
        return _select(xi, [_combination(b[:, x], [pad[image, chunk, y0 + dil_h * r, x0 + dil_w * s, lane]
                                                    for r in range(alpha)])
                            for x in range(alpha)])

    rows = te.compute((alpha, alpha, in_chunks, tiles, block), input_rows, name=INPUT_ROWS)
    v = te.compute((alpha * alpha, in_chunks, tiles, block),
                   lambda k, chunk, t, lane: _select(k % alpha, [
                       _combination(b[:, nu], [rows[k // alpha, s, chunk, t, lane] for s in range(alpha)])
                       for nu in range(alpha)]),
                   name=INPUT_BLOCK)
    ic_outer = te.reduce_axis((0, in_chunks), name="ic_outer")
    ic_inner = te.reduce_axis((0, block), name="ic_inner")
    m = te.compute((alpha * alpha, out_chunks, tiles, out_block),
                   lambda k, oc, t, lane: te.sum(v[k, ic_outer, t, ic_inner] * weight[k, oc, ic_outer, ic_inner, lane],
                                                 axis=[ic_outer, ic_inner]),
                   name=GEMM_BLOCK, attrs={TILE_ATTR: tile, DILATION_ATTR: [dil_h, dil_w]})

    # A^T M A, likewise in two passes: M's columns, then the pixels of the conv's output
    columns = te.compute((tile, alpha, out_chunks, tiles, out_block),
                         lambda i, nu, oc, t, lane: _select(i, [
                             _combination(a[:, row], [m[xi * alpha + nu, oc, t, lane] for xi in range(alpha)])
                             for row in range(tile)]),
                         name=OUTPUT_COLUMNS)

    def output_pixel(image, oc, y, x, lane):
        t = tile_index(image, y // dil_h // tile, x // dil_w // tile, y % dil_h, x % dil_w)
        return _select(x // dil_w % tile, [
            _combination(a[:, j], [columns[y // dil_h % tile, nu, oc, t, lane] for nu in range(alpha)])
            for j in range(tile)])

    return te.compute((n, out_chunks, out_h, out_w, out_block), output_pixel, name=OUTPUT_BLOCK)


def schedule_winograd(sch, spec, tiles) -> str | None:
    """Schedule a Winograd conv kernel (its three passes, and the epilogue fused after it); None if `sch` is
    not one."""
    from targets.schedules import _all_blocks, _epilogue, _schedule_spatial_block

    blocks = {sch.get(b).name_hint: b for b in _all_blocks(sch)}
    if not {INPUT_ROWS, INPUT_BLOCK, GEMM_BLOCK, OUTPUT_COLUMNS, OUTPUT_BLOCK} <= blocks.keys():
        return None
    annotations = sch.get(blocks[GEMM_BLOCK]).annotations
    tile, dilation = int(annotations[TILE_ATTR]), tuple(int(d) for d in annotations[DILATION_ATTR])
    _schedule_input_transform(sch, blocks[INPUT_ROWS], blocks[INPUT_BLOCK])
    _schedule_gemm(sch, blocks[GEMM_BLOCK], vector_lanes(spec), tiles)
    output = blocks[OUTPUT_BLOCK]
    stores = _epilogue(sch, output)
    tail = stores[0] if len(stores) == 1 else None
    if tail is None and sch.get_consumers(output):  # read by several outputs: stored, its readers apart
        for block in _all_blocks(sch):
            if sch.get(block).name_hint not in (INPUT_ROWS, INPUT_BLOCK, GEMM_BLOCK, OUTPUT_COLUMNS, OUTPUT_BLOCK):
                _schedule_spatial_block(sch, block, spec)
    if tail is None:
        tail = output
    else:
        sch.compute_inline(output)
    _schedule_output_transform(sch, blocks[OUTPUT_COLUMNS], tail, tile, dilation)
    return f"conv2d_winograd_nchwc[F({tile}x{tile},3x3)]"


def _schedule_input_transform(sch, rows, block) -> None:
    """One patch per (channel block, tile), both passes unrolled over it, the lanes a vector. The padding is
    inlined (a bounds check per pixel, not per multiply-add as in a direct conv)."""
    from targets.schedules import _inline_producers, _parallel_if_worth_it

    _inline_producers(sch, rows)
    k, chunk, t, lane = sch.get_loops(block)
    sch.reorder(chunk, t, k, lane)
    sch.unroll(k)
    sch.vectorize(lane)
    _unrolled_at(sch, rows, t)
    _parallel_if_worth_it(sch, block, sch.fuse(chunk, t))


def _unrolled_at(sch, block, loop) -> None:
    """`block` computed under `loop`, into a buffer of its own (ACCUMULATOR_SCOPE: an alloca, registers, while
    under 1024 bytes), its loops unrolled but the lanes."""
    sch.compute_at(block, loop, preserve_unit_loops=True)
    sch.set_scope(block, 0, ACCUMULATOR_SCOPE)
    loops = sch.get_loops(block)
    under = next(i for i, l in enumerate(loops) if sch.get(l).same_as(sch.get(loop))) + 1
    *outer, lane = loops[under:]
    for inner in outer:
        sch.unroll(inner)
    sch.vectorize(lane)


def _schedule_gemm(sch, block, lanes: int, tiles) -> None:
    """As a 1x1 conv's register tile (targets.schedules): tiles x output-channel blocks in registers, the
    transformed input a broadcast, the weight a vector; parallel over (k, channel blocks, tiles)."""
    from targets.schedules import _extent, _parallel_if_worth_it, _split_init, _store_tile_at

    k, oc, t, lane, ic_outer, ic_inner = sch.get_loops(block)
    tile_w, tile_c, ragged = conv_tile(_extent(sch, t), _extent(sch, oc), lanes, allow_ragged=True)
    if ragged:
        t_o, t_i = sch.split(t, [None, tile_w])
    else:
        t_o, t_i = tiles.split(sch, t, tile_w, TILE_REGISTERS[lanes])
    oc_o, oc_i = tiles.split(sch, oc, tile_c, MAX_CHANNEL_BLOCKS)
    store = sch.cache_write(block, 0, ACCUMULATOR_SCOPE)
    sch.reorder(k, oc_o, t_o, ic_outer, ic_inner, t_i, oc_i, lane)
    _store_tile_at(sch, [store], t_o)
    _parallel_if_worth_it(sch, block, sch.fuse(k, oc_o, t_o))
    sch.unroll(t_i)
    sch.unroll(oc_i)
    sch.vectorize(lane)
    _split_init(sch, block, ic_outer)


def _schedule_output_transform(sch, columns, block, tile: int, dilation: tuple[int, int]) -> None:
    """Each tile's m x m pixels from one read of its (m + 2)^2 GEMM outputs, the lanes a vector. With a
    dilation, the pixels of a tile are d apart: the output's loops go (tile, phase, pixel in the tile), and
    the column pass runs on its own before (TVM cannot bound what one phase of a tile reads of it)."""
    from targets.schedules import _parallel_if_worth_it

    image, chunk, y, x, lane = sch.get_loops(block)
    y_o, y_i, y_phase = sch.split(y, [None, tile, dilation[0]])
    x_o, x_i, x_phase = sch.split(x, [None, tile, dilation[1]])
    sch.reorder(image, chunk, y_o, x_o, y_phase, x_phase, y_i, x_i, lane)
    sch.unroll(y_i)
    sch.unroll(x_i)
    sch.vectorize(lane)
    if dilation == (1, 1):
        _unrolled_at(sch, columns, x_phase)
    else:
        i, nu, oc, t, column_lane = sch.get_loops(columns)
        sch.reorder(oc, t, i, nu, column_lane)
        sch.unroll(i)
        sch.unroll(nu)
        sch.vectorize(column_lane)
        _parallel_if_worth_it(sch, columns, sch.fuse(oc, t))
    _parallel_if_worth_it(sch, block, sch.fuse(image, chunk, y_o))
