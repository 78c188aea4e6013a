"""Post-training INT8: pick the ops, calibrate them on the fused fp32 graph, rewrite the graph.

Calibration runs the prepared and fused fp32 graph, built for this host, with every int8 candidate's input
returned as an extra output, batch by batch; the collector keeps its own bounded state, so memory does not
grow with the number of batches. The thresholds then drive relay_passes.quantize.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np

from calib import CalibrationCollector, check_thresholds, make_collector
from compiler.calib_data import Progress, model_batches
from relay_passes.quantize import (QuantizableOp, expose_inputs, find_quantizable, plan_dynamic, plan_op,
                                   quantize_graph)

ONNX_OP_KINDS = {"Conv": "conv2d", "Gemm": "dense", "MatMul": "dense", "AveragePool": "avg_pool",
                 "GlobalAveragePool": "avg_pool", "conv2d": "conv2d", "dense": "dense", "avg_pool": "avg_pool"}


@dataclass
class QuantizationOptions:
    calib_mode: str = "entropy"
    num_calib_batches: int | None = None
    quantized_dtype: str = "auto"
    exclude_layers: tuple = ()
    exclude_layers_match: tuple = ()
    exclude_operators: tuple = ()
    collector: CalibrationCollector | None = None
    percentile: float = 99.99

    def check(self) -> None:
        from calib import CalibrationError

        if self.quantized_dtype not in ("auto", "int8", "uint8"):
            raise CalibrationError(f"quantized_dtype must be 'auto', 'int8' or 'uint8', got {self.quantized_dtype!r}")
        unknown = [o for o in self.exclude_operators if o not in ONNX_OP_KINDS]
        if unknown:
            raise CalibrationError(f"exclude_operators: unknown op type(s) {unknown}; int8 op types are "
                                   "Conv, Gemm, MatMul, AveragePool, GlobalAveragePool")

    def collector_for(self) -> CalibrationCollector:
        """The collector of `calib_mode` (not called for 'none', which measures nothing ahead of time)."""
        options = {}
        if self.calib_mode == "percentile":
            options["percentile"] = self.percentile
        if self.calib_mode == "entropy":
            options["quantized_dtype"] = self.quantized_dtype
        return make_collector(self.calib_mode, self.collector, **options)


def select_ops(ops: list[QuantizableOp], options: QuantizationOptions) -> tuple[list, dict]:
    """The ops to quantize, and {name: why not} for the ones left in fp32 by the user's exclusions."""
    names = {op.name for op in ops}
    for name in options.exclude_layers:
        if name not in names:
            warnings.warn(f"exclude_layers: no int8 candidate is named {name!r} (candidates: "
                          f"{', '.join(sorted(names)[:10])}{' ...' if len(names) > 10 else ''})", stacklevel=3)
    excluded_kinds = {ONNX_OP_KINDS[o] for o in options.exclude_operators}
    chosen, left = [], {}
    for op in ops:
        if op.name in options.exclude_layers:
            left[op.name] = "excluded by name"
        elif any(part in op.name for part in options.exclude_layers_match):
            left[op.name] = "excluded by name match"
        elif op.kind in excluded_kinds:
            left[op.name] = "excluded by op type"
        else:
            chosen.append(op)
    return chosen, left


def calibrate(prepared, ops, input_specs, calib, options, build_for_host) -> tuple[dict, dict]:
    """Run the calibration batches; return ({op name: (min, max)}, {'fp32_output': first batch's output})."""
    collector = options.collector_for()
    if collector.include_layers is None:
        collector.include_layers = {op.name for op in ops}
    wanted = [i for i, op in enumerate(ops) if collector.wants(op.name)]
    runner = build_for_host(expose_inputs(prepared, ops))
    progress = Progress("calibrating", options.num_calib_batches)
    first = {}
    try:
        for batch in model_batches(calib, input_specs, options.num_calib_batches):
            outputs = runner(batch)  # the ops' inputs, then the model's outputs
            if not first:  # kept for the report: the error each quantized tensor gets, on real data
                first = {"inputs": batch, "fp32_output": outputs[len(ops)], "tensors": outputs[:len(ops)]}
            for i in wanted:
                collector.collect(ops[i].name, ops[i].kind, outputs[i])
            progress.step()
    finally:
        progress.close()
    ranges = check_thresholds(collector.post_collect(), [op.name for op in ops])
    return ranges, first


def plan(ops, ranges: dict, options: QuantizationOptions, left: dict, tensors: list) -> list[dict]:
    """Give every op its int8 plan where it has a usable range; the per-layer report rows, worst first."""
    rows = []
    for op, tensor in zip(ops, tensors):
        if op.name not in ranges:
            left.setdefault(op.name, "no threshold from the collector")
            continue
        lo, hi = ranges[op.name]
        op.plan = plan_op(op, lo, hi, options.quantized_dtype) or {}
        if not op.plan:
            warnings.warn(f"calibration: the input of {op.name!r} is 0 on every batch (zero range); "
                          "it stays fp32", stacklevel=3)
            left[op.name] = "zero range in calibration"
            continue
        error = quantization_error(tensor, op.plan["x_scale"], op.plan["dtype"])
        rows.append({"name": op.name, "op": op.kind, "dtype": op.plan["dtype"], "threshold": [lo, hi],
                     "scale": op.plan["x_scale"], "int32_bias": op.plan.get("bias") is not None, **error})
    return sorted(rows, key=lambda row: row["sqnr_db"])


def quantization_error(x: np.ndarray, scale: float, dtype: str) -> dict:
    """The error int8 storage gives this tensor: x against dequantize(quantize(x))."""
    lo, hi = (0, 255) if dtype == "uint8" else (-128, 127)
    return output_error(x, np.clip(np.round(x / scale), lo, hi) * scale)


def quantize(prepared, proto, input_specs, calib, options: QuantizationOptions, build_for_host):
    """The int8 graph and its report: layers, int8/fp32 op counts, what stayed fp32 and why."""
    options.check()
    candidates = find_quantizable(prepared, proto)
    ops, left = select_ops(candidates, options)
    if not ops:
        warnings.warn("int8: no conv or dense op is left to quantize; the model stays fp32", stacklevel=3)
        return prepared, {"calib_mode": options.calib_mode, "layers": [], "int8_ops": {},
                          "fp32_ops": _kind_counts(candidates), "fp32_layers": left}, {}
    if options.calib_mode == "none":
        first, rows = {}, []
        for op in ops:
            if op.kind == "avg_pool":  # a run-time range buys nothing for a pooling
                left[op.name] = "no int8 pooling without calibration"
                continue
            op.plan = plan_dynamic(op)
            rows.append({"name": op.name, "op": op.kind, "dtype": "int8", "threshold": None, "scale": None,
                         "int32_bias": False, "sqnr_db": None, "cosine": None})
    else:
        ranges, first = calibrate(prepared, ops, input_specs, calib, options, build_for_host)
        rows = plan(ops, ranges, options, left, first["tensors"])
    quantized = quantize_graph(prepared, ops)
    report = {
        "calib_mode": options.calib_mode,
        "layers": rows,
        "int8_ops": _kind_counts([op for op in ops if op.plan]),
        "fp32_ops": _kind_counts([op for op in candidates if not op.plan]),
        "fp32_layers": left,
    }
    return quantized, report, first


def _kind_counts(ops) -> dict:
    return dict(Counter(op.kind for op in ops))


def output_error(fp32: np.ndarray, int8: np.ndarray) -> dict:
    """How far the int8 model's output is from fp32's on the same batch: SQNR (dB) and cosine."""
    a, b = fp32.astype(np.float64).ravel(), int8.astype(np.float64).ravel()
    noise = np.sum((a - b) ** 2)
    sqnr = float("inf") if noise == 0 else float(10 * np.log10(np.sum(a ** 2) / noise))
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) or 1.0))
    return {"sqnr_db": sqnr, "cosine": cosine}
