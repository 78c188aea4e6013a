"""Per-channel s8 weights whose input-channel pairs are bounded: |q[o, 2j]| + |q[o, 2j+1]| <= PAIR_BOUND.

On a CPU without VNNI the int8 kernels multiply with `vpmaddubsw`, which adds two u8 x s8 products into an
int16 and saturates past 32767; with bounded pairs (255 * 128 = 32640) it never does, and the kernel is
exact (targets.intrinsics). A pair over the bound has two weights of one output channel, next to each
other, both large against that channel's maximum. Each channel weighs two remedies, by its squared error in
fp32 units, over a few mixes of them:
- coarsen: the channel's scale grown by g, from 1 up to the growth at which no pair exceeds the bound (at
  most 2x: 7-bit weights, which is what onnxruntime's reduce_range and NNCF's overflow fix do to every
  channel);
- project: each pair still over the bound moved onto |q0| + |q1| = PAIR_BOUND, its excess taken from both
  weights alike.
The kernels check the bound on the constants they are given, so a weight that misses it still runs exact,
on the slower `vpmaddwd` form.
"""

from __future__ import annotations

import numpy as np

from targets.intrinsics import PAIR_BOUND

LIMIT = 127  # |q| of a symmetric s8 weight
GROWTH_STEPS = 9  # scale growths tried per channel, evenly from 1 to the one that bounds every pair


def quantize_bounded(w: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q, scale): `w` [O, I, ...] (fp64, output channels first) in s8 with bounded pairs along I, and the
    per-channel scale each channel ended with (>= the given one)."""
    shape = (-1,) + (1,) * (w.ndim - 1)
    full_growth = np.maximum(_pair_sums(np.abs(w / scale.reshape(shape))) / PAIR_BOUND, 1.0)
    best_q = best_scale = best_error = None
    for share in np.linspace(0.0, 1.0, GROWTH_STEPS):
        grown = scale * (1.0 + share * (full_growth - 1.0))
        x = w / grown.reshape(shape)
        q = _project(_rounded(x), x)
        error = _channel_error(q, grown, w)
        if best_q is None:
            best_q, best_scale, best_error = q, grown, error
            continue
        better = error < best_error
        best_q = np.where(better.reshape(shape), q, best_q)
        best_scale, best_error = np.where(better, grown, best_scale), np.minimum(error, best_error)
    return best_q.astype(np.int8), best_scale


def _rounded(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), -LIMIT, LIMIT)


def _pair_sums(magnitude: np.ndarray) -> np.ndarray:
    """Each channel's largest |x0| + |x1| over its pairs (input channels 2j, 2j+1; an odd last one alone)."""
    even, odd = magnitude[:, 0::2], magnitude[:, 1::2]
    sums = even.copy()
    sums[:, :odd.shape[1]] += odd
    return sums.reshape(sums.shape[0], -1).max(axis=1)


def _project(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """`q` (the rounded `x`) with every pair over the bound moved onto |q0| + |q1| = PAIR_BOUND: the excess of
    |x0| + |x1| taken from both alike, signs kept."""
    q = q.copy()
    pairs = q.shape[1] // 2
    q0, q1 = q[:, 0:2 * pairs:2], q[:, 1:2 * pairs:2]
    over = np.abs(q0) + np.abs(q1) > PAIR_BOUND
    if not over.any():
        return q
    x0, x1 = x[:, 0:2 * pairs:2], x[:, 1:2 * pairs:2]
    excess = np.abs(x0) + np.abs(x1) - PAIR_BOUND
    first = np.clip(np.round(np.abs(x0) - excess / 2), PAIR_BOUND - LIMIT, LIMIT)
    q0[over] = (np.sign(x0) * first)[over]
    q1[over] = (np.sign(x1) * (PAIR_BOUND - first))[over]
    q[:, 0:2 * pairs:2], q[:, 1:2 * pairs:2] = q0, q1
    return q


def _channel_error(q: np.ndarray, scale: np.ndarray, w: np.ndarray) -> np.ndarray:
    shape = (-1,) + (1,) * (w.ndim - 1)
    return ((q * scale.reshape(shape) - w) ** 2).reshape(w.shape[0], -1).sum(axis=1)
