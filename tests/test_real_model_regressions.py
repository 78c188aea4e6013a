"""Node patterns of real models that once looked wrong, rebuilt small with onnx.helper, against onnxruntime.

PaddleOCR's DB text detector (ch_PP-OCRv4_det) ends in HardSigmoid squeeze-excite, nearest Resize
(asymmetric, floor, from scales), Concat, Conv+BatchNormalization, ConvTranspose + bias Add + a standalone
BatchNormalization, and Sigmoid. On random input its logits are all near -12 and the output all ~1e-6;
max|a-b|/max|b| against onnxruntime was then 2.5e-2 and more. Every tensor up to the Sigmoid matched to
~1e-6: the gap is onnxruntime's Sigmoid (MLAS' approximation), whose absolute error of ~5e-8 is large
relative to outputs of ~1e-6 (it returns 0 below about -17). quantvm's Sigmoid matches a float64 Sigmoid of
onnxruntime's own logits there, which is what the saturated test checks.
"""

import numpy as np

import compiler
from tests.fixtures import GraphBuilder, onnxruntime_outputs

SHAPE = (1, 4, 8, 8)


def _db_head(rng, logit_shift: float):
    """The detector's tail, with outputs (logits, sigmoid); `logit_shift` is added to the logits."""
    g = GraphBuilder(rng)
    deep = g.conv("x", "deep", 4, 8, stride=2)  # 4x4: the coarser level of the pyramid
    gate = g.op("HardSigmoid", [g.conv(g.op("GlobalAveragePool", [deep], "pool"), "se", 8, 8, k=1, bias=True)],
                "gate", alpha=0.2, beta=0.5)
    deep = g.op("Mul", [deep, gate], "excite")
    roi, scales = g.const("roi", np.zeros(0, np.float32)), g.const("scales", np.array([1, 1, 2, 2], np.float32))
    up = g.op("Resize", [deep, roi, scales], "up", mode="nearest",
              coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    fused = g.op("Add", [up, g.conv("x", "lateral", 4, 8)], "merge")
    y = g.op("Relu", [g.bn(g.conv(g.op("Concat", [fused, up], "cat", axis=1), "neck", 16, 8), "neck.bn", 8)],
             "neck.relu")
    w1 = g.const("deconv1.w", rng.normal(0, 0.3, (8, 4, 2, 2)).astype(np.float32))
    y = g.op("ConvTranspose", [y, w1], "deconv1", kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0])
    y = g.op("Add", [y, g.const("deconv1.b", rng.normal(0, 0.1, (1, 4, 1, 1)).astype(np.float32))], "deconv1.bias")
    y = g.op("Relu", [g.bn(y, "head.bn", 4)], "head.relu")
    w2 = g.const("deconv2.w", rng.normal(0, 0.3, (4, 1, 2, 2)).astype(np.float32))
    y = g.op("ConvTranspose", [y, w2], "deconv2", kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0])
    logits = g.op("Add", [y, g.const("shift", np.full((1, 1, 1, 1), logit_shift, np.float32))], "logits")
    return g.model("db_head", {"x": SHAPE}, [logits, g.op("Sigmoid", [logits], "prob")], opset=12)


def _relative_error(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _compile_and_run(rng, logit_shift: float):
    model = _db_head(rng, logit_shift)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    got = compiler.compile(model, target="native")(x)
    return got, onnxruntime_outputs(model, {"x": x})


def test_detector_head_matches_onnxruntime(rng):
    """Resize (nearest, asymmetric, floor, scales), HardSigmoid(0.2, 0.5), ConvTranspose and a standalone
    BatchNormalization, with logits around 0 where both Sigmoids are exact."""
    (logits, prob), (want_logits, want_prob) = _compile_and_run(rng, 0.0)
    assert np.abs(want_logits).max() < 9  # not the saturated regime
    assert _relative_error(logits, want_logits) <= 1e-4
    assert _relative_error(prob, want_prob) <= 1e-4


def test_saturated_sigmoid_matches_an_exact_sigmoid_of_onnxruntime_logits(rng):
    """Logits near -13, as the detector gives on random input: compare with a float64 Sigmoid of onnxruntime's
    logits, since onnxruntime's own Sigmoid is off by a few percent of these ~1e-6 outputs."""
    (logits, prob), (want_logits, _) = _compile_and_run(rng, -13.0)
    assert want_logits.max() < -9  # the saturated regime this test is about
    assert _relative_error(logits, want_logits) <= 1e-4
    exact = 1 / (1 + np.exp(-want_logits.astype(np.float64)))
    assert _relative_error(prob, exact) <= 1e-4


def test_detector_head_unfused_matches_fused(rng):
    """The fusion and canonicalisation rules change nothing numerically on this pattern."""
    model = _db_head(rng, 0.0)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    fused = compiler.compile(model, target="native")(x)
    plain = compiler.compile(model, target="native", fuse=False)(x)
    for a, b in zip(fused, plain):
        assert _relative_error(a, b) <= 1e-5
