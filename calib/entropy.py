"""The KL-divergence threshold search of MXNet's `calibrate_entropy` (src/operator/quantization/calibrate.cc).

For each candidate threshold (from num_quantized_bins/2 to num_bins/2 bins out from zero): P is the
histogram clipped to the candidate range with the outliers folded into its edge bins; Q is P merged into
num_quantized_bins bins and spread back over P's non-empty bins. Both are smoothed with eps and the
threshold with the smallest KL(P || Q) wins.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-4


def smooth(p: np.ndarray, eps: float = EPS) -> np.ndarray | None:
    """Move a little mass onto the empty bins; None where that cannot be done (MXNet's empty result)."""
    zeros = p == 0
    n_zeros = int(zeros.sum())
    n_nonzeros = p.size - n_zeros
    if n_nonzeros == 0:
        return None
    eps1 = eps * n_zeros / n_nonzeros
    if eps1 >= 1.0:
        return None
    return p + eps * zeros - eps1 * ~zeros


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    p, q = p / p.sum(), q / q.sum()
    mask = p != 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def optimal_threshold(counts: np.ndarray, edges: np.ndarray, num_quantized_bins: int) -> tuple[float, float]:
    """(threshold, divergence) minimising KL(P || Q) over the candidate thresholds."""
    num_bins = len(counts)
    if num_bins % 2 != 1:
        raise ValueError(f"the histogram needs an odd number of bins, got {num_bins}")
    zero_bin = num_bins // 2
    half_quantized = num_quantized_bins // 2
    counts = counts.astype(np.float64)
    prefix = np.concatenate([[0.0], np.cumsum(counts)])
    best = (float(edges[-1]), np.inf)
    for i in range(half_quantized, zero_bin + 1):
        start, stop = zero_bin - i, zero_bin + i + 1
        sliced = counts[start:stop].copy()
        sliced[0] = 0.0  # (MXNet's sliced histogram leaves its first slot empty)
        p = counts[start:stop].copy()
        p[0] = prefix[start + 1]  # everything at or below the first bin
        p[-1] = prefix[num_bins] - prefix[stop - 1]  # everything at or above the last
        # merge into num_quantized_bins groups (the last one takes the remainder), then spread back
        group = np.minimum(np.arange(len(sliced)) // (len(sliced) // num_quantized_bins), num_quantized_bins - 1)
        quantized = np.bincount(group, weights=sliced, minlength=num_quantized_bins)
        norm = np.bincount(group, weights=sliced != 0, minlength=num_quantized_bins)[group]
        q = np.where((p != 0) & (norm > 0), quantized[group] / np.maximum(norm, 1), 0.0)
        p_smooth, q_smooth = smooth(p), smooth(q)
        divergence = np.inf if p_smooth is None or q_smooth is None else kl_divergence(p_smooth, q_smooth)
        if divergence < best[1]:
            best = (float(edges[stop]), divergence)
    return best
