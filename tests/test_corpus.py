"""The CI subset of the real-architecture corpus (tests/corpus_models.py): each model compiles for the host,
fp32 matches onnxruntime fp32 and int8 stays close to it. The full corpus is `examples/corpus.py`."""

from __future__ import annotations

import numpy as np
import pytest

import compiler
from compiler.quantization import output_error
from tests import corpus_models
from tests.fixtures import onnxruntime_outputs

FP32_MAX_RELATIVE_ERROR = 1e-4  # max |quantvm - onnxruntime| / max |onnxruntime|, per output
INT8_MIN_COSINE = 0.95
CALIB_BATCHES = 3


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12))


def cosine(got: np.ndarray, want: np.ndarray) -> float:
    return output_error(want, got)["cosine"]


@pytest.fixture(scope="module")
def built():
    """name -> (model, feeds, onnxruntime outputs), made once for the fp32 and int8 tests."""
    cache = {}

    def get(name):
        if name not in cache:
            rng = np.random.default_rng(20261130)
            model = corpus_models.MODELS[name](rng)
            feeds = corpus_models.random_feeds(model, rng)
            calib = [corpus_models.random_feeds(model, rng) for _ in range(CALIB_BATCHES)]
            cache[name] = (model, feeds, calib, onnxruntime_outputs(model, feeds))
        return cache[name]
    return get


@pytest.mark.parametrize("name", list(corpus_models.MODELS))
def test_fp32_matches_onnxruntime(name, built):
    model, feeds, _, want = built(name)
    got = compiler.compile(model, target="native").run(**feeds)
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, (k, g.shape, w.shape)
        assert relative_error(g, w) <= FP32_MAX_RELATIVE_ERROR, (k, relative_error(g, w))


@pytest.mark.parametrize("name", list(corpus_models.MODELS))
def test_int8_stays_close_to_onnxruntime_fp32(name, built):
    model, feeds, calib, want = built(name)
    int8 = compiler.compile(model, target="native", calib=calib, bias_correction=None)
    assert int8.metadata.quantization.mode == "int8"
    got = int8.run(**feeds)
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, (k, g.shape, w.shape)
        assert cosine(g, w) >= INT8_MIN_COSINE, (k, cosine(g, w))


def test_models_carry_the_patterns_they_stand_for():
    """The subset is only worth running if each model holds the ops its real counterpart breaks on."""
    expected = {
        "db_text_detector": {"ConvTranspose", "Resize", "BatchNormalization", "HardSigmoid", "GlobalAveragePool"},
        "yolov8_style": {"Split", "Concat", "Resize", "Sigmoid", "MaxPool"},
        "vad_streaming": {"Conv", "Gemm", "Split", "Sigmoid", "Tanh", "Gather"},
        "svtr_recognizer": {"Clip", "Div", "ReduceMean", "Pow", "Sqrt", "MatMul", "Softmax"},
        "transformer_encoder": {"Gather", "LayerNormalization", "Softmax", "Erf", "MatMul"},
        "recurrent_ops": {"LSTM", "GRU"},
    }
    assert set(expected) == set(corpus_models.MODELS)
    for name, ops in expected.items():
        model = corpus_models.MODELS[name](np.random.default_rng(0))
        assert ops <= {n.op_type for n in model.graph.node}, (name, ops - {n.op_type for n in model.graph.node})
    vad = corpus_models.MODELS["vad_streaming"](np.random.default_rng(0))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in vad.graph.input}
    assert shapes == {"audio": [1, 576], "state": [2, 1, 128]}
