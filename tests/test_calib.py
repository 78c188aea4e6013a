"""Calibration collectors against hand-computed thresholds and an independent reference of MXNet's search."""

import numpy as np
import pytest

from calib import (CalibrationCollector, CalibrationError, EntropyCollector, NaiveCollector, PercentileCollector,
                   check_thresholds, make_collector)
from calib.entropy import optimal_threshold
from calib.histogram import SymmetricHistogram


def reference_threshold(hist, edges, num_quantized_bins, eps=1e-4):
    """MXNet's calibrate_entropy (calibrate.cc) transcribed loop for loop, for small histograms."""
    num_bins = len(hist)
    zero = num_bins // 2
    results = []
    for i in range(num_quantized_bins // 2, zero + 1):
        start, stop = zero - i, zero + i + 1
        sliced = [0] * (stop - start)
        p = [0.0] * (stop - start)
        for j in range(num_bins):
            if j <= start:
                p[0] += hist[j]
            elif j >= stop:
                p[-1] += hist[j]
            else:
                sliced[j - start] = hist[j]
                p[j - start] = hist[j]
        merged = len(sliced) // num_quantized_bins
        quantized = [sum(sliced[j * merged:(j + 1) * merged]) for j in range(num_quantized_bins)]
        quantized[-1] += sum(sliced[num_quantized_bins * merged:])
        q = [0.0] * len(sliced)
        for j in range(num_quantized_bins):
            lo, hi = j * merged, (len(q) if j == num_quantized_bins - 1 else (j + 1) * merged)
            norm = sum(1 for v in sliced[lo:hi] if v != 0)
            if norm:
                for k in range(lo, hi):
                    if p[k]:
                        q[k] = quantized[j] / norm

        def smooth(d):
            zeros = sum(1 for v in d if v == 0)
            if zeros == len(d) or eps * zeros / (len(d) - zeros) >= 1:
                return None
            eps1 = eps * zeros / (len(d) - zeros)
            return [v + eps if v == 0 else v - eps1 for v in d]

        ps, qs = smooth(p), smooth(q)
        if ps is None or qs is None:
            results.append((np.inf, edges[stop]))
            continue
        sp, sq = sum(ps), sum(qs)
        kl = sum((a / sp) * np.log((a / sp) / (b / sq)) for a, b in zip(ps, qs) if a != 0)
        results.append((kl, edges[stop]))
    best = min(range(len(results)), key=lambda k: results[k][0])
    return results[best][1]


@pytest.mark.parametrize("seed", range(5))
def test_entropy_search_matches_the_reference_transcription(seed):
    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.standard_normal(3000), rng.uniform(-12, 12, 20)])
    hist = SymmetricHistogram.of(values, 61)
    threshold, _ = optimal_threshold(hist.counts, hist.edges, 9)
    assert threshold == pytest.approx(reference_threshold(list(hist.counts), hist.edges, 9))


def test_entropy_keeps_the_whole_range_of_a_uniform_distribution(rng):
    collector = EntropyCollector()
    collector.collect("x", "conv2d", rng.uniform(-1, 1, 200_000))
    lo, hi = collector.post_collect()["x"]
    assert hi == pytest.approx(1.0, abs=0.02) and lo == -hi


def test_entropy_clips_rare_outliers(rng):
    values = np.concatenate([rng.standard_normal(500_000), [80.0, -60.0]])
    collector = EntropyCollector()
    collector.collect("x", "conv2d", values)
    lo, hi = collector.post_collect()["x"]
    assert 2.5 < hi < 10 and lo == -hi


def test_entropy_uses_511_bins_and_a_zero_floor_for_non_negative_u8_tensors(rng):
    values = np.abs(rng.standard_normal(200_000))
    u8, s8 = EntropyCollector(quantized_dtype="auto"), EntropyCollector(quantized_dtype="int8")
    for c in (u8, s8):
        c.collect("relu_out", "relu", values)
    (lo_u8, hi_u8), (lo_s8, hi_s8) = u8.post_collect()["relu_out"], s8.post_collect()["relu_out"]
    assert lo_u8 == 0.0 and lo_s8 == -hi_s8
    hist = u8.histograms["relu_out"]
    assert hi_u8 == pytest.approx(optimal_threshold(hist.counts, hist.edges, 511)[0])
    assert hi_s8 == pytest.approx(optimal_threshold(hist.counts, hist.edges, 255)[0])


def test_histograms_merge_across_batches_of_different_ranges(rng):
    batches = [rng.uniform(-1, 1, 5000), rng.uniform(-3, 2.5, 5000), rng.uniform(-0.5, 0.5, 5000)]
    hist = SymmetricHistogram.of(batches[0], 101)
    for batch in batches[1:]:
        hist.add(batch)
    assert hist.counts.sum() == 15000
    assert len(hist.counts) % 2 == 1 and hist.threshold >= 3.0
    step = 2 * np.abs(batches[0]).max() / 101
    assert (hist.edges[1] - hist.edges[0]) == pytest.approx(step)  # the first batch's bin width is kept
    expected, _ = np.histogram(np.concatenate(batches), bins=len(hist.counts), range=(-hist.threshold, hist.threshold))
    assert np.abs(expected - hist.counts).sum() <= 4  # identical but for values on a bin edge
    assert (hist.min_value, hist.max_value) == (min(b.min() for b in batches), max(b.max() for b in batches))


def test_naive_is_the_running_min_and_max():
    c = NaiveCollector()
    c.collect("a", "conv2d", np.array([[-1.0, 2.0]]))
    c.collect("a", "conv2d", np.array([0.5, 3.5]))
    c.collect("b", "dense", np.array([-7.0, -2.0]))
    assert c.post_collect() == {"a": (-1.0, 3.5), "b": (-7.0, -2.0)}


def test_percentile_threshold(rng):
    values = rng.standard_normal(1_000_000)
    c = PercentileCollector(percentile=99.9)
    c.collect("x", "conv2d", values)
    lo, hi = c.post_collect()["x"]
    expected = np.percentile(np.abs(values), 99.9)
    bin_width = 2 * np.abs(values).max() / 8001
    assert hi == pytest.approx(expected, abs=2 * bin_width) and lo == -hi
    c = PercentileCollector()  # 99.99 by default; a non-negative tensor keeps its floor
    c.collect("relu", "relu", np.abs(values))
    lo, hi = c.post_collect()["relu"]
    assert lo == pytest.approx(np.abs(values).min()) and hi == pytest.approx(np.percentile(np.abs(values), 99.99), abs=2 * bin_width)


def test_all_zero_tensor_gives_a_zero_range():
    for c in (NaiveCollector(), EntropyCollector(), PercentileCollector()):
        c.collect("z", "relu", np.zeros(100))
        c.collect("z", "relu", np.zeros(10))
        lo, hi = c.post_collect()["z"]
        assert lo == 0.0 and hi == 0.0


def test_zero_batch_then_real_data_keeps_the_zeros(rng):
    c = EntropyCollector(num_bins=101)
    c.collect("x", "relu", np.zeros(50))
    c.collect("x", "relu", rng.uniform(0, 1, 50))
    assert c.histograms["x"].counts.sum() == 100 and c.histograms["x"].counts[50] >= 50


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_names_the_tensor(bad):
    with pytest.raises(CalibrationError, match="'conv1_out' holds NaN or Inf"):
        NaiveCollector().collect("conv1_out", "conv2d", np.array([1.0, bad]))


class MeanAbsCollector(CalibrationCollector):
    """A user's collector, as in the MXNet article: thresholds from the mean of |x|."""

    def __init__(self):
        super().__init__()
        self.sums = {}

    def collect(self, name, op_name, arr):
        total, count = self.sums.get(name, (0.0, 0))
        self.sums[name] = (total + float(np.abs(arr).sum()), count + np.asarray(arr).size)

    def post_collect(self):
        for name, (total, count) in self.sums.items():
            t = 4 * total / count
            self.min_max_dict[name] = (-t, t)
        return self.min_max_dict


def test_custom_collector_is_used_as_given():
    mine = MeanAbsCollector()
    assert make_collector("custom", collector=mine) is mine
    mine.collect("x", "conv2d", np.array([-1.0, 1.0, 3.0, -3.0]))
    assert check_thresholds(mine.post_collect(), ["x"]) == {"x": (-8.0, 8.0)}


def test_include_layers_filter():
    c = NaiveCollector(include_layers=["a"])
    assert c.wants("a") and not c.wants("b")
    assert NaiveCollector().wants("anything")


@pytest.mark.parametrize("result, words", [
    ({}, "empty dict"),
    (None, "returned NoneType"),
    ({"ghost": (0, 1)}, "unknown tensor"),
    ({"x": (1.0, -1.0)}, "min <= max"),
    ({"x": (float("nan"), 1.0)}, "finite"),
    ({"x": 3.0}, "pair"),
])
def test_bad_collector_results_are_named(result, words):
    with pytest.raises(CalibrationError, match=words):
        check_thresholds(result, ["x"])


def test_modes():
    assert isinstance(make_collector("entropy"), EntropyCollector)
    assert make_collector("percentile", percentile=99.0).percentile == 99.0
    with pytest.raises(CalibrationError, match="unknown calib_mode 'kl'"):
        make_collector("kl")
    with pytest.raises(CalibrationError, match="needs collector="):
        make_collector("custom")
