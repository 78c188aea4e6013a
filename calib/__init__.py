"""Calibration: per-layer statistics of float tensors turned into quantization thresholds.

Knows nothing about TVM kernels: it sees named float tensors and returns {name: (min, max)}.
"""

from calib.collectors import (BUILT_IN_MODES, CalibrationCollector, CalibrationError, EntropyCollector,
                              MSECollector, NaiveCollector, PercentileCollector, check_thresholds, make_collector)

__all__ = ["BUILT_IN_MODES", "CalibrationCollector", "CalibrationError", "EntropyCollector", "MSECollector",
           "NaiveCollector", "PercentileCollector", "check_thresholds", "make_collector"]
