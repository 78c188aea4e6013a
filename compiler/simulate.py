"""The quantization simulator: one host build that runs the model with any set of layers in int8.

Built from relay_passes.quantize.simulate_graph, with the int8 ops' real kernels (the same rounding,
saturation and s32 bias as the deployed build), each op switched between its fp32 and int8 value at run
time. Bias correction, the accuracy-aware fallback and `quantvm analyze` ask it their questions instead of
rebuilding the model once per layer.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from relay_passes.quantize import QuantizableOp, output_channels, simulate_graph


@dataclasses.dataclass
class SimulatedRun:
    outputs: list  # the model's outputs, as numpy arrays
    fp32_means: list  # per corrected op: the channel means of its fp32 value
    int8_means: list  # per corrected op: the channel means of its int8 value (with the shift)


class Simulator:
    """Runs the simulation graph of `ops` (those with a plan) on host batches."""

    def __init__(self, prepared, ops: list[QuantizableOp], build_for_host):
        self.ops = [op for op in ops if op.plan]
        graph, self.corrected = simulate_graph(prepared, self.ops)
        self.runner = build_for_host(graph)
        sizes = [output_channels(op) for op in self.corrected]
        self.offsets = np.cumsum([0] + sizes).tolist()
        self.shift = np.zeros(max(self.offsets[-1], 1), np.float32)

    def mask(self, int8: set[QuantizableOp] | None = None) -> np.ndarray:
        """The switch vector with `int8` (None: every op) in int8 and the rest in fp32."""
        return np.array([1.0 if int8 is None or op in int8 else 0.0 for op in self.ops], np.float32)

    def run(self, batch: dict, mask: np.ndarray, shift: np.ndarray | None = None) -> SimulatedRun:
        values = self.runner(batch, extra=[mask, self.shift if shift is None else shift])
        n = len(self.corrected)
        return SimulatedRun(values[2 * n:], values[:n], values[n:2 * n])

    def shifts_by_op(self, shift: np.ndarray) -> dict[QuantizableOp, np.ndarray]:
        """The flat shift vector cut into one vector per corrected op."""
        return {op: shift[self.offsets[i]:self.offsets[i + 1]] for i, op in enumerate(self.corrected)}
