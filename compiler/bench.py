"""`quantvm bench`: time quantvm builds against each other and onnxruntime, interleaved, in one process.

Speed is only judged here, as ratios measured in one run on the same inputs and thread count: the machines
are noisy, so the contenders take turns round by round instead of running one after another.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Contender:
    name: str
    run: object  # callable(feeds) -> outputs
    seconds: list = field(default_factory=list)

    def summary(self, batch: int) -> dict:
        times = np.array(self.seconds)
        median = float(np.median(times))
        return {"name": self.name, "median_ms": median * 1e3, "p90_ms": float(np.percentile(times, 90)) * 1e3,
                "throughput": batch / median}


def onnxruntime_contender(model_bytes: bytes, threads: int) -> Contender | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return Contender("onnxruntime fp32", lambda feeds: session.run(None, feeds))


def interleave(contenders: list[Contender], feeds: dict, rounds: int, warmup: int = 1) -> None:
    for _ in range(warmup):
        for c in contenders:
            c.run(feeds)
    for _ in range(rounds):
        for c in contenders:
            start = time.perf_counter()
            c.run(feeds)
            c.seconds.append(time.perf_counter() - start)


def onnxruntime_int8_contender(model_path, batches: list[dict], threads: int) -> Contender | None:
    """onnxruntime's own INT8: quant_pre_process, then quantize_static to QDQ, u8 activations, s8 per-channel
    weights, calibrated (MinMax) on the same batches quantvm calibrates on."""
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        return None

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its quantizer logs advice on the root logger
    try:
        with tempfile.TemporaryDirectory(prefix="quantvm-bench-") as work:
            prepared, quantized = os.path.join(work, "prepared.onnx"), os.path.join(work, "int8.onnx")
            quant_pre_process(str(model_path), prepared)
            quantize_static(prepared, quantized, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            with open(quantized, "rb") as f:
                model_bytes = f.read()
    finally:
        root.setLevel(level)
    contender = onnxruntime_contender(model_bytes, threads)
    contender.name = "onnxruntime int8"
    return contender


def bench(model_path, target: str = "native", input_shapes: dict | None = None, rounds: int = 10,
          compare_unfused: bool = False, calib: dict | None = None, calib_mode: str = "entropy",
          num_calib_batches: int | None = None) -> dict:
    """Compile `model_path` (fp32, and int8 when `calib` is given, and unfused on request), time the builds
    and onnxruntime's on the same random inputs, interleaved; the first row is the baseline of the ratios."""
    from compiler.build import compile
    from compiler.calib_data import model_batches
    from compiler.frontend import read_onnx

    threads = int(os.environ.get("TVM_NUM_THREADS", "1"))
    fused = compile(model_path, target=target, input_shapes=input_shapes)
    rng = np.random.default_rng(0)
    feeds = {s["name"]: rng.standard_normal(s["shape"]).astype(s["dtype"]) for s in fused.metadata["inputs"]}
    contenders = [Contender("quantvm fp32", lambda f: fused.run(**f))]
    proto, _, _ = read_onnx(model_path)
    if calib is not None:
        int8 = compile(model_path, target=target, input_shapes=input_shapes, calib=[calib], calib_mode=calib_mode,
                       num_calib_batches=num_calib_batches)
        contenders.insert(0, Contender("quantvm int8", lambda f: int8.run(**f)))
        batches = list(model_batches([calib], fused.inputs, num_calib_batches))
        reference_int8 = onnxruntime_int8_contender(model_path, batches, threads)
        if reference_int8 is not None:
            contenders.append(reference_int8)
    if compare_unfused:
        unfused = compile(model_path, target=target, input_shapes=input_shapes, fuse=False)
        contenders.append(Contender("quantvm fp32 --no-fuse", lambda f: unfused.run(**f)))
    reference = onnxruntime_contender(proto.SerializeToString(), threads)
    if reference is not None:
        contenders.append(reference)
    interleave(contenders, feeds, rounds)
    batch = fused.metadata["inputs"][0]["shape"][0] if fused.metadata["inputs"][0]["shape"] else 1
    rows = [c.summary(batch) for c in contenders]
    for row in rows:
        row["speedup_of_first_row"] = row["median_ms"] / rows[0]["median_ms"]
    return {"model": str(model_path), "target": fused.target, "threads": threads, "rounds": rounds,
            "batch": batch, "rows": rows, "fusion": fused.report["fusion"], "kernels": fused.report["kernels"]}


def format_table(result: dict) -> str:
    first = result["rows"][0]["name"]
    lines = [f"{result['model']} on {result['target']}, batch {result['batch']}, {result['threads']} thread(s), "
             f"{result['rounds']} interleaved rounds; fp32 build: {result['kernels']} kernels",
             f"{'':24}{'median ms':>11}{'p90 ms':>10}{'items/s':>10}   {first} is x faster"]
    for row in result["rows"]:
        lines.append(f"{row['name']:24}{row['median_ms']:11.2f}{row['p90_ms']:10.2f}{row['throughput']:10.1f}"
                     f"{row['speedup_of_first_row']:10.2f}")
    return "\n".join(lines)
