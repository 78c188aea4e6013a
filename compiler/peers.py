"""The runtimes `quantvm bench` measures quantvm against, each as fp32 and int8 contenders.

- onnxruntime: fp32 as is; int8 as onnxruntime advises, static QDQ (u8 activations, s8 per-channel weights,
  MinMax on the calibration batches) for models with convolutions, dynamic (weights s8, activations quantized
  per call) for the others (transformers).
- OpenVINO: fp32 with f32 inference precision (on bf16 hosts — AMX, AVX512-BF16 — it would otherwise run bf16);
  int8 from NNCF's defaults (`nncf.quantize` on the same batches; ModelType.TRANSFORMER for models without
  convolutions).
Each runs with the bench's thread count. A peer that is not installed is left out (None).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

from targets.host import host_flags

PEERS = ("onnxruntime", "openvino")


@dataclass
class Contender:
    name: str
    run: object  # callable(feeds) -> outputs
    seconds: list = field(default_factory=list)
    model: object = None  # quantvm's contenders: the CompiledModel they run
    block: object = None  # callable(feeds, settle_seconds, block_seconds) -> seconds of each timed call: a
    # contender that times itself (another process); None: interleave times `run`

    def summary(self, batch: int) -> dict:
        times = np.array(self.seconds)
        median = float(np.median(times))
        return {"name": self.name, "median_ms": median * 1e3, "p90_ms": float(np.percentile(times, 90)) * 1e3,
                "throughput": batch / median}


def has_convolutions(proto) -> bool:
    """CNN or not: which int8 recipe the peers' own advice picks."""
    return any(node.op_type in ("Conv", "ConvTranspose") for node in proto.graph.node)


def peer_version(peer: str) -> str | None:
    try:
        module = __import__(peer)
    except ImportError:
        return None
    return getattr(module, "__version__", "?")


def onnxruntime_contender(model_bytes: bytes, threads: int, name: str = "onnxruntime fp32") -> Contender | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return Contender(name, lambda feeds: session.run(None, feeds))


def onnxruntime_int8_contender(model_path, proto, batches: list[dict], threads: int) -> Contender | None:
    """onnxruntime's int8: quant_pre_process (skipped where it fails), then quantize_static (QDQ) for CNNs or
    quantize_dynamic. On a CPU without VNNI with reduce_range (7-bit weights), as onnxruntime advises there:
    its u8 x s8 kernels run `vpmaddubsw`, which saturates on 8-bit weights (a conv's int8 output 11% off its
    fp32 one in tests/test_cli.py), at the same speed either way."""
    try:
        from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                              quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        return None

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)

    reduce_range = not {"avx512_vnni", "avx_vnni"} & host_flags()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its quantizer logs advice on the root logger
    try:
        with tempfile.TemporaryDirectory(prefix="quantvm-bench-") as work:
            prepared, quantized = os.path.join(work, "prepared.onnx"), os.path.join(work, "int8.onnx")
            source = _quantizable_copy(model_path, proto, batches[0], work)
            litter = [p for p in ORT_FAILED_INFERENCE_FILES if not os.path.exists(p)]
            try:
                quant_pre_process(source, prepared)
            except Exception:  # noqa: BLE001 - its symbolic shape inference fails on some models (an assert
                prepared = source  # on PP-OCR's classifier's Concat): the advised step, not a required one
                for path in litter:  # what it saved into the working directory on the way out
                    if os.path.exists(path):
                        os.remove(path)
            if has_convolutions(proto):
                quantize_static(prepared, quantized, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                                reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8)
            else:
                quantize_dynamic(prepared, quantized, weight_type=QuantType.QInt8, reduce_range=reduce_range)
            with open(quantized, "rb") as f:
                model_bytes = f.read()
    finally:
        root.setLevel(level)
    return onnxruntime_contender(model_bytes, threads, "onnxruntime int8")


# onnxruntime's symbolic shape inference saves its partial model into the working directory when it fails.
ORT_FAILED_INFERENCE_FILES = ("sym_shape_infer_temp.onnx", "sym_shape_infer_temp.onnx.data")

# Per-channel DequantizeLinear (its `axis`) came in opset 13: onnxruntime's quantizer writes it into an opset
# 11 or 12 model regardless, and the result fails to load ("Unrecognized attribute: axis").
PER_CHANNEL_OPSET = 13


def _quantizable_copy(model_path, proto, feeds: dict, work: str) -> str:
    """`model_path`, or a copy in `work` that onnxruntime's quantizer can take: input dims fixed to the shapes
    being timed (its symbolic shape inference stops at a dynamic dim: "Incomplete symbolic shape inference",
    PP-OCR's models), and an opset older than PER_CHANNEL_OPSET converted to it."""
    import onnx
    from onnx import version_converter

    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), PER_CHANNEL_OPSET)
    dynamic = {value.name for value in proto.graph.input if value.name in feeds
               and any(not dim.HasField("dim_value") for dim in value.type.tensor_type.shape.dim)}
    if opset >= PER_CHANNEL_OPSET and not dynamic:
        return str(model_path)
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for value in copy.graph.input:
        if value.name in dynamic:
            for dim, size in zip(value.type.tensor_type.shape.dim, np.shape(feeds[value.name])):
                dim.Clear()
                dim.dim_value = int(size)
    if opset < PER_CHANNEL_OPSET:
        copy = version_converter.convert_version(copy, PER_CHANNEL_OPSET)
    path = os.path.join(work, "quantizable.onnx")
    onnx.save(copy, path)
    return path


def _openvino_compiled(model, threads: int):
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    compiled = ov.Core().compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    return lambda feeds: request.infer(feeds)


def openvino_contenders(model_path, proto, batches: list[dict] | None, threads: int) -> list[Contender]:
    """OpenVINO fp32 and, given calibration `batches`, NNCF int8 with its defaults."""
    try:
        import openvino as ov
    except ImportError:
        return []
    model = ov.convert_model(str(model_path))
    contenders = []
    if batches is not None:
        try:
            import nncf
        except ImportError:
            nncf = None
        if nncf is not None:
            model_type = None if has_convolutions(proto) else nncf.ModelType.TRANSFORMER
            quantized = nncf.quantize(ov.convert_model(str(model_path)), nncf.Dataset(batches),
                                      model_type=model_type, subset_size=max(len(batches), 1))
            contenders.append(Contender("openvino int8", _openvino_compiled(quantized, threads)))
    contenders.append(Contender("openvino fp32", _openvino_compiled(model, threads)))
    return contenders
