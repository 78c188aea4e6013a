"""Accuracy-aware fallback: revert the most sensitive int8 layers to fp32 until the metric's drop is within
`max_drop`.

The metric is the user's `(CompiledModel) -> float` (higher is better), or without one a built-in proxy on
the evaluation batches: top-1 agreement with fp32 for classifier-like outputs (one (N, classes) output),
else the mean cosine of each sample's outputs to fp32's. Layers are ranked once by the simulator: the
proxy's gain when that layer alone runs fp32 (ties broken by the output SQNR gain). The worst layer is
reverted, the metric measured again, and so on; the best model seen is the one kept.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings

import numpy as np

from quantvm.errors import QuantvmError


@dataclasses.dataclass
class FallbackStep:
    layer: str | None  # the layer reverted at this step (None: the all-int8 start)
    metric: float
    drop: float


@dataclasses.dataclass
class FallbackResult:
    metric: str  # "top-1 agreement", "cosine" or the user's callable's name
    max_drop: float
    fp32_metric: float
    steps: list[FallbackStep]
    reached: bool

    @property
    def best(self) -> FallbackStep:
        """The step with the smallest drop; the earliest among equals (fewest layers in fp32)."""
        return min(self.steps, key=lambda s: s.drop)

    @property
    def reverted(self) -> list[str]:
        best = self.steps.index(self.best)
        return [s.layer for s in self.steps[1:best + 1]]

    def to_json(self) -> dict:
        return {"metric": self.metric, "max_drop": self.max_drop, "fp32_metric": self.fp32_metric,
                "reached": self.reached, "reverted": self.reverted,
                "steps": [dataclasses.asdict(s) for s in self.steps]}


def is_classifier(outputs: list[np.ndarray]) -> bool:
    return len(outputs) == 1 and outputs[0].ndim == 2 and outputs[0].shape[1] > 1


class ProxyMetric:
    """The built-in metric: agreement or cosine of a model's outputs with fp32's, over the eval batches."""

    def __init__(self, fp32_outputs: list[list[np.ndarray]]):
        self.reference = fp32_outputs
        self.classifier = all(is_classifier(o) for o in fp32_outputs)
        self.name = "top-1 agreement" if self.classifier else "cosine"

    def __call__(self, outputs: list[list[np.ndarray]]) -> float:
        if self.classifier:
            same = [np.argmax(a[0], 1) == np.argmax(b[0], 1) for a, b in zip(self.reference, outputs)]
            return float(np.mean(np.concatenate(same)))
        return float(np.mean(np.concatenate([sample_cosines(a, b) for a, b in zip(self.reference, outputs)])))

    def sqnr(self, outputs) -> float:
        """A finer figure for ranking layers whose agreement ties: the output SQNR in dB."""
        signal = noise = 0.0
        for a, b in zip(self.reference, outputs):
            for x, y in zip(a, b):
                signal += float(np.sum(x.astype(np.float64) ** 2))
                noise += float(np.sum((x.astype(np.float64) - y) ** 2))
        return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def sample_cosines(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    """Each sample's cosine (axis 0), its outputs flattened and joined."""
    x = np.concatenate([o.reshape(len(o), -1) for o in a], 1).astype(np.float64)
    y = np.concatenate([o.reshape(len(o), -1) for o in b], 1).astype(np.float64)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return np.where(norms > 0, np.sum(x * y, 1) / np.where(norms > 0, norms, 1), 1.0)


def checked_metric(metric, model) -> float:
    """The user's metric on `model`, refused with an error naming it when it fails or is not a number."""
    name = getattr(metric, "__qualname__", type(metric).__name__)
    try:
        value = metric(model)
    except Exception as err:  # noqa: BLE001 (the user's code: any failure is theirs to see)
        raise QuantvmError(f"metric {name!r} raised {type(err).__name__}: {err}") from err
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise QuantvmError(f"metric {name!r} returned {value!r}; it must return a finite number (higher is better)")
    return float(value)


def search(ranked: list[str], evaluate, fp32_metric: float, max_drop: float, name: str) -> FallbackResult:
    """Revert `ranked` layers one at a time (worst first) until `evaluate(reverted) ` is within `max_drop` of
    `fp32_metric`; warn with the figures when even the best model found misses it."""
    reverted: list[str] = []
    value = evaluate(frozenset())
    steps = [FallbackStep(None, value, fp32_metric - value)]
    for layer in ranked:
        if steps[-1].drop <= max_drop:
            break
        reverted.append(layer)
        value = evaluate(frozenset(reverted))
        steps.append(FallbackStep(layer, value, fp32_metric - value))
    result = FallbackResult(name, max_drop, fp32_metric, steps, reached=False)
    result.reached = result.best.drop <= max_drop
    if not result.reached:
        warnings.warn(f"max_drop {max_drop:g} not reached: the best model found drops {name} by "
                      f"{result.best.drop:.4g} ({result.best.drop - max_drop:.4g} over) with "
                      f"{len(result.reverted)} layer(s) in fp32", stacklevel=4)
    return result


def accuracy_fallback(quantization, host, eval_data) -> FallbackResult:
    """Rank the planned layers with the simulator and revert them until `max_drop` holds (see the module)."""
    from compiler.calib_data import Replay
    from compiler.sensitivity import layer_effects, simulated_outputs

    options = quantization.options
    batches = list(Replay(eval_data, host.imported.inputs, None, "eval_data") if eval_data is not None else quantization.batches)
    simulator = quantization.simulator(host.runner)
    proxy = ProxyMetric(simulated_outputs(simulator, batches, set()))
    effects = layer_effects(simulator, batches, proxy)
    ranked = [e.op.name for e in sorted(effects, key=lambda e: (-e.only_fp32_metric, -e.only_fp32_sqnr_db))]
    if options.metric is None:
        by_name = {op.name: op for op in simulator.ops}

        def evaluate(reverted):
            return proxy(simulated_outputs(simulator, batches, {by_name[n] for n in by_name if n not in reverted}))

        return search(ranked, evaluate, 1.0, options.max_drop, proxy.name)

    def evaluate_built(reverted):
        return checked_metric(options.metric, host.model(quantization.graph(reverted)))

    fp32 = checked_metric(options.metric, host.model(quantization.prepared))
    name = getattr(options.metric, "__qualname__", type(options.metric).__name__)
    return search(ranked, evaluate_built, fp32, options.max_drop, name)
