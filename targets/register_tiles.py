"""Register tiles: how many output pixels (or rows) x vector blocks of output channels (or columns) a
kernel's inner loop keeps in vector registers. The conv and matmul rules (targets.schedules,
targets.transformer) and the int8 conv's computation (targets.conv2d, which computes whole tiles) ask here.
"""

from __future__ import annotations

# Vector registers for a conv tile (AVX2 has 16, AVX-512 32). A tile of w pixels x c channel blocks
# holds w*c accumulators and c weight vectors; the rest is left for the broadcast inputs LLVM loads
# ahead when it unrolls the reduction (a full file spilled accumulators to the stack).
TILE_REGISTERS = {8: 12, 16: 26}
MAX_CHANNEL_BLOCKS = 4
# A register tile with fewer accumulators than this leaves FMA latency exposed (one row of a 197-row FC).
MIN_TILE_ACCUMULATORS = 8
# FMAs per vector load a conv tile needs to keep the FMA units busy (two FMAs and two loads a cycle, with
# headroom): a bigger tile buys nothing above it, and below it (a row of 17 on one channel block) loads bound.
FMAS_PER_LOAD = 1.5


def register_tile(width: int, chunks: int, lanes: int, exact: bool = True) -> tuple[int, int]:
    """(output pixels, output channel blocks) of the tile: the most accumulators that fit in registers
    (enough to cover FMA latency); ties go to fewer loads per FMA. `exact`: w divides the width."""
    candidates = [(w, c) for w in range(1, width + 1) if width % w == 0 or not exact
                  for c in range(1, min(chunks, MAX_CHANNEL_BLOCKS) + 1) if chunks % c == 0
                  and w * c + c <= TILE_REGISTERS[lanes]]
    return max(candidates, key=lambda wc: (wc[0] * wc[1], -(wc[0] + wc[1])))


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
        padded = -(-width // w) * w
        return min(w * c / (w + c), FMAS_PER_LOAD) * width / padded, width % w == 0, w * c, -(w + c)

    candidates = [(w, c) for w in range(1, width + 1) if allow_ragged or width % w == 0
                  for c in range(1, min(chunks, MAX_CHANNEL_BLOCKS) + 1) if chunks % c == 0
                  and w * c + c <= TILE_REGISTERS[lanes]]
    w, c = max(candidates, key=score)
    return w, c, width % w != 0
