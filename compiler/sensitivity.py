"""Per-layer sensitivity of a model to INT8: what `quantvm analyze` reports and the fallback ranks by.

For each int8 layer, measured on real batches with the quantization simulator (the int8 graph with a
run-time switch per layer, so no layer costs a rebuild):
- `input_sqnr_db`: the SQNR of the layer's quantized input against its fp32 input;
- `only_int8_sqnr_db`: the model output's SQNR when only this layer runs int8 (the rest fp32);
- `only_fp32_gain_db`: how much the model output's SQNR rises when only this layer goes back to fp32.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass
class LayerSensitivity:
    name: str  # the ONNX node name
    op: str  # conv2d | dense | avg_pool | matmul
    dtype: str  # the int8 storage of its input: int8 | uint8
    input_sqnr_db: float
    only_int8_sqnr_db: float
    only_fp32_gain_db: float

    def to_json(self) -> dict:
        return {k: _finite_or_none(v) for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass
class SensitivityReport:
    model: str  # the model's source (a path or "<bytes>")
    calib_mode: str
    bias_correction: str | None
    batches: int  # the batches the figures were measured on
    all_int8_sqnr_db: float  # the whole int8 model's output SQNR
    all_int8_cosine: float
    layers: list[LayerSensitivity]  # in graph order

    def to_json(self) -> dict:
        data = {k: _finite_or_none(v) for k, v in dataclasses.asdict(self).items() if k != "layers"}
        data["layers"] = [layer.to_json() for layer in self.layers]
        return data

    def worst_first(self) -> list[LayerSensitivity]:
        """The layers by how much the model gains when that one alone runs fp32, largest first."""
        def gain(layer):  # NaN or unknown last
            value = layer.only_fp32_gain_db
            return -math.inf if value is None or math.isnan(value) else value

        return sorted(self.layers, key=lambda layer: -gain(layer))


def _finite_or_none(value):
    """JSON has no Inf or NaN: a float that is not finite (an exact layer's SQNR) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclasses.dataclass
class LayerEffect:
    """What one layer does to the model on the evaluation batches, from the simulator."""

    op: object  # the QuantizableOp
    only_fp32_metric: float  # the proxy metric with this layer alone in fp32
    only_fp32_sqnr_db: float
    only_int8_sqnr_db: float | None = None  # measured for `quantvm analyze` only


def simulated_outputs(simulator, batches, int8_ops=None) -> list:
    """The model's outputs on every batch with `int8_ops` (None: all) in int8."""
    mask = simulator.mask(int8_ops)
    return [simulator.run(batch, mask).outputs for batch in batches]


def layer_effects(simulator, batches, proxy, only_int8: bool = False) -> list[LayerEffect]:
    """Per planned op, in graph order: the model with that op alone in fp32 (and, with `only_int8`, alone in
    int8), scored by `proxy` (a fallback.ProxyMetric over fp32 outputs of the same batches)."""
    effects = []
    everything = set(simulator.ops)
    for op in simulator.ops:
        outputs = simulated_outputs(simulator, batches, everything - {op})
        effect = LayerEffect(op, proxy(outputs), proxy.sqnr(outputs))
        if only_int8:
            effect.only_int8_sqnr_db = proxy.sqnr(simulated_outputs(simulator, batches, {op}))
        effects.append(effect)
    return effects


def analyze(model, calib, eval_data=None, input_shapes: dict | None = None, constant_inputs: dict | None = None,
            num_threads: int | None = None, quantization=None, **int8_options) -> SensitivityReport:
    """Calibrate `model` as compile() would (same options) and measure every int8 layer's sensitivity on
    `eval_data` (default: the calibration batches). Builds only for this host; exports nothing."""
    from compiler.build import HostBuilder, compile_phase
    from compiler.calib_data import Replay
    from compiler.fallback import ProxyMetric, sample_cosines
    from compiler.frontend import import_onnx
    from compiler.int8_options import QuantizationOptions
    from compiler.quantization import quantize
    from quantvm.errors import QuantvmError
    from relay_passes import prepare_graph, select_rules

    options = QuantizationOptions.from_keywords(quantization, **int8_options)
    if calib is None or options.calib_mode == "none":
        raise QuantvmError("analyze needs calibration data (calib) and a calib_mode other than 'none'")
    imported = import_onnx(model, input_shapes, constant_inputs)
    host = HostBuilder(imported, select_rules(True), num_threads)
    with compile_phase(imported.source, "int8 calibration and the sensitivity analysis", imported):
        graph = prepare_graph(imported.mod)
        quant = quantize(graph, imported.onnx_model, imported.inputs, calib, options, host.runner,
                         bounded_pairs=options.bounds_pairs(host.spec))
        if not quant.planned:
            raise QuantvmError(f"{imported.source}: no layer is quantized: nothing to analyze")
        batches = list(Replay(eval_data, imported.inputs, None, "eval_data") if eval_data is not None
                       else quant.batches)
        simulator = quant.simulator(host.runner)
        proxy = ProxyMetric(simulated_outputs(simulator, batches, set()))
        whole = simulated_outputs(simulator, batches)
        effects = layer_effects(simulator, batches, proxy, only_int8=True)
    input_sqnr = {row["name"]: row["sqnr_db"] for row in quant.rows}
    whole_sqnr = proxy.sqnr(whole)
    layers = [LayerSensitivity(e.op.name, e.op.kind, e.op.plan["dtype"], input_sqnr.get(e.op.name, math.nan),
                               e.only_int8_sqnr_db, _gain(e.only_fp32_sqnr_db, whole_sqnr)) for e in effects]
    cosine = float(np.mean(np.concatenate([sample_cosines(a, b) for a, b in zip(proxy.reference, whole)])))
    return SensitivityReport(imported.source, options.calib_mode, options.bias_correction, len(batches),
                             whole_sqnr, cosine, layers)


def _gain(after: float, before: float) -> float:
    """dB gained going from `before` to `after`; an exact model after the change gains without bound."""
    if math.isinf(after):
        return math.inf
    return after - before
