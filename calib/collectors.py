"""Calibration collectors: they see named float tensors, batch by batch, and return {name: (min, max)}.

`CalibrationCollector` is the public base class, as in MXNet 2.0: subclass it, implement `collect`, and
pass an instance with `calib_mode="custom"`. The built-in modes are collectors themselves. Each keeps a
fixed amount of state per tensor, so memory does not grow with the number of calibration batches.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from calib.entropy import optimal_threshold
from calib.histogram import SymmetricHistogram
from calib.mse import mse_threshold
from quantvm.errors import CalibrationError


class CalibrationCollector(ABC):
    """Base class of every collector.

    `include_layers`: the names of the tensors that need thresholds. The compiler fills it in unless it was
    set by the user (then only those are collected, and the rest fall back to fp32).
    `min_max_dict`: {name: (min, max)}, what `post_collect` returns by default.
    """

    def __init__(self, include_layers=None):
        self.include_layers = set(include_layers) if include_layers is not None else None
        self.min_max_dict: dict[str, tuple[float, float]] = {}

    def wants(self, name: str) -> bool:
        return self.include_layers is None or name in self.include_layers

    @abstractmethod
    def collect(self, name: str, op_name: str, arr: np.ndarray) -> None:
        """Called for every included tensor on every calibration batch."""

    def post_collect(self) -> dict[str, tuple[float, float]]:
        """Called once after the last batch: {name: (min, max)} for the included tensors."""
        return self.min_max_dict


def _finite(name: str, arr) -> np.ndarray:
    values = np.asarray(arr, dtype=np.float32).ravel()
    if values.size == 0:
        raise CalibrationError(f"tensor {name!r} is empty: nothing to calibrate")
    if not np.isfinite(values).all():
        raise CalibrationError(f"tensor {name!r} holds NaN or Inf during calibration; check the calibration "
                               "data and the model")
    return values


class NaiveCollector(CalibrationCollector):
    """`naive`: the running min and max of each tensor."""

    def collect(self, name, op_name, arr):
        values = _finite(name, arr)
        lo, hi = float(values.min()), float(values.max())
        if name in self.min_max_dict:
            old_lo, old_hi = self.min_max_dict[name]
            lo, hi = min(lo, old_lo), max(hi, old_hi)
        self.min_max_dict[name] = (lo, hi)


class _HistogramCollector(CalibrationCollector):
    """Keeps one SymmetricHistogram per tensor, widened as batches of larger range arrive."""

    def __init__(self, include_layers=None, num_bins: int = 8001):
        super().__init__(include_layers)
        if num_bins % 2 == 0:
            num_bins += 1  # a zero-centred histogram needs a middle bin
        self.num_bins = num_bins
        self.histograms: dict[str, SymmetricHistogram] = {}

    def collect(self, name, op_name, arr):
        values = _finite(name, arr)
        if name in self.histograms:
            self.histograms[name].add(values)
        else:
            self.histograms[name] = SymmetricHistogram.of(values, self.num_bins)


class EntropyCollector(_HistogramCollector):
    """`entropy`: MXNet's KL-divergence thresholds on 8001-bin histograms; 255 quantized bins, or 511 for
    non-negative tensors when they will be stored as u8 (`quantized_dtype` 'auto' or 'uint8')."""

    def __init__(self, include_layers=None, num_bins: int = 8001, num_quantized_bins: int = 255,
                 quantized_dtype: str = "auto"):
        super().__init__(include_layers, num_bins)
        self.num_quantized_bins = num_quantized_bins
        self.quantized_dtype = quantized_dtype
        self.divergence: dict[str, float] = {}

    def post_collect(self):
        for name, hist in self.histograms.items():
            if hist.threshold == 0.0:
                self.min_max_dict[name] = (0.0, 0.0)
                continue
            bins = self.num_quantized_bins
            unsigned = hist.min_value >= 0 and self.quantized_dtype in ("auto", "uint8")
            if unsigned:
                bins = bins * 2 + 1
            th, self.divergence[name] = optimal_threshold(hist.counts, hist.edges, bins)
            self.min_max_dict[name] = (0.0 if unsigned else -th, th)
        return self.min_max_dict


class MSECollector(_HistogramCollector):
    """`mse`: per tensor, the threshold with the smallest quantization MSE on its histogram (see
    calib.mse); u8 over [0, t] for non-negative tensors when they will be stored as u8."""

    def __init__(self, include_layers=None, num_bins: int = 8001, quantized_dtype: str = "auto"):
        super().__init__(include_layers, num_bins)
        self.quantized_dtype = quantized_dtype
        self.mse: dict[str, float] = {}

    def post_collect(self):
        for name, hist in self.histograms.items():
            unsigned = hist.min_value >= 0 and self.quantized_dtype in ("auto", "uint8")
            th, self.mse[name] = mse_threshold(hist.counts, hist.edges, unsigned)
            self.min_max_dict[name] = (0.0 if unsigned else max(hist.min_value, -th), min(hist.max_value, th))
        return self.min_max_dict


class PercentileCollector(_HistogramCollector):
    """`percentile`: the threshold below which `percentile` % of |x| lies (99.99 by default), from the
    same streaming histogram; the range is then clipped to the values actually seen."""

    def __init__(self, include_layers=None, percentile: float = 99.99, num_bins: int = 8001):
        super().__init__(include_layers, num_bins)
        if not 0 < percentile <= 100:
            raise CalibrationError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = percentile

    def post_collect(self):
        for name, hist in self.histograms.items():
            middle = len(hist.counts) // 2
            # |x| histogram: fold the negative half onto the positive one
            magnitude = hist.counts[middle:].astype(np.float64)
            magnitude[1:] += hist.counts[:middle][::-1]
            cumulative = np.cumsum(magnitude) / magnitude.sum()
            index = int(np.searchsorted(cumulative, self.percentile / 100.0))
            step = 2 * hist.threshold / len(hist.counts)
            th = min(hist.threshold, (index + 0.5) * step)
            self.min_max_dict[name] = (max(hist.min_value, -th), min(hist.max_value, th))
        return self.min_max_dict


BUILT_IN_MODES = {"mse": MSECollector, "naive": NaiveCollector, "entropy": EntropyCollector,
                  "percentile": PercentileCollector}


def make_collector(mode: str, collector: CalibrationCollector | None = None, **options) -> CalibrationCollector:
    """The collector for `calib_mode`; `custom` takes the user's instance."""
    if mode == "custom":
        if not isinstance(collector, CalibrationCollector):
            raise CalibrationError("calib_mode='custom' needs collector=<a CalibrationCollector instance>")
        return collector
    if mode not in BUILT_IN_MODES:
        raise CalibrationError(f"unknown calib_mode {mode!r}; choose from {', '.join([*BUILT_IN_MODES, 'custom', 'none'])}")
    return BUILT_IN_MODES[mode](**options)


def check_thresholds(result, expected_names) -> dict[str, tuple[float, float]]:
    """Validate what a collector's post_collect returned: every expected name, as finite (min <= max)."""
    if not isinstance(result, dict) or not result:
        raise CalibrationError(f"the collector's post_collect() returned {type(result).__name__ if not isinstance(result, dict) else 'an empty dict'}; "
                               "it must return {tensor name: (min, max)}")
    unknown = sorted(set(result) - set(expected_names))
    if unknown:
        raise CalibrationError(f"the collector returned thresholds for unknown tensor(s) {', '.join(map(repr, unknown[:5]))}")
    checked = {}
    for name, pair in result.items():
        try:
            lo, hi = (float(v) for v in pair)
        except (TypeError, ValueError):
            raise CalibrationError(f"threshold for {name!r} must be a (min, max) pair, got {pair!r}") from None
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
            raise CalibrationError(f"threshold for {name!r} is not a finite range with min <= max: ({lo}, {hi})")
        checked[name] = (lo, hi)
    return checked
