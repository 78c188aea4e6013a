"""Calibration: per-layer statistics of float tensors turned into quantization thresholds.

Knows nothing about TVM kernels. The collectors arrive with INT8 support.
"""
