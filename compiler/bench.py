"""`quantvm bench`: time quantvm builds against each other and onnxruntime, interleaved, in one process.

Speed is only judged here, as ratios measured in one run on the same inputs and thread count: the machines
are noisy, so the contenders take turns round by round instead of running one after another.
"""

from __future__ import annotations

import os
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


def bench(model_path, target: str = "native", input_shapes: dict | None = None, rounds: int = 10,
          compare_unfused: bool = False) -> dict:
    """Compile `model_path` fused (and unfused), time them and onnxruntime on random inputs, return the table."""
    from compiler.build import compile
    from compiler.frontend import read_onnx

    threads = int(os.environ.get("TVM_NUM_THREADS", "1"))
    fused = compile(model_path, target=target, input_shapes=input_shapes)
    rng = np.random.default_rng(0)
    feeds = {s["name"]: rng.standard_normal(s["shape"]).astype(s["dtype"]) for s in fused.metadata["inputs"]}
    contenders = [Contender("quantvm fused", lambda f: fused.run(**f))]
    if compare_unfused:
        unfused = compile(model_path, target=target, input_shapes=input_shapes, fuse=False)
        contenders.append(Contender("quantvm --no-fuse", lambda f: unfused.run(**f)))
    proto, _, _ = read_onnx(model_path)
    reference = onnxruntime_contender(proto.SerializeToString(), threads)
    if reference is not None:
        contenders.append(reference)
    interleave(contenders, feeds, rounds)
    batch = fused.metadata["inputs"][0]["shape"][0] if fused.metadata["inputs"][0]["shape"] else 1
    rows = [c.summary(batch) for c in contenders]
    base = rows[0]["median_ms"]
    for row in rows:
        row["fused_speedup_over_this"] = row["median_ms"] / base
    return {"model": str(model_path), "target": fused.target, "threads": threads, "rounds": rounds,
            "batch": batch, "rows": rows, "fusion": fused.report["fusion"], "kernels": fused.report["kernels"]}


def format_table(result: dict) -> str:
    lines = [f"{result['model']} on {result['target']}, batch {result['batch']}, {result['threads']} thread(s), "
             f"{result['rounds']} interleaved rounds; fused build: {result['kernels']} kernels",
             f"{'':22}{'median ms':>11}{'p90 ms':>10}{'items/s':>10}{'fused is x faster':>19}"]
    for row in result["rows"]:
        lines.append(f"{row['name']:22}{row['median_ms']:11.2f}{row['p90_ms']:10.2f}{row['throughput']:10.1f}"
                     f"{row['fused_speedup_over_this']:19.2f}")
    return "\n".join(lines)
