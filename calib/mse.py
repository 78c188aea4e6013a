"""The threshold that minimises a tensor's quantization MSE, searched on its calibration histogram.

For a candidate threshold t, every histogram bin's centre is quantized as the int8 kernels will store it
(zero point 0: 255 steps over [0, t] for u8, 127 per side over [-t, t] for s8, clipped beyond t) and the
squared error is summed with the bins' counts. Rounding error inside the range and clipping error beyond
it trade off; the candidate with the smallest sum wins (TensorRT's, OpenVINO's and NNCF's "MSE" search).
"""

from __future__ import annotations

import numpy as np

CANDIDATES = 256  # thresholds tried, evenly spaced up to the largest |x| seen


def mse_threshold(counts: np.ndarray, edges: np.ndarray, unsigned: bool) -> tuple[float, float]:
    """(threshold, mean squared error) for the histogram `counts` over `edges` (symmetric around 0)."""
    centres = (edges[:-1] + edges[1:]) / 2
    weights = counts.astype(np.float64)
    top = float(np.max(np.abs(edges[[0, -1]])))
    if weights.sum() == 0 or top == 0:
        return 0.0, 0.0
    if unsigned:  # a non-negative tensor: only the positive half holds counts
        keep = centres >= 0
        centres, weights = centres[keep], weights[keep]
    levels = (0, 255) if unsigned else (-127, 127)
    steps = 255.0 if unsigned else 127.0
    thresholds = top * np.arange(1, CANDIDATES + 1) / CANDIDATES
    best = (top, np.inf)
    for chunk in np.array_split(thresholds, 8):  # bounded memory: chunk x bins at a time
        scale = (chunk / steps)[:, None]
        stored = np.clip(np.round(centres[None, :] / scale), *levels) * scale
        errors = ((centres[None, :] - stored) ** 2) @ weights
        i = int(np.argmin(errors))
        if errors[i] < best[1]:
            best = (float(chunk[i]), float(errors[i]))
    return best[0], best[1] / weights.sum()
