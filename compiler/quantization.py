"""Post-training INT8: pick the ops, calibrate them on the fused fp32 graph, correct their biases, rewrite.

Calibration runs the prepared fp32 graph, built for this host, with every int8 candidate's input returned as
an extra output, batch by batch; the collector keeps its own bounded state, so memory does not grow with the
number of batches. Where the graph bounds an input (ReLU6, Sigmoid...), its observed range is kept as it is,
never clipped inside the bound. The thresholds give each op its plan (relay_passes.quantize); bias
correction then measures each layer's mean int8 error with the simulator and folds it into the s32 bias.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections import Counter

import numpy as np

from calib import NaiveCollector, check_thresholds
from compiler.bias_correction import correct_biases
from compiler.calib_data import Progress, Replay
from compiler.int8_options import QuantizationOptions
from compiler.report import QuantizationReport
from compiler.simulate import Simulator
from compiler.smoothquant import smoothing_factors
from relay_passes.bounds import tensor_bounds
from relay_passes.quantize import (QuantizableOp, expose_inputs, find_quantizable, plan_dynamic, plan_op,
                                   output_channels, plan_with_shift, quantize_graph)


@dataclasses.dataclass
class Quantization:
    """A model's int8 plan: its ops (each with a plan, or left fp32), the report, and the first calibration
    batch with its fp32 output and tensors (for the report's error figures)."""

    prepared: object  # the fp32 graph
    candidates: list[QuantizableOp]
    ops: list[QuantizableOp]  # the candidates not excluded by the user
    options: QuantizationOptions
    left: dict  # op name -> why it stays fp32
    rows: list = dataclasses.field(default_factory=list)  # per-layer report rows
    first: dict = dataclasses.field(default_factory=dict)
    batches: Replay | None = None
    extra: dict = dataclasses.field(default_factory=dict)  # more report sections (bias correction, fallback)
    _simulator: Simulator | None = None

    def simulator(self, build_for_host) -> Simulator:
        """The simulator of the planned ops (built once), its shifts set to the bias corrections."""
        if self._simulator is None:
            self._simulator = Simulator(self.prepared, self.planned, build_for_host)
        return self._simulator

    def graph(self, fp32_layers=frozenset()):
        """The int8 graph with the planned ops, except `fp32_layers` (names), in int8."""
        return quantize_graph(self.prepared, [op for op in self.planned if op.name not in fp32_layers])

    @property
    def planned(self) -> list[QuantizableOp]:
        return [op for op in self.ops if op.plan]

    def report(self, fp32_layers=frozenset()) -> QuantizationReport:
        left = {**self.left, **{name: "reverted to fp32 by the accuracy fallback" for name in fp32_layers}}
        int8 = [op for op in self.planned if op.name not in fp32_layers]
        return QuantizationReport(
            calib_mode=self.options.calib_mode,
            options=self.options.to_json(),
            layers=[row for row in self.rows if row["name"] not in fp32_layers],
            int8_ops=_kind_counts(int8),
            fp32_ops=_kind_counts([op for op in self.candidates if op not in int8]),
            fp32_layers=left,
            bias_correction=self.extra.get("bias_correction"),
            fallback=self.extra.get("fallback"),
        )


def select_ops(ops: list[QuantizableOp], options: QuantizationOptions) -> tuple[list, dict]:
    """The ops to quantize, and {name: why not} for the ones left in fp32 by the user's exclusions."""
    names = {op.name for op in ops}
    for name in options.exclude_layers:
        if name not in names:
            warnings.warn(f"exclude_layers: no int8 candidate is named {name!r} (candidates: "
                          f"{', '.join(sorted(names)[:10])}{' ...' if len(names) > 10 else ''})", stacklevel=4)
    excluded_kinds = options.excluded_kinds
    chosen, left = [], {}
    for op in ops:
        if op.name in options.exclude_layers:
            left[op.name] = "excluded by name"
        elif any(part in op.name for part in options.exclude_layers_match):
            left[op.name] = "excluded by name match"
        elif op.kind in excluded_kinds:
            left[op.name] = "excluded by op type"
        elif op.kind == "matmul" and not options.attention_int8:
            left[op.name] = "a matmul of two activations (attention_int8=True runs it in int8)"
        else:
            chosen.append(op)
    return chosen, left


def second_input(op: QuantizableOp) -> str:
    """The name a matmul's second activation is calibrated under."""
    return f"{op.name}#1"


def calibrate(prepared, ops, batches: Replay, options: QuantizationOptions, build_for_host) -> tuple[dict, dict]:
    """Run the calibration batches; return ({tensor name: (min, max)}, the first batch, its fp32 output, the
    ops' input tensors and, for SmoothQuant, each dense input's per-channel maxima)."""
    names = [op.name for op in ops] + [second_input(op) for op in ops if op.other is not None]
    kinds = [op.kind for op in ops] + [op.kind for op in ops if op.other is not None]
    collector = options.collector_for()
    if collector.include_layers is None:
        collector.include_layers = set(names)
    bounds = tensor_bounds(prepared["main"])
    sources = [op.data for op in ops] + [op.other for op in ops if op.other is not None]
    bounded = {name: bounds[t] for name, t in zip(names, sources) if t in bounds}
    observed = NaiveCollector(bounded)  # what a bounded input really spans, kept whole
    wanted = [i for i, name in enumerate(names) if collector.wants(name)]
    smoothed_ops = [i for i, op in enumerate(ops) if smoothed(op, options)]
    runner = build_for_host(expose_inputs(prepared, ops))
    progress = Progress("calibrating", options.num_calib_batches)
    first = {"channel_max": {}}
    try:
        for batch in batches:
            outputs = runner(batch)  # the ops' inputs, the matmuls' second inputs, then the model's outputs
            if "inputs" not in first:  # kept for the report: the error each quantized tensor gets, on real data
                first.update(inputs=batch, fp32_output=outputs[len(names)], tensors=outputs[:len(ops)])
            for i in wanted:
                collector.collect(names[i], kinds[i], outputs[i])
                if names[i] in bounded:
                    observed.collect(names[i], kinds[i], outputs[i])
            for i in smoothed_ops:
                peak = np.abs(outputs[i]).reshape(-1, outputs[i].shape[-1]).max(axis=0)
                first["channel_max"][ops[i].name] = np.maximum(first["channel_max"].get(ops[i].name, peak), peak)
            progress.step()
    finally:
        progress.close()
    ranges = check_thresholds(collector.post_collect(), names)
    if options.collector is None:  # a user's own collector has the last word
        for name, (lo, hi) in observed.post_collect().items():
            if name in ranges:
                bound_lo, bound_hi = bounded[name]
                ranges[name] = (max(lo, bound_lo), min(hi, bound_hi))
    return ranges, first


def has_token_axis(op: QuantizableOp) -> bool:
    """A dense op reading (batch, tokens, features) or more: a transformer's, where channels carry outliers."""
    return op.kind == "dense" and len(op.data.ty.shape.values) >= 3


def smoothed(op: QuantizableOp, options: QuantizationOptions) -> bool:
    if op.kind != "dense":
        return False
    return options.smooth_quant if options.smooth_quant is not None else has_token_axis(op)


def per_token(op: QuantizableOp, options: QuantizationOptions) -> bool:
    return op.kind == "dense" and options.per_token


def plan(ops, ranges: dict, options: QuantizationOptions, left: dict, first: dict,
         bounded_pairs: bool = False) -> list[dict]:
    """Give every op its int8 plan where it has a usable range; the per-layer report rows, worst first.
    `bounded_pairs`: weights for a target without VNNI (relay_passes.weight_pairs)."""
    rows = []
    for op, tensor in zip(ops, first["tensors"]):
        if op.name not in ranges or (op.other is not None and second_input(op) not in ranges):
            left.setdefault(op.name, "no threshold from the collector")
            continue
        smooth = alpha = None
        if op.name in first["channel_max"]:
            smooth, alpha = smoothing_factors(tensor, op.weight, first["channel_max"][op.name], per_token(op, options))
        if per_token(op, options):
            op.plan = plan_dynamic(op, per_token=True, smooth=smooth, bounded_pairs=bounded_pairs)
            rows.append({"name": op.name, "op": op.kind, "dtype": "int8", "threshold": None, "scale": None,
                         "int32_bias": False, "per_token": True, "smooth_alpha": alpha,
                         **per_token_error(tensor / (smooth if smooth is not None else 1.0))})
            continue
        lo, hi = ranges[op.name]
        if smooth is not None:  # the smoothed input's range: each channel's maximum, divided by its factor
            peak = float(np.max(first["channel_max"][op.name] / smooth))
            lo, hi = (-peak if lo < 0 else 0.0), peak
        op.plan = plan_op(op, lo, hi, options.quantized_dtype, ranges.get(second_input(op)), smooth,
                          bounded_pairs) or {}
        if not op.plan:
            warnings.warn(f"calibration: an input of {op.name!r} is 0 on every batch (zero range); "
                          "it stays fp32", stacklevel=4)
            left[op.name] = "zero range in calibration"
            continue
        scaled = tensor / smooth if smooth is not None else tensor
        error = quantization_error(scaled, op.plan["x_scale"], op.plan["dtype"])
        rows.append({"name": op.name, "op": op.kind, "dtype": op.plan["dtype"], "threshold": [lo, hi],
                     "scale": op.plan["x_scale"], "int32_bias": op.plan.get("bias") is not None,
                     "smooth_alpha": alpha, **error,
                     # the most a channel's weight scale grew to bound its pairs (1.0: none did)
                     **({"weight_pair_growth": op.plan["pair_growth"]} if op.plan.get("bounded_pairs") else {})})
    return sorted(rows, key=lambda row: row["sqnr_db"])


def per_token_error(x: np.ndarray) -> dict:
    """The error per-token s8 storage gives this tensor."""
    scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-12) / 127
    return output_error(x, np.clip(np.round(x / scale), -127, 127) * scale)


def quantization_error(x: np.ndarray, scale: float, dtype: str) -> dict:
    """The error int8 storage gives this tensor: x against dequantize(quantize(x))."""
    lo, hi = (0, 255) if dtype == "uint8" else (-128, 127)
    return output_error(x, np.clip(np.round(x / scale), lo, hi) * scale)


def quantize(prepared, proto, input_specs, calib, options: QuantizationOptions, build_for_host,
             bounded_pairs: bool = False) -> Quantization:
    """The model's int8 plan: calibrated, with corrected biases; `.graph()` is the int8 graph.
    `bounded_pairs`: the target has no VNNI, and its int8 kernels are faster on weights with bounded pairs."""
    candidates = find_quantizable(prepared, proto)
    ops, left = select_ops(candidates, options)
    result = Quantization(prepared, candidates, ops, options, left)
    if not ops:
        warnings.warn("int8: no conv or dense op is left to quantize; the model stays fp32", stacklevel=3)
        return result
    if options.calib_mode == "none":
        for op in ops:
            if op.kind in ("avg_pool", "matmul"):  # a run-time range buys nothing for a pooling
                left[op.name] = f"no int8 {'pooling' if op.kind == 'avg_pool' else 'activation matmul'} " \
                                "without calibration"
                continue
            op.plan = plan_dynamic(op, bounded_pairs=bounded_pairs)
            result.rows.append({"name": op.name, "op": op.kind, "dtype": "int8", "threshold": None, "scale": None,
                                "int32_bias": False, "sqnr_db": None, "cosine": None})
        return result
    result.batches = Replay(calib, input_specs, options.num_calib_batches)
    ranges, result.first = calibrate(prepared, ops, result.batches, options, build_for_host)
    result.rows = plan(ops, ranges, options, left, result.first, bounded_pairs)
    if options.bias_correction and any(output_channels(op) for op in result.planned):
        started = time.perf_counter()
        simulator = result.simulator(build_for_host)
        shifts, summary = correct_biases(simulator, result.batches, options.bias_correction)
        for op, shift in simulator.shifts_by_op(shifts).items():
            plan_with_shift(op, shift)
        simulator.shift = shifts  # its int8 ops still hold the old biases: it adds the corrections
        result.extra["bias_correction"] = {**summary, "seconds": time.perf_counter() - started}
    return result


def _kind_counts(ops) -> dict:
    return dict(Counter(op.kind for op in ops))


def output_error(fp32: np.ndarray, int8: np.ndarray) -> dict:
    """How far the int8 model's output is from fp32's on the same batch: SQNR (dB) and cosine."""
    a, b = fp32.astype(np.float64).ravel(), int8.astype(np.float64).ravel()
    noise = np.sum((a - b) ** 2)
    sqnr = float("inf") if noise == 0 else float(10 * np.log10(np.sum(a ** 2) / noise))
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) or 1.0))
    return {"sqnr_db": sqnr, "cosine": cosine}
