"""A symmetric histogram over [-th, th] that absorbs batches of any range without growing with their count.

MXNet's scheme: the first batch fixes the bin width (num_bins bins over ±max|x|); a later batch with a wider
range adds whole bins on both sides at the same width, so earlier counts stay exactly where they were.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SymmetricHistogram:
    counts: np.ndarray  # int64, odd length, centred on 0
    threshold: float  # the histogram spans [-threshold, threshold]
    min_value: float
    max_value: float

    @classmethod
    def of(cls, values: np.ndarray, num_bins: int) -> SymmetricHistogram:
        lo, hi = float(values.min()), float(values.max())
        th = max(abs(lo), abs(hi))
        counts = _counts(values, num_bins, th)
        return cls(counts, th, lo, hi)

    def add(self, values: np.ndarray) -> None:
        lo, hi = float(values.min()), float(values.max())
        th = max(abs(lo), abs(hi))
        self.min_value, self.max_value = min(self.min_value, lo), max(self.max_value, hi)
        if self.threshold == 0.0:  # every value so far was 0: start over at the new width
            zeros = int(self.counts.sum())
            self.counts, self.threshold = _counts(values, len(self.counts), th), th
            self.counts[len(self.counts) // 2] += zeros
            return
        if th <= self.threshold:
            self.counts += _counts(values, len(self.counts), self.threshold)
            return
        step = 2 * self.threshold / len(self.counts)
        extra = int((th - self.threshold) // step + 1)  # bins added on each side
        wider = len(self.counts) + 2 * extra
        new_threshold = self.threshold + extra * step
        counts = _counts(values, wider, new_threshold)
        counts[extra:wider - extra] += self.counts
        self.counts, self.threshold = counts, new_threshold

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.threshold, self.threshold, len(self.counts) + 1)


def _counts(values: np.ndarray, num_bins: int, threshold: float) -> np.ndarray:
    if threshold == 0.0:
        counts = np.zeros(num_bins, np.int64)
        counts[num_bins // 2] = values.size
        return counts
    counts, _ = np.histogram(values, bins=num_bins, range=(-threshold, threshold))
    return counts.astype(np.int64)
