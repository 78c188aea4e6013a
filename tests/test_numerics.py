"""Whole models compiled for this host agree with onnxruntime."""

import numpy as np
import pytest

import compiler
from tests.fixtures import MODELS, onnxruntime_outputs, random_inputs


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_matches_onnxruntime(name, rng):
    model = MODELS[name](rng)
    feeds = random_inputs(model, rng)
    compiled = compiler.compile(model, target="native")
    outputs = compiled.run(**feeds)
    expected = onnxruntime_outputs(model, feeds)
    assert [o.shape for o in outputs] == [e.shape for e in expected]
    for got, want in zip(outputs, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_positional_and_named_inputs_give_the_same_result(rng):
    model = MODELS["mlp"](rng)
    x = random_inputs(model, rng)["data"]
    compiled = compiler.compile(model, target="avx2")
    np.testing.assert_array_equal(compiled(x)[0], compiled.run(data=x)[0])


def test_dynamic_batch_fixed_by_input_shapes(rng, demo_model_path):
    from onnx.reference import ReferenceEvaluator

    images = rng.uniform(0, 1, (3, 1, 8, 8)).astype(np.float32)
    compiled = compiler.compile(demo_model_path, target="native", input_shapes={"image": images.shape})
    expected = ReferenceEvaluator(str(demo_model_path)).run(None, {"image": images})[0]
    np.testing.assert_allclose(compiled.run(image=images)[0], expected, rtol=1e-4, atol=1e-5)
    assert [s.to_json() for s in compiled.metadata.inputs] == [{"name": "image", "shape": [3, 1, 8, 8], "dtype": "float32"}]
    assert [s.to_json() for s in compiled.metadata.outputs] == [{"name": "logits", "shape": [3, 10], "dtype": "float32"}]


def test_compiled_model_describes_its_inputs_and_outputs_before_running(demo_model_path):
    compiled = compiler.compile(demo_model_path, target="cascadelake", input_shapes={"image": (2, 1, 8, 8)})
    assert [(s.name, s.shape, s.dtype) for s in compiled.inputs] == [("image", (2, 1, 8, 8), "float32")]
    assert [(s.name, s.shape, s.dtype) for s in compiled.outputs] == [("logits", (2, 10), "float32")]
