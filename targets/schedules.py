"""Rule-based TIR schedules: every kernel of a lowered graph gets one, chosen from its shape and the target.

- Blocked conv2d (targets.conv2d): a register tile of output pixels x output-channel blocks, the channel
  block vectorized (FMA for fp32; the target's u8 x s8 dot intrinsic for int8), the fused epilogue (bias,
  folded BN, requantize, activation, residual add, quantize) computed on the tile before it is stored,
  parallel over batch x channel blocks x rows.
- Dense/matmul and everything else (pooling, elementwise, layout edges): outer loops parallel, the
  contiguous inner loop vectorized.
A kernel a rule cannot schedule stays as TVM lowered it (correct, slower) and is named in the report.

Register tiles are the rules' choice (`RULE_TILES`), or with `SampledTiles` MetaSchedule decisions that
start at the rules' choice, so that tuning (targets.tuning) searches around the default schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import tvm
from tvm import s_tir, tirx

from targets.conv2d import CONV_BLOCK, DEPTHWISE_BLOCK
from targets.dense import BOUNDED_PAIRS, MATMUL_BLOCK
from targets.intrinsics import int8_dot_intrinsic
from targets.layout import INT8_GROUP, vector_lanes
from targets.register_tiles import (
    ACCUMULATOR_SCOPE,
    MAX_CHANNEL_BLOCKS,
    TILE_REGISTERS,
    conv_tile,
    matmul_tile,
    max_accumulators,
    register_tile,
)
from targets.registry import TargetSpec
from targets.resize import schedule_resize
from targets.winograd import schedule_winograd

# The weights one register tile's reduction streams, at most: about half an L2 (Zen 3 has 512 KB, Zen 4 1 MB,
# Sapphire/Emerald Rapids 2 MB). Above it, a 2048-channel 3x3 conv ran at a third of its speed.
WEIGHT_PANEL_BYTES = 768 * 1024
POINTWISE_VECTORS = 8  # vectors of pixels in a pointwise NCHW conv's register tile, at most
NARROW_LANES = 4  # the narrowest vector a rule uses where no full or half vector divides the columns
PLAIN_CONV_BLOCK = "conv2d_nchw"  # TOPI's conv2d in NCHW: a conv the layout pass left unblocked
# Below this many loop iterations a kernel runs on one thread: waking the pool costs more than it saves.
# Measured on Zen 4, 2 threads: a wake-up costs 3-4 us, a 128x512 matvec (1 << 16 multiply-adds) takes ~1.5 us
# on one thread; at 1 << 16, vad_lstm_streaming's 4 small parallel kernels made it 1.5x slower on 2 threads
# than on 1. From 1 << 18 (several us on one thread) halving the time pays for the wake-up.
MIN_PARALLEL_WORK = 1 << 18
# An unvectorized copy costs about a nanosecond an element (SSDlite's class head transposed into rows of 91
# classes: 218K elements, 0.18 ms on one thread), so from this many elements two threads pay for the wake-up.
MIN_PARALLEL_SCALAR_COPY = 1 << 15
# Aim for this many parallel chunks per core, so uneven rows still balance.
CHUNKS_PER_CORE = 4
# Vectors of a register tile's store that are unrolled (a tile has at most TILE_REGISTERS accumulators; a
# row's store, where the accumulators live in memory between input-channel chunks, stays a loop).
MAX_UNROLLED_STORES = 32
# What TVM marks a scheduled kernel with (MetaSchedule's tuned kernels too): those are left as they are.
IS_SCHEDULED = "tirx.is_scheduled"
# A kernel written already scheduled (targets.recurrent) names its rule here, for the compile report.
RULE_ATTR = "quantvm.rule"


class RuleTiles:
    """Register tiles as the rules choose them."""

    def split(self, sch, loop, inner: int, limit: int):
        return sch.split(loop, [None, inner])


class SampledTiles:
    """Register tiles as MetaSchedule decisions (any inner factor up to `limit` that divides the loop),
    the rules' choice first: the design space's trace holds the default schedule, and tuning mutates it."""

    def split(self, sch, loop, inner: int, limit: int):
        factors = sch.sample_perfect_tile(loop, n=2, max_innermost_factor=limit,
                                          decision=[_extent(sch, loop) // inner, inner])
        return sch.split(loop, factors)


RULE_TILES = RuleTiles()


@dataclass
class ScheduleLog:
    """What each kernel got: the rule's name, or why none applied; `tuned`: kernels scheduled before this
    pass ran (from a tuning database), left as they were."""
    applied: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)
    tuned: list = field(default_factory=list)


def schedule_module(mod: tvm.IRModule, spec: TargetSpec, log: ScheduleLog | None = None) -> tvm.IRModule:
    """Schedule every PrimFunc of `mod` for `spec`."""
    log = log if log is not None else ScheduleLog()
    updates = {}
    for gvar, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        name = gvar.name_hint
        if func.attrs and func.attrs.get(RULE_ATTR):
            log.applied[name] = str(func.attrs[RULE_ATTR])
            continue
        if func.attrs and func.attrs.get(IS_SCHEDULED):
            log.tuned.append(name)
            continue
        try:
            sch = s_tir.Schedule(func)
            log.applied[name] = schedule_kernel(sch, spec)
            updates[gvar] = sch.mod["main"].with_attr(IS_SCHEDULED, True)
        except Exception as err:  # noqa: BLE001 - any failure leaves the kernel as lowered, and says so
            log.failed[name] = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod


def schedule_pass(spec: TargetSpec, log: ScheduleLog | None = None) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="quantvm.schedule_kernels")
    def run(mod, _ctx):
        return schedule_module(mod, spec, log)

    return run


def schedule_kernel(sch: s_tir.Schedule, spec: TargetSpec, tiles=RULE_TILES) -> str:
    """Schedule the kernel in `sch` by the rule its shape calls for; return the rule's name."""
    winograd_rule = schedule_winograd(sch, spec, tiles)
    if winograd_rule is not None:
        return winograd_rule
    blocks = {sch.get(b).name_hint: b for b in _all_blocks(sch)}
    conv = next((b for n, b in blocks.items() if n.startswith(CONV_BLOCK)), None)
    if conv is not None:
        return _schedule_conv(sch, conv, spec, tiles)
    depthwise = next((b for n, b in blocks.items() if n.startswith(DEPTHWISE_BLOCK)), None)
    if depthwise is not None:
        _schedule_window(sch, depthwise, spec, tiles)
        return "depthwise_conv2d_nchwc"
    pool = _blocked_pool(sch, blocks, spec)
    if pool is not None:
        _schedule_window(sch, pool, spec, tiles)
        return "pool_nchwc"
    plain_conv = blocks.get(PLAIN_CONV_BLOCK)
    if plain_conv is not None and _is_pointwise(sch, plain_conv):
        return _schedule_pointwise_nchw(sch, plain_conv, spec, tiles)
    if plain_conv is not None and _width_lanes(sch, plain_conv, spec) is not None:
        return _schedule_plain_conv(sch, plain_conv, spec, tiles)
    resize_rule = schedule_resize(sch, spec)
    if resize_rule is not None:
        return resize_rule
    from targets.transformer import schedule_transformer_kernel  # it imports this module's helpers
    transformer_rule = schedule_transformer_kernel(sch, spec, tiles)
    if transformer_rule is not None:
        return transformer_rule
    matmul = next((b for n, b in blocks.items() if n.startswith(MATMUL_BLOCK)), None)
    if matmul is not None:
        _inline_producers(sch, matmul)  # a packed weight's unpacking: read the packed one directly
        pad_ragged_columns(sch, matmul, spec)  # a classifier of 97 or 6625 classes
        if _is_vectorizable_matmul(sch, matmul, spec):
            return _schedule_matmul(sch, matmul, spec, tiles)
    return _schedule_generic(sch, spec)


def _all_blocks(sch):
    try:
        return sch.get_child_blocks(sch.get_sblock("root"))
    except Exception:  # noqa: BLE001 - a function without a root block has nothing to schedule
        return []


def _extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


def _pad_producers(sch, block, spec):
    """Padding runs as its own parallel pass into a padded copy: inlined, its bounds checks would sit
    on every multiply-add of the reduction."""
    for producer in sch.get_producers(block):
        if not _is_reduction(sch, producer):
            _schedule_spatial_block(sch, producer, spec)


def _pad_rows_at(sch, conv, rows, spec):
    """Pad the input rows an fp32 conv's output row reads under that row's loop, into a buffer of a few rows:
    a padded copy of the whole input, in a pass of its own, went to memory and back (ResNet-50's strided 3x3
    convs at batch 8: 128 channels 6.9 -> 5.1 ms), and at batch 1 cost small convs a third of their time
    (YOLOv8-style 5% faster, ResNet-50 5%)."""
    for producer in sch.get_producers(conv):
        if _is_reduction(sch, producer):
            continue
        sch.compute_at(producer, rows, preserve_unit_loops=True)
        inner = sch.get_loops(producer)[-1]
        if _extent(sch, inner) in _vector_widths(spec):
            sch.vectorize(inner)


def _inline_producers(sch, block):
    for producer in sch.get_producers(block):
        if not _is_reduction(sch, producer):
            sch.compute_inline(producer)


def _inline_window_inputs(sch, block):
    """Inline the elementwise chain a window op reads, not only its padding: an int8 average pool's
    dequantize, behind the pad, was left a serial pass of its own over the whole input (Inception-v3's nine
    pools: 0.2-0.37 ms each, a quarter of the int8 model). Each input is read by at most a window's outputs."""
    while any(not _is_reduction(sch, p) for p in sch.get_producers(block)):
        _inline_producers(sch, block)


def _is_reduction(sch, block) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def _epilogue(sch, block) -> list:
    """Fold the elementwise blocks after `block` into the blocks that store the kernel's outputs; return
    those, in order (empty if there are none to fold into). They may read a value twice
    (x * clip(x + 3, 0, 6) / 6): all are inlined as long as they end in one block. A stored output may also
    be read on (an fp32 result and its quantized copy, relay_passes.fuse_elementwise): both are kept."""
    after = _downstream_blocks(sch, block)
    _inline_side_inputs(sch, block, after)
    sinks = [b for b in after if not sch.get_consumers(b)]
    if len(sinks) == 1 and not any(_is_reduction(sch, b) for b in after):
        outputs = _output_buffer_names(sch)
        stores = []
        for b in after:  # (the sink writes an output: a block writing none would be dead)
            if _written_buffer(sch, b) in outputs:
                stores.append(b)
            else:
                sch.compute_inline(b)
        return stores
    tail = _epilogue_chain(sch, block)
    return [] if tail is None else [tail]


def _inline_side_inputs(sch, block, after: list) -> None:
    """Inline the elementwise blocks that feed the epilogue from elsewhere (a residual's int8 copy dequantized,
    relay_passes.quantized_residuals): computed apart, they would sit between the reduction and its epilogue."""
    names = {sch.get(b).name_hint for b in after} | {sch.get(block).name_hint}
    for consumer in after:
        for producer in sch.get_producers(consumer):
            if sch.get(producer).name_hint not in names and not _is_reduction(sch, producer):
                sch.compute_inline(producer)


def _output_buffer_names(sch) -> set:
    """The kernel's parameters (its inputs and outputs): a block writing one stores an output."""
    return {p.name for p in sch.mod["main"].params}


def _written_buffer(sch, block) -> str:
    return sch.get(block).writes[0].source.name


def _downstream_blocks(sch, block) -> list:
    """The blocks that read `block`'s result, directly or not, in program order (the sink last)."""
    names = set()
    frontier = [block]
    while frontier:
        for consumer in sch.get_consumers(frontier.pop()):
            name = sch.get(consumer).name_hint
            if name not in names:
                names.add(name)
                frontier.append(consumer)
    return [b for b in _all_blocks(sch) if sch.get(b).name_hint in names]


def _epilogue_chain(sch, block):
    """Fold the chain of single elementwise consumers into its last block; return that block (or None)."""
    consumers = sch.get_consumers(block)
    tail = None
    while len(consumers) == 1:
        tail = consumers[0]
        nxt = sch.get_consumers(tail)
        if len(nxt) != 1:
            break
        sch.compute_inline(tail)
        tail = None
        consumers = nxt
    return tail or (consumers[0] if len(consumers) == 1 else None)


def _accumulator_stores(sch, conv) -> list:
    """The blocks that store the conv's tile (its folded epilogue, or a copy-out), with the conv itself
    accumulating into a tile-sized buffer that LLVM keeps in registers (ACCUMULATOR_SCOPE)."""
    stores = _epilogue(sch, conv)
    if not stores:
        return [sch.cache_write(conv, 0, ACCUMULATOR_SCOPE)]
    sch.set_scope(conv, 0, ACCUMULATOR_SCOPE)
    return stores


def _store_tile_at(sch, stores: list, loop, lanes: int | None = None):
    """Compute the epilogue/store blocks once per register tile, under `loop`, in order, vectorized. A
    register tile's store is unrolled: read at constant offsets, its accumulators stay registers (looped
    over, they live on the stack, zeroed by a memset call and stored and reloaded on every tile). `lanes`:
    the accumulators' vector, where the store's last loop spans several (a matmul tile's columns): each
    store then reads one accumulator vector; a 48-wide one made LLVM assemble it lane by lane from three."""
    for store in stores:
        sch.reverse_compute_at(store, loop, preserve_unit_loops=True)
        loops = sch.get_loops(store)
        under = next(i for i, outer in enumerate(loops) if sch.get(outer).same_as(sch.get(loop)))
        *tile, lane = loops[under + 1:]
        if lanes is not None and _extent(sch, lane) > lanes and _extent(sch, lane) % lanes == 0:
            vectors, lane = sch.split(lane, [None, lanes])
            tile.append(vectors)
        sch.vectorize(lane)
        if math.prod(_extent(sch, t) for t in tile) <= MAX_UNROLLED_STORES:
            for t in tile:
                sch.unroll(t)


def _split_init(sch, block, loop):
    """Zero the accumulators in a vectorized loop of their own before `loop` (after parallel, vectorize
    and unroll: TVM refuses those on the update block once it is split off)."""
    init = sch.decompose_reduction(block, loop)
    sch.vectorize(sch.get_loops(init)[-1])


def _schedule_conv(sch, conv, spec: TargetSpec, tiles) -> str:
    loops = sch.get_loops(conv)
    batch, oc, row, col, lane = loops[:5]
    reduction = loops[5:]
    lanes = vector_lanes(spec)
    int8 = len(reduction) == 5
    if int8:  # (padded under each row, recomputed for every channel tile: YOLOv8-style int8 10% slower)
        _pad_producers(sch, conv, spec)
    tile_w, tile_c, ragged = conv_tile(_extent(sch, col), _extent(sch, oc), lanes, allow_ragged=not int8)
    if ragged:  # the last tile of the row is cut short
        col_o, col_i = sch.split(col, [None, tile_w])
    else:
        col_o, col_i = tiles.split(sch, col, tile_w, TILE_REGISTERS[lanes])
    oc_o, oc_i = tiles.split(sch, oc, tile_c, MAX_CHANNEL_BLOCKS)
    stores = _accumulator_stores(sch, conv)
    chunk = _input_channel_chunk(sch, conv, reduction, tile_c * lanes)
    ic_outer, kh, kw, *ic_rest = reduction
    # Reduction order: input-channel blocks outside the kernel window (the rules' choice), inside it, or
    # split around it; a knob only where there is a window.
    if _extent(sch, kh) * _extent(sch, kw) > 1:
        ic_outer, ic_within = tiles.split(sch, ic_outer, 1, _extent(sch, ic_outer))
        window = [kh, kw, ic_within]
    else:
        window = [kh, kw]
    # Where a tile's weights would not stay in L2, a chunk of input channels at a time, each chunk's weights
    # reused by every tile of the row; the row's accumulators then live in memory between chunks.
    outer, store_at = [col_o], col_o
    if chunk is not None:
        ic_chunk, ic_outer = sch.split(ic_outer, [None, chunk])
        outer, store_at = [ic_chunk, col_o], row
    if int8:
        ic_mid, ic_inner = ic_rest
        # ic_mid outside the window: the weight [O/b, C/4, KH, KW, b, 4] is then read in its own order, one
        # stream per channel block; inside it, each step jumped KH*KW*64 bytes, and a 3x3 conv whose weights
        # come from L3 or memory (ResNet's 512 channels, 2.4 MB) ran 20% slower.
        sch.reorder(batch, oc_o, row, *outer, ic_outer, ic_mid, *window, col_i, oc_i, lane, ic_inner)
    else:
        (ic_inner,) = ic_rest
        sch.reorder(batch, oc_o, row, *outer, ic_outer, *window, ic_inner, col_i, oc_i, lane)
    _store_tile_at(sch, stores, store_at)
    rows = sch.fuse(batch, oc_o, row)
    if not int8:
        _pad_rows_at(sch, conv, rows, spec)
    _parallel_if_worth_it(sch, conv, rows)
    sch.unroll(col_i)
    sch.unroll(oc_i)
    # Weights are s8, so any u8 read is the activations.
    activations = "uint8" if any(str(r.source.dtype) == "uint8" for r in sch.get(conv).reads) else "int8"
    bounded = BOUNDED_PAIRS in sch.get(conv).annotations
    intrinsic = int8_dot_intrinsic(spec, _extent(sch, lane), activations, bounded) if int8 else None
    if intrinsic is None:
        sch.vectorize(lane)
    if int8 and intrinsic is None:
        sch.unroll(ic_inner)
    _split_init(sch, conv, outer[0] if chunk is not None else ic_outer)
    if intrinsic is not None:
        sch.tensorize(lane, intrinsic)
        return f"conv2d_nchwc_int8[{intrinsic}]"
    return "conv2d_nchwc_int8" if int8 else "conv2d_nchwc"


def _input_channel_chunk(sch, conv, reduction, tile_channels: int) -> int | None:
    """The most input-channel blocks whose weights for one tile's output channels fit WEIGHT_PANEL_BYTES,
    or None when all of them do."""
    weight = next(r.source for r in sch.get(conv).reads if len(r.source.shape) == 6)
    per_block = tile_channels * tvm.DataType(weight.dtype).bits // 8
    for loop in reduction[1:]:
        per_block *= _extent(sch, loop)
    blocks = _extent(sch, reduction[0])
    if blocks * per_block <= WEIGHT_PANEL_BYTES:
        return None
    return max(d for d in range(1, blocks + 1) if blocks % d == 0 and d * per_block <= WEIGHT_PANEL_BYTES)


def _schedule_window(sch, block, spec: TargetSpec, tiles) -> None:
    """A depthwise conv or a pooling in NCHW{c}, loops (batch, chunk, row, col, lane, kh, kw): a tile of
    output pixels accumulates in registers over the window, the lane vectorized. Padding is inlined: at 9
    operations per output, a padded copy would cost more memory traffic than the bounds checks."""
    _inline_window_inputs(sch, block)
    batch, chunk, row, col, lane, kh, kw = sch.get_loops(block)
    lanes = vector_lanes(spec)
    tile_w, _, ragged = conv_tile(_extent(sch, col), 1, lanes, allow_ragged=True)
    if ragged:
        col_o, col_i = sch.split(col, [None, tile_w])
    else:
        col_o, col_i = tiles.split(sch, col, tile_w, TILE_REGISTERS[lanes])
    stores = _accumulator_stores(sch, block)
    sch.reorder(batch, chunk, row, col_o, kh, kw, col_i, lane)
    _store_tile_at(sch, stores, col_o)
    _parallel_if_worth_it(sch, block, sch.fuse(batch, chunk, row))
    sch.unroll(col_i)
    sch.vectorize(lane)
    _split_init(sch, block, kh)


def _blocked_pool(sch, blocks: dict, spec: TargetSpec):
    """A pooling's reduction in NCHW{c} (max, or the sum of an average), if the kernel is one: the only
    reduction, loops (batch, chunk, row, col, lane, kh, kw), the lane a vector."""
    reductions = [b for b in blocks.values() if _is_reduction(sch, b)]
    if len(reductions) != 1:
        return None
    pool = reductions[0]
    kinds = [iv.iter_type for iv in sch.get(pool).iter_vars]
    if kinds != [tirx.IterVar.DataPar] * 5 + [tirx.IterVar.CommReduce] * 2 or len(sch.get_loops(pool)) != 7:
        return None
    lane = _extent(sch, sch.get_loops(pool)[4])
    return pool if lane in _vector_widths(spec) else None


def _vector_widths(spec) -> tuple[int, int, int]:
    """The vectors a rule picks from, widest first: a full one, half of one, and 4 lanes."""
    return vector_lanes(spec), vector_lanes(spec) // 2, NARROW_LANES


def _dividing_lanes(extent: int, spec) -> int | None:
    """The widest vector that divides `extent` (a vector with masked lanes runs as scalar code in TVM)."""
    return next((v for v in _vector_widths(spec) if extent % v == 0), None)


def _width_lanes(sch, block, spec) -> int | None:
    """The vector of output columns of a conv left in NCHW: the widest that divides the row, down to 4; else
    the narrowest vector that covers the row (a row of 14 or 7: its last lanes are masked off)."""
    width = _extent(sch, sch.get_loops(block)[3])
    return _dividing_lanes(width, spec) or next(
        (v for v in reversed(_vector_widths(spec)) if v >= width), vector_lanes(spec))


def _schedule_plain_conv(sch, conv, spec: TargetSpec, tiles) -> str:
    """A conv whose channels fit no block (60, 12, 4 of them) stays in NCHW: a register tile of output
    channels x a vector of output columns, each weight broadcast against a row of inputs (contiguous at
    stride 1), the epilogue on the tile, parallel over batch x channel tiles x rows."""
    _pad_producers(sch, conv, spec)
    batch, channel, row, col, *reduction = sch.get_loops(conv)
    lanes = _width_lanes(sch, conv, spec)
    col_o, col_i = sch.split(col, [None, lanes])
    tile_c, _ = register_tile(_extent(sch, channel), 1, vector_lanes(spec))
    channel_o, channel_i = tiles.split(sch, channel, tile_c, TILE_REGISTERS[vector_lanes(spec)])
    stores = _accumulator_stores(sch, conv)
    sch.reorder(batch, channel_o, row, col_o, *reduction, channel_i, col_i)
    _store_tile_at(sch, stores, col_o)
    _parallel_if_worth_it(sch, conv, sch.fuse(batch, channel_o, row))
    sch.unroll(channel_i)
    sch.vectorize(col_i)
    _split_init(sch, conv, reduction[0])
    return "conv2d_nchw"


def _is_pointwise(sch, conv) -> bool:
    """A 1x1 conv at stride 1 without padding: each output pixel reads the same pixel of the input."""
    loops = sch.get_loops(conv)
    data = sch.get(conv).reads[0].source
    return ([_extent(sch, loop) for loop in loops[5:]] == [1, 1]
            and [int(d) for d in data.shape[2:]] == [_extent(sch, loop) for loop in loops[2:4]])


def _schedule_pointwise_nchw(sch, conv, spec: TargetSpec, tiles) -> str:
    """A 1x1 conv left in NCHW (ShuffleNet's 116 channels, an SSD head's 546) is a matmul of the weight
    [O, C] by the input [C, H*W]: a register tile of output channels x a few vectors of pixels, the pixels of a
    whole map as one contiguous loop (a 28x28 map is 49 full vectors, not 28 rows of 28 with masked ends)."""
    _inline_producers(sch, conv)  # a padding of 0, if the lowering wrote one
    width = _extent(sch, sch.get_loops(conv)[3])
    stores = _accumulator_stores(sch, conv)
    # the conv and its epilogue iterate over (row, column) as one pixel index, so that a tile's pixels are one
    # range of it in both
    sch.transform_block_layout(conv, lambda n, c, y, x, rc, ry, rx: (n, c, y * width + x, rc, ry, rx))
    for store in stores:
        sch.transform_block_layout(store, lambda n, c, y, x: (n, c, y * width + x))
    sch.transform_layout(conv, ("write", 0), lambda n, c, y, x: (n, c, y * width + x))
    batch, channel, pixels, channels_in, *_ = sch.get_loops(conv)
    lanes, vectors, tile_c = _pointwise_tile(_extent(sch, pixels), _extent(sch, channel), spec)
    pixel_o, pixel_v, pixel_i = sch.split(pixels, [None, vectors, lanes])
    channel_o, channel_i = sch.split(channel, [None, tile_c])
    sch.reorder(batch, channel_o, pixel_o, channels_in, channel_i, pixel_v, pixel_i)
    _store_tile_at(sch, stores, pixel_o, lanes)
    _parallel_if_worth_it(sch, conv, sch.fuse(batch, channel_o))
    sch.unroll(channel_i)
    sch.unroll(pixel_v)
    sch.vectorize(pixel_i)
    _split_init(sch, conv, channels_in)
    return "conv2d_nchw_pointwise"


def _pointwise_tile(pixels: int, channels: int, spec: TargetSpec) -> tuple[int, int, int]:
    """(lanes, vectors, channels) of a pointwise conv's register tile: the widest vector that divides the
    pixels (196 pixels take 4-lane vectors), then the most accumulators, each weight broadcast once per tile
    row and each vector of pixels loaded once."""
    lanes = _dividing_lanes(pixels, spec) or vector_lanes(spec)
    registers = TILE_REGISTERS[vector_lanes(spec)]
    counts = [v for v in range(1, POINTWISE_VECTORS + 1) if pixels % (v * lanes) == 0] or [1]
    tiles = [(v, min(channels, (registers - v) // v, max_accumulators(lanes) // v)) for v in counts]
    vectors, tile_c = max(tiles, key=lambda vc: (vc[0] * vc[1], -(vc[0] + vc[1])))
    return lanes, vectors, tile_c


def _is_vectorizable_matmul(sch, block, spec) -> bool:
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    loops = sch.get_loops(block)
    return (len(kinds) == len(loops) >= 3 and kinds[-1] == tirx.IterVar.CommReduce
            and all(k == tirx.IterVar.DataPar for k in kinds[:-1])
            and _matmul_lanes(sch, block, spec) is not None)


def _matmul_lanes(sch, block, spec) -> int | None:
    """The vector of output columns: a packed int8 weight's block, else the widest that divides them (down to
    4 lanes: an attention head of 20 or 36 columns runs on SSE vectors rather than on scalar code)."""
    columns = _extent(sch, sch.get_loops(block)[-2])
    packed = _packed_weight_lanes(sch, block)
    if packed and columns % packed == 0:
        return packed
    exact = _dividing_lanes(columns, spec)
    # else whole vectors, the last one's lanes past the columns masked off (ViT's 197 attention columns)
    return exact or (vector_lanes(spec) if columns > vector_lanes(spec) and not packed else None)


def _schedule_matmul(sch, block, spec: TargetSpec, tiles) -> str:
    """out[i, j] += x[i, k] * w[k, j]: a tile of rows x vectors of j, w read along j (contiguous; a constant
    weight packed by targets.layout and unpacked inline), the epilogue (bias, activation, requantize) on the
    tile, parallel over row and column tiles. A packed weight's column tiles (fp32 or int8) are outermost: each
    one's panel of w is read from cache by every row tile, not streamed from memory once per row tile (int8
    BERT, GPT-2 and ViT 17-38% faster than with rows outermost)."""
    packed = _packed_weight_lanes(sch, block)
    lanes = _matmul_lanes(sch, block, spec)
    *outer, row, col, red = sch.get_loops(block)
    registers = TILE_REGISTERS[vector_lanes(spec)]
    chunks = -(-_extent(sch, col) // lanes)
    int8 = _reads_int8_weight(sch, block)
    intrinsic = _matmul_intrinsic(sch, block, lanes, spec) if packed and int8 else None
    rows, vectors, ragged = matmul_tile(_extent(sch, row), chunks, vector_lanes(spec))
    if ragged and intrinsic is not None:  # the intrinsic cannot run under a cut-short tile's predicate (the
        # int8 legalization computes whole tiles instead: targets.dense); an exact tile, however small
        rows, vectors = register_tile(_extent(sch, row), chunks, vector_lanes(spec))
        ragged = False
    stores = _accumulator_stores(sch, block)
    col_v, col_l = sch.split(col, [None, lanes])
    col_o, col_v = tiles.split(sch, col_v, vectors, MAX_CHANNEL_BLOCKS)
    row_o, row_i = sch.split(row, [None, rows]) if ragged else tiles.split(sch, row, rows, registers)
    tile_order = [row_o, col_o] if not packed else [col_o, row_o]
    if intrinsic is not None:
        red, group = sch.split(red, [None, INT8_GROUP])
        sch.reorder(*outer, *tile_order, red, row_i, col_v, col_l, group)
    else:
        sch.reorder(*outer, *tile_order, red, row_i, col_v, col_l)
    _store_tile_at(sch, stores, tile_order[-1], lanes)
    _parallel_prefix(sch, [*outer, *tile_order], spec, block)
    sch.unroll(row_i)
    sch.unroll(col_v)
    if intrinsic is None:
        sch.vectorize(col_l)
    _split_init(sch, block, red)
    if intrinsic is not None:
        sch.tensorize(col_l, intrinsic)
        return f"matmul_int8[{intrinsic}]"
    return "matmul"


def pad_ragged_columns(sch, block, spec: TargetSpec) -> None:
    """Columns that no full or half vector divides (ViT's 197 tokens, SVTR's 20, a CRNN's 97 classes) padded
    to whole vectors: the matmul then reads a zero-padded copy of b, made by a parallel pass, and its tile
    stores whole vectors into a padded result that a copy-out crops. Vectors with lanes masked off run as
    scalar code (attention scores: 3.6 GMAC/s; the CRNN's 80 x 192 x 97 classifier: 1.7)."""
    lanes = vector_lanes(spec)
    *outer, _, col, _ = sch.get_loops(block)
    columns = int(sch.get(col).extent)
    # whole or half vectors as they are; otherwise padded to whole vectors, which use more of each vector than
    # 4-lane ones would (SVTR's heads of 20 columns: 2 vectors, 62% used, against 5 SSE ones on AVX-512)
    if columns < lanes or columns % (lanes // 2) == 0:
        return
    producers = {sch.get(b).name_hint for b in sch.get_producers(block)}
    sch.pad_einsum(block, [1] * (len(outer) + 1) + [lanes, 1])  # factors: columns to a multiple of lanes
    for producer in sch.get_producers(block):
        if sch.get(producer).name_hint not in producers:  # the padded copy of b
            _schedule_spatial_block(sch, producer, spec)


def _packed_weight_lanes(sch, block) -> int | None:
    """The lane block of a weight packed by targets.layout, if one is read: int8 [N/lanes, K/4, lanes, 4],
    or fp32 [N/lanes, K, lanes], told from a 3-D activation by its index j // lanes."""
    for region in sch.get(block).reads:
        dtype, dims = str(region.source.dtype), region.region
        if (dtype == "int8" and len(dims) == 4) or (
                dtype == "float32" and len(dims) == 3 and isinstance(dims[0].min, tirx.FloorDiv)):
            return int(region.source.shape[2])
    return None


def _reads_int8_weight(sch, block) -> bool:
    return any(str(r.source.dtype) == "int8" for r in sch.get(block).reads)


def _matmul_intrinsic(sch, block, lanes: int, spec) -> str | None:
    activations = "uint8" if any(str(r.source.dtype) == "uint8" for r in sch.get(block).reads) else "int8"
    return int8_dot_intrinsic(spec, lanes, activations, BOUNDED_PAIRS in sch.get(block).annotations)


def _schedule_generic(sch, spec: TargetSpec) -> str:
    """Parallel outer spatial loops and a vectorized inner one, for each top-level block, once a fused
    chain's elementwise blocks are inlined into the blocks that read them."""
    _inline_elementwise(sch)
    scheduled = sum(_schedule_spatial_block(sch, block, spec) for block in _all_blocks(sch))
    return "generic" if scheduled else "none"


def _inline_elementwise(sch) -> None:
    """Inline each spatial block read only by spatial blocks (a fused chain's intermediates): one pass over
    memory instead of one per op. A block feeding a reduction (a pooling's padding) stays: inlined, its
    bounds checks would sit in the reduction's inner loop."""
    for block in _all_blocks(sch):
        consumers = sch.get_consumers(block)
        if not consumers or _is_reduction(sch, block) or any(_is_reduction(sch, c) for c in consumers):
            continue
        try:
            sch.compute_inline(block)
        except Exception:  # noqa: BLE001 - not inlinable (e.g. an opaque block): it runs as a pass of its own
            continue


def _schedule_spatial_block(sch, block, spec: TargetSpec) -> bool:
    """Parallel outer spatial loops and, when the whole nest is spatial, a vectorized inner one."""
    lanes = vector_lanes(spec)
    loops = sch.get_loops(block)
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    spatial = _leading_spatial_loops(loops, kinds)
    if not spatial:
        return False
    all_spatial = len(spatial) == len(loops)
    lane_loop = _output_lane_loop(sch, block) if all_spatial else None
    if lane_loop is not None and _transpose_tile(sch, block, spatial, lane_loop, lanes):
        _parallel_prefix(sch, spatial[:-2], spec, block)
        return True
    lane = spatial.pop(lane_loop) if lane_loop is not None else None
    min_work = MIN_PARALLEL_WORK
    vector = None
    if all_spatial and _extent(sch, spatial[-1]) % lanes == 0:
        spatial[-1], vector = sch.split(spatial[-1], [None, lanes])
        sch.vectorize(vector)
    elif all_spatial:  # a scalar copy (a transpose into rows of 91)
        min_work = MIN_PARALLEL_SCALAR_COPY
    if lane is not None:
        # A lane loop too short for the transpose tile (NCHW -> NCHW3c of an image) runs inside each
        # thread's chunk, around the vector: threads splitting it wrote every third float of the same cache
        # lines (YOLOv8's 320x320 image blocked in 0.53 ms, now 0.04 ms).
        sch.reorder(*spatial, lane, *([vector] if vector is not None else []))
        if _extent(sch, lane) <= lanes:
            sch.unroll(lane)
    _parallel_prefix(sch, spatial, spec, block, min_work)
    return True


def _output_lane_loop(sch, block) -> int | None:
    """The position of the loop that indexes the written buffer's contiguous (last) axis, when that is not
    the innermost loop (a copy into or out of NCHW{c}); None otherwise."""
    written = sch.get(block).writes
    if len(written) != 1:
        return None
    index = written[0].region[-1].min
    iter_vars = [iv.var for iv in sch.get(block).iter_vars]
    if not isinstance(index, tirx.Var) or index.same_as(iter_vars[-1]):
        return None
    return next((i for i, v in enumerate(iter_vars) if index.same_as(v)), None)


def _transpose_tile(sch, block, loops: list, position: int, lanes: int) -> bool:
    """A copy whose output is contiguous along another loop than the innermost (NCHW{c} -> NCHW: the
    source's lane loop is innermost, the output's width is contiguous): store whole vectors along the
    output's contiguous loop, with the innermost loop unrolled around them, so that a tile of lanes x lanes
    is read from cache lines already loaded. Stores one element per lane otherwise. A longer innermost loop
    (NCHW -> NCHW{c}: a whole row) is cut first into tiles of the widest vector that divides it. Rewrites `loops` in place to the new
    order (the last two: the unrolled and the vectorized loop); False if not such a copy."""
    innermost = _extent(sch, loops[-1])
    tile = innermost if innermost <= 4 * lanes else next(
        (v for v in (lanes, lanes // 2, NARROW_LANES) if innermost % v == 0), None)
    if tile is None or _extent(sch, loops[position]) % lanes:
        return False
    if tile < innermost:
        loops[-1:] = sch.split(loops[-1], [None, tile])
    outer, vector = sch.split(loops[position], [None, lanes])
    unrolled = loops[-1]
    loops[position] = outer
    del loops[-1]
    sch.reorder(*loops, unrolled, vector)
    sch.unroll(unrolled)
    sch.vectorize(vector)
    loops.extend([unrolled, vector])
    return True


def _leading_spatial_loops(loops, kinds):
    """The outermost loops that bind only spatial block iterators (those may run in parallel).
    TE-lowered blocks have one loop per iterator, in order; anything else is left alone."""
    if len(kinds) != len(loops):
        return []
    result = []
    for loop, kind in zip(loops, kinds):
        if kind != tirx.IterVar.DataPar:
            break
        result.append(loop)
    return result


def _parallel_if_worth_it(sch, block, loop):
    if _work(sch, block) >= MIN_PARALLEL_WORK:
        sch.parallel(loop)


def _work(sch, block) -> int:
    """Iterations of the block's loop nest: multiply-adds for a conv or matmul, elements otherwise."""
    work = 1
    for loop in sch.get_loops(block):
        work *= _extent(sch, loop)
    return work


def _parallel_prefix(sch, spatial, spec: TargetSpec, block=None, min_work: int = MIN_PARALLEL_WORK):
    """Fuse outer spatial loops until there is enough work for every core, and run them in parallel."""
    if block is not None and _work(sch, block) < min_work:
        return
    cores = spec.num_cores or 2
    take, work = 0, 1
    for loop in spatial:
        take += 1
        work *= _extent(sch, loop)
        if work >= cores * CHUNKS_PER_CORE:
            break
    if take == 0 or work < 2:
        return
    fused = sch.fuse(*spatial[:take]) if take > 1 else spatial[0]
    sch.parallel(fused)
