"""Bias correction: the mean error int8 gives each conv/dense output, per channel, folded into its bias.

`fast` measures every layer on fp32 inputs in one pass (the int8 and fp32 values of each layer from the same
input). `full` measures each layer with the layers before it in int8 and already corrected, as NNCF's
BiasCorrection does: layer by layer in graph order, one pass over the data each (the simulator needs no
rebuild between them). Either way the cost is calibration time: the shift ends up in the s32 bias.
(Correcting every layer at once and repeating was tried: the corrections of downstream layers overshoot
while their upstream ones move, and on EfficientNet-Lite0 that diverged.)
"""

from __future__ import annotations

import numpy as np

from compiler.calib_data import Progress



def _means(simulator, batches, mask, shift, label) -> tuple[np.ndarray, np.ndarray]:
    """The channel means of every corrected op's fp32 and int8 values over `batches`, flat."""
    fp32, int8, count = 0.0, 0.0, 0
    progress = Progress(label, None)
    try:
        for batch in batches:
            run = simulator.run(batch, mask, shift)
            fp32 = fp32 + np.concatenate([m.ravel() for m in run.fp32_means]).astype(np.float64)
            int8 = int8 + np.concatenate([m.ravel() for m in run.int8_means]).astype(np.float64)
            count += 1
            progress.step()
    finally:
        progress.close()
    return fp32 / count, int8 / count


def correct_biases(simulator, batches, mode: str) -> tuple[np.ndarray, dict]:
    """The per-channel shifts (flat, in the simulator's order) and a summary for the report."""
    zero = np.zeros_like(simulator.shift)
    if not simulator.corrected:
        return zero, {"mode": mode, "layers": 0}
    n = simulator.offsets[-1]
    reference, int8 = _means(simulator, batches, simulator.mask(set()), zero, "bias correction")
    shift = np.zeros_like(zero, dtype=np.float64)
    shift[:n] = reference - int8
    summary = {"mode": mode, "layers": len(simulator.corrected), "max_shift": float(np.abs(shift).max())}
    if mode == "full":
        everything = simulator.mask()
        for k, op in enumerate(simulator.corrected):
            start, stop = simulator.offsets[k], simulator.offsets[k + 1]
            _, int8 = _means(simulator, batches, everything, shift.astype(np.float32),
                             f"bias correction {k + 1}/{len(simulator.corrected)}")
            shift[start:stop] += reference[start:stop] - int8[start:stop]
        summary["max_shift"] = float(np.abs(shift).max())
    return shift.astype(np.float32), summary
