"""SmoothQuant for dense layers: move activation outliers into the weights, per input channel.

For a dense layer Y = X W, with a_j = max|X[:, j]| over the calibration data and w_j = max|W[j, :]|, the
smoothing factor is s_j = a_j^alpha / w_j^(1 - alpha); the layer computes (X / s) (s W), which is the same
in real numbers but spreads the channels' ranges evenly between the two sides before they are quantized.
alpha is searched per layer on a calibration batch (the layer's output error, int8 against fp32, in numpy);
"no smoothing" is a candidate too, so a layer is never made worse on that batch.
"""

from __future__ import annotations

import numpy as np

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def _fake_quant(x: np.ndarray, scale) -> np.ndarray:
    return np.clip(np.round(x / scale), -127, 127) * scale


def _output_error(x, weight, smooth, channel_max, per_token: bool) -> float:
    """The squared error of the int8 layer's output on `x` with smoothing `smooth` (ones: none)."""
    xs, ws = x / smooth, weight * smooth[:, None]
    if per_token:
        x_scale = np.maximum(np.abs(xs).max(axis=-1, keepdims=True), 1e-12) / 127
    else:  # the calibrated range of the smoothed input: its channels' maxima, divided
        x_scale = max(float(np.max(channel_max / smooth)), 1e-12) / 127
    w_scale = np.maximum(np.abs(ws).max(axis=0), 1e-12) / 127
    approx = _fake_quant(xs, x_scale) @ _fake_quant(ws, w_scale)
    return float(np.sum((x @ weight - approx) ** 2))


def smoothing_factors(x: np.ndarray, weight: np.ndarray, channel_max: np.ndarray,
                      per_token: bool) -> tuple[np.ndarray | None, float | None]:
    """(s, alpha) for the dense layer with input sample `x` (rows x K), `weight` (K x N) and the input's
    per-channel maxima over the calibration data; (None, None) where no smoothing does best."""
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    weight = weight.astype(np.float64)
    a = np.maximum(channel_max.astype(np.float64), 1e-5)
    w = np.maximum(np.abs(weight).max(axis=1), 1e-5)
    best = (_output_error(x, weight, np.ones_like(a), channel_max, per_token), None, None)
    for alpha in ALPHAS:
        s = a ** alpha / w ** (1 - alpha)
        error = _output_error(x, weight, s, channel_max, per_token)
        if error < best[0]:
            best = (error, s, alpha)
    return best[1], best[2]
