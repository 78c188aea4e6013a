"""Register tiles: how many output pixels (or rows) x vector blocks of output channels (or columns) a
kernel's inner loop keeps in vector registers. The conv and matmul rules (targets.schedules,
targets.transformer) and the int8 conv's computation (targets.conv2d, which computes whole tiles) ask here.
"""

from __future__ import annotations

# Vector registers for a conv tile (AVX2 has 16, AVX-512 32). A tile of w pixels x c channel blocks
# holds w*c accumulators and c weight vectors; the rest is left for the broadcast inputs LLVM loads
# ahead when it unrolls the reduction (a full file spilled accumulators to the stack).
TILE_REGISTERS = {8: 12, 16: 26}
# The scope of a register tile's accumulator buffer, and the bytes it must stay under. TVM's LowerTVMBuiltin
# turns every "local" buffer, and a "global" one of runtime::kMaxStackAlloca bytes or more, into a
# TVMBackendAllocWorkspace call: heap memory, which LLVM cannot keep in registers (it zeroed the tile with a
# memset call on every tile and stored and reloaded each accumulator around the epilogue; on a Zen 5 it also
# scalarized part of the epilogue). A smaller "global" buffer stays an alloca, which LLVM promotes to
# registers: an AVX-512 tile holds at most 15 accumulators (16 x 64 bytes is the limit itself).
ACCUMULATOR_SCOPE = "global"
STACK_ALLOCA_BYTES = 1024
ACCUMULATOR_BYTES = 4  # fp32 and int32 sums
MAX_CHANNEL_BLOCKS = 4
# A register tile with fewer accumulators than this leaves FMA latency exposed (one row of a 197-row FC).
MIN_TILE_ACCUMULATORS = 8
# FMAs per vector load a conv tile needs to keep the FMA units busy (two FMAs and two loads a cycle, with
# headroom): a bigger tile buys nothing above it, and below it (a row of 17 on one channel block) loads bound.
FMAS_PER_LOAD = 1.5
# An int8 conv computes a ragged row in whole tiles and cuts them (targets.conv2d): its stores are guarded
# column by column, which the score does not see. It takes an exact tile scoring at least this share of the
# ragged one's: on MobileNetV2's 112-wide 16->96 conv the exact 2 x 4 (score 1.33) ran 20% faster than the
# ragged 3 x 3 (1.45), while a row of 7 or 13 (best exact 0.88 and 0.8, ragged 1.2 and 1.3) stays ragged.
RAGGED_MARGIN = 0.85
# A deep reduction (at least DEEP_TILE_REDUCTION inputs an output) is bound by its accumulators' latency, not by
# its stores: there the better-scoring ragged tile is taken wherever its whole tiles add at most RAGGED_WASTE of
# the row's columns. FCN-ResNet50's 32-wide maps: 3 x 4 over 33 columns (12 accumulators) against the exact
# 2 x 4 (8), its int8 convs 20-35% faster; EfficientNet-B0's 14-wide maps (3 x 5 over 15) ran slower.
DEEP_TILE_REDUCTION = 256
RAGGED_WASTE = 1 / 16


def max_accumulators(lanes: int) -> int:
    """The most accumulator vectors of `lanes` a register tile may have: its buffer under STACK_ALLOCA_BYTES."""
    return (STACK_ALLOCA_BYTES - 1) // (ACCUMULATOR_BYTES * lanes)


def register_tile(width: int, chunks: int, lanes: int, exact: bool = True) -> tuple[int, int]:
    """(output pixels, output channel blocks) of the tile: the most accumulators that fit in registers
    (enough to cover FMA latency); ties go to fewer loads per FMA. `exact`: w divides the width."""
    candidates = [(w, c) for w in range(1, width + 1) if width % w == 0 or not exact
                  for c in range(1, min(chunks, MAX_CHANNEL_BLOCKS) + 1) if chunks % c == 0
                  and w * c + c <= TILE_REGISTERS[lanes] and w * c <= max_accumulators(lanes)]
    return max(candidates, key=lambda wc: (wc[0] * wc[1], -(wc[0] + wc[1])))


def tileable_blocks(chunks: int) -> int:
    """The output channel blocks a conv is better computed on: `chunks`, unless no tile of several blocks
    divides it (an odd count no 3 divides: 125 blocks of 8 for SqueezeNet's 1000 classes, 13 for 104
    channels), where each tile is one block wide and loads an input for every FMA; then one block more."""
    if chunks > 1 and all(chunks % c for c in range(2, MAX_CHANNEL_BLOCKS + 1)):
        return chunks + 1
    return chunks


def matmul_tile(rows: int, chunks: int, lanes: int) -> tuple[int, int, bool]:
    """(rows, column vectors, ragged) of an FC's register tile: the exact tile with the most accumulators,
    unless that has too few to cover FMA latency (ViT's 197 tokens, a prime, give 1 x 4); then the ragged one
    scored as conv_tile scores a row, its last tile cut short (fp32) or computed whole and dropped (int8:
    targets.dense)."""
    tile_rows, vectors = register_tile(rows, chunks, lanes)
    if tile_rows * vectors >= MIN_TILE_ACCUMULATORS or rows <= MIN_TILE_ACCUMULATORS:
        return tile_rows, vectors, False
    # scored as a conv's row is: by FMAs per load, not by accumulators alone (25 rows x 1 vector, the most
    # accumulators, loads 26 vectors for 25 FMAs: ViT's 3072-deep FC ran at a quarter of 5 x 4's speed)
    return conv_tile(rows, chunks, lanes, allow_ragged=True)


def conv_tile(width: int, chunks: int, lanes: int, allow_ragged: bool) -> tuple[int, int, bool]:
    """(output pixels w, channel blocks c, ragged) of a conv's register tile. A reduction step loads w inputs
    and c weight vectors for w*c FMAs; a tile scores by its FMAs per load (up to FMAS_PER_LOAD) times the
    share of its columns that are real outputs, then by being exact, by accumulators, by fewer loads. A
    ragged tile (w does not divide the row) is what a row of 17 or 71 needs: exact, it is 17 x 1 (load bound)
    or 1 x 4 (four accumulators)."""
    def score(tile):
        w, c = tile
        return _loads_score(width, w, c), width % w == 0, w * c, -(w + c)

    candidates = [(w, c) for w in range(1, width + 1) if allow_ragged or width % w == 0
                  for c in range(1, min(chunks, MAX_CHANNEL_BLOCKS) + 1) if chunks % c == 0
                  and w * c + c <= TILE_REGISTERS[lanes] and w * c <= max_accumulators(lanes)]
    w, c = max(candidates, key=score)
    return w, c, width % w != 0


def whole_tiles_columns(width: int, w: int) -> int:
    """The columns a row of `width` takes in whole tiles of `w`."""
    return -(-width // w) * w


def _loads_score(width: int, w: int, c: int) -> float:
    """A tile's FMAs per load (up to FMAS_PER_LOAD) times the share of its columns that are real outputs."""
    return min(w * c / (w + c), FMAS_PER_LOAD) * width / whole_tiles_columns(width, w)


def whole_tiles_tile(width: int, chunks: int, lanes: int, depth: int = 0) -> tuple[int, int, bool]:
    """conv_tile for an int8 conv, which computes a ragged row in whole tiles: the ragged tile only where no
    exact one scores within RAGGED_MARGIN of it, or, for a reduction of `depth` inputs an output at least
    DEEP_TILE_REDUCTION, where it scores higher and wastes at most RAGGED_WASTE of the row."""
    w, c, ragged = conv_tile(width, chunks, lanes, allow_ragged=True)
    exact_w, exact_c, _ = conv_tile(width, chunks, lanes, allow_ragged=False)
    deep = depth >= DEEP_TILE_REDUCTION and whole_tiles_columns(width, w) - width <= width * RAGGED_WASTE
    margin = 1.0 if deep else RAGGED_MARGIN
    if ragged and _loads_score(width, exact_w, exact_c) >= margin * _loads_score(width, w, c):
        return exact_w, exact_c, False
    return w, c, ragged
