"""OpenVINO + NNCF int8, the peer examples/accuracy.py compares quantvm with. Runs in its own virtual environment
(openvino and nncf are not quantvm's dependencies):

    python -m venv /tmp/nncf-venv && /tmp/nncf-venv/bin/pip install openvino nncf onnx
    /tmp/nncf-venv/bin/python examples/nncf_peer.py model.onnx data.npz out.npz [--transformer]

data.npz holds one stacked array a model input and split: `calib__<input>` and `eval__<input>`, shape
(samples, *input shape). out.npz gets `out<k>`, output k of every eval sample stacked, and `versions`.
"""

from __future__ import annotations

import argparse
import sys

import nncf
import numpy as np
import openvino as ov


def samples(data, split: str) -> list[dict[str, np.ndarray]]:
    # each data[key] reads the whole array again: read each once (a view a sample keeps its whole array alive)
    arrays = {k.split("__", 1)[1]: data[k] for k in data.files if k.startswith(f"{split}__")}
    count = len(next(iter(arrays.values())))
    return [{n: a[i] for n, a in arrays.items()} for i in range(count)]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--transformer", action="store_true", help="nncf.ModelType.TRANSFORMER")
    args = parser.parse_args(argv)

    data = np.load(args.data)
    calib, evaluation = samples(data, "calib"), samples(data, "eval")
    model_type = nncf.ModelType.TRANSFORMER if args.transformer else None
    quantized = nncf.quantize(ov.convert_model(args.model), nncf.Dataset(calib), model_type=model_type)
    # f32 for what stays unquantized: on CPUs with bf16 (AMX, AVX512-BF16) OpenVINO would otherwise run it in bf16
    compiled = ov.Core().compile_model(quantized, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    outputs = [[] for _ in compiled.outputs]
    for sample in evaluation:
        result = request.infer(sample)
        for k, port in enumerate(compiled.outputs):
            outputs[k].append(np.array(result[port]))
    np.savez(args.out, versions=np.array(f"openvino {ov.__version__}, nncf {nncf.__version__}"),
             **{f"out{k}": np.stack(o) for k, o in enumerate(outputs)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
