"""relay_passes.canonicalize: decomposed activations and layer norms become one canonical form each, only
when every constant says so, and the compiled numbers still match onnxruntime."""

import math
from collections import Counter

import numpy as np
import onnx
import pytest

import compiler
from compiler.frontend import import_onnx
from relay_passes import prepare_graph
from tests.fixtures import GraphBuilder, onnxruntime_outputs, random_inputs
from tests.test_passes import _ops

OPSET = 18  # Mish is an ONNX op from opset 18
HARDSWISH = ["relax.multiply", "relax.add", "relax.clip", "relax.multiply"]  # x * clip(x / 6 + 0.5, 0, 1)
HARDSIGMOID = ["relax.multiply", "relax.add", "relax.clip"]
MISH = ["relax.nn.softplus", "relax.tanh", "relax.multiply"]
SILU = ["relax.nn.silu"]
LAYER_NORM = ["relax.nn.layer_norm"]


def _c(g, name, value):
    return g.const(name, np.asarray(value, np.float32))


def _relu6_of_x_plus_3(g, x, n, high=6.0):
    shifted = g.op("Add", [x, _c(g, f"{n}.three", 3.0)], f"{n}.shift")
    return g.op("Clip", [shifted, _c(g, f"{n}.lo", 0.0), _c(g, f"{n}.hi", high)], f"{n}.relu6")


def _hardswish_divided_outside(g, x, n, high=6.0, gated=None):  # Paddle: (x * relu6(x + 3)) / 6
    product = g.op("Mul", [x, _relu6_of_x_plus_3(g, gated or x, n, high)], f"{n}.product")
    return g.op("Div", [product, _c(g, f"{n}.six", 6.0)], n)


def _hardswish_times_a_sixth(g, x, n):
    product = g.op("Mul", [_relu6_of_x_plus_3(g, x, n), x], f"{n}.product")
    return g.op("Mul", [_c(g, f"{n}.sixth", 1 / 6), product], n)


def _hardswish_two_clips(g, x, n):  # ReLU6 as Clip(min=0) then Clip(max=6), the gate divided inside
    shifted = g.op("Add", [_c(g, f"{n}.three", 3.0), x], f"{n}.shift")
    relu = g.op("Clip", [shifted, _c(g, f"{n}.zero", 0.0)], f"{n}.max")
    relu6 = g.op("Clip", [relu, "", _c(g, f"{n}.six", 6.0)], f"{n}.min")
    return g.op("Mul", [x, g.op("Div", [relu6, _c(g, f"{n}.div", 6.0)], f"{n}.gate")], n)


def _hardsigmoid_divided(g, x, n, high=1.0):  # clip(x / 6 + 0.5, 0, high)
    shifted = g.op("Add", [g.op("Div", [x, _c(g, f"{n}.six", 6.0)], f"{n}.div"), _c(g, f"{n}.half", 0.5)], f"{n}.shift")
    return g.op("Clip", [shifted, _c(g, f"{n}.lo", 0.0), _c(g, f"{n}.hi", high)], n)


def _swish(g, x, n, beta=None):  # x * sigmoid(x), or x * sigmoid(x * beta) as Paddle writes swish
    inner = x if beta is None else g.op("Mul", [x, _c(g, f"{n}.beta", beta)], f"{n}.scaled")
    return g.op("Mul", [x, g.op("Sigmoid", [inner], f"{n}.sigmoid")], n)


def _mish_log_exp(g, x, n, one=1.0):
    softplus = g.op("Log", [g.op("Add", [_c(g, f"{n}.one", one), g.op("Exp", [x], f"{n}.exp")], f"{n}.add")], f"{n}.log")
    return g.op("Mul", [g.op("Tanh", [softplus], f"{n}.tanh"), x], n)


# spelling -> (how an exporter writes it on input x, the ops prepare_graph must leave)
SPELLINGS = {
    "hardswish_onnx_op": (lambda g, x, n: g.op("HardSwish", [x], n), HARDSWISH),
    "hardswish_divided_outside": (_hardswish_divided_outside, HARDSWISH),
    "hardswish_times_a_sixth": (_hardswish_times_a_sixth, HARDSWISH),
    "hardswish_two_clips": (_hardswish_two_clips, HARDSWISH),
    "hardswish_torch": (lambda g, x, n: g.op("Mul", [x, g.op("HardSigmoid", [x], f"{n}.hs", alpha=1 / 6)], n), HARDSWISH),
    "hardsigmoid_onnx_op": (lambda g, x, n: g.op("HardSigmoid", [x], n, alpha=0.2, beta=0.4), HARDSIGMOID),
    "hardsigmoid_relu6": (lambda g, x, n: g.op("Div", [_relu6_of_x_plus_3(g, x, n), _c(g, f"{n}.six", 6.0)], n),
                          HARDSIGMOID),
    "hardsigmoid_divided": (_hardsigmoid_divided, HARDSIGMOID),
    "silu": (_swish, SILU),
    "silu_paddle": (lambda g, x, n: _swish(g, x, n, beta=1.0), SILU),
    "mish_onnx_op": (lambda g, x, n: g.op("Mish", [x], n), MISH),
    "mish_log_exp": (_mish_log_exp, MISH),
    "mish_softplus_op": (lambda g, x, n: g.op("Mul", [x, g.op("Tanh", [g.op("Softplus", [x], f"{n}.sp")], f"{n}.t")], n),
                         MISH),
}

# near misses: one constant (or operand) differs from the op's, so the primitives must stay
NEAR_MISSES = {
    "hardswish_clip_to_5": (lambda g, x, n: _hardswish_divided_outside(g, x, n, high=5.0), "relax.divide"),
    "hardswish_gate_of_another_tensor": (
        lambda g, x, n: _hardswish_divided_outside(g, x, n, gated=g.op("Neg", [x], f"{n}.neg")), "relax.divide"),
    "hardsigmoid_clip_to_2": (lambda g, x, n: _hardsigmoid_divided(g, x, n, high=2.0), "relax.divide"),
    "swish_beta_2": (lambda g, x, n: _swish(g, x, n, beta=2.0), "relax.sigmoid"),
    "mish_log_of_2_plus_exp": (lambda g, x, n: _mish_log_exp(g, x, n, one=2.0), "relax.log"),
}


def _activation_model(rng, spellings: dict) -> onnx.ModelProto:
    g = GraphBuilder(rng)
    outputs = [build(g, "data", name) for name, (build, _) in spellings.items()]
    return g.model("activations", {"data": (2, 8, 5, 5)}, outputs, opset=OPSET)


def _prepared_ops(model) -> list[str]:
    return _ops(prepare_graph(import_onnx(model).mod))


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_each_spelling_becomes_its_canonical_form(spelling, rng):
    model = _activation_model(rng, {spelling: SPELLINGS[spelling]})
    before, after = _ops(import_onnx(model).mod), _prepared_ops(model)
    assert after == SPELLINGS[spelling][1] and len(after) <= len(before), (before, after)
    assert "relax.divide" not in after and "relax.sigmoid" not in after and "relax.log" not in after


@pytest.mark.parametrize("spelling", sorted(NEAR_MISSES))
def test_a_near_miss_keeps_its_primitives(spelling, rng):
    kept = NEAR_MISSES[spelling][1]
    after = _prepared_ops(_activation_model(rng, {spelling: NEAR_MISSES[spelling]}))
    assert kept in after and not {"relax.nn.silu", "relax.nn.softplus"} & set(after), after


def _check_against_onnxruntime(model, feeds):
    got = compiler.compile(model, target="native").run(**feeds)
    want = onnxruntime_outputs(model, feeds)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_every_spelling_and_near_miss_matches_onnxruntime_when_compiled(rng):
    model = _activation_model(rng, {**SPELLINGS, **NEAR_MISSES})
    feeds = {"data": (rng.standard_normal((2, 8, 5, 5)) * 4).astype(np.float32)}  # reaches both clip bounds
    _check_against_onnxruntime(model, feeds)


def _layer_norm(g, x, n, axes=(-1,), eps=1e-5, square="Pow", one_sub=True, gamma=None, beta=None, power=2.0):
    """ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div [Mul gamma] [Add beta], as exporters before opset 17 write it."""
    axes_const = g.const(f"{n}.axes", np.array(axes, np.int64))
    mean = g.op("ReduceMean", [x, axes_const], f"{n}.mean")
    centered = g.op("Sub", [x, mean], f"{n}.sub")
    if square == "Pow":
        squared = g.op("Pow", [centered, _c(g, f"{n}.two", power)], f"{n}.pow")
    else:
        squared = g.op("Mul", [centered, centered], f"{n}.square")
    variance = g.op("ReduceMean", [squared, axes_const], f"{n}.var")
    std = g.op("Sqrt", [g.op("Add", [variance, _c(g, f"{n}.eps", eps)], f"{n}.add_eps")], f"{n}.std")
    numerator = centered if one_sub else g.op("Sub", [x, mean], f"{n}.sub_again")
    y = g.op("Div", [numerator, std], f"{n}.div")
    if gamma is not None:
        y = g.op("Mul", [g.const(f"{n}.gamma", gamma), y], f"{n}.scale")
    if beta is not None:
        y = g.op("Add", [y, g.const(f"{n}.beta", beta)], f"{n}.shift")
    return g.op("Identity", [y], n)


def _norm_spellings(rng):
    gamma, beta = rng.uniform(0.5, 1.5, 16).astype(np.float32), rng.normal(0, 0.5, 16).astype(np.float32)
    return {  # name -> (layer norm options, ops prepare_graph must leave)
        "paddle": (dict(gamma=gamma, beta=beta), LAYER_NORM),
        "mul_square_two_subs": (dict(square="Mul", one_sub=False, gamma=gamma, beta=beta, eps=1e-6), LAYER_NORM),
        "no_gamma_no_beta": (dict(), LAYER_NORM),
        "gamma_only_as_row": (dict(gamma=gamma.reshape(1, 1, 16)), LAYER_NORM),
        "two_trailing_axes": (dict(axes=(-2, -1), gamma=rng.uniform(0.5, 1.5, (6, 16)).astype(np.float32)), LAYER_NORM),
        # near misses
        "cubed": (dict(power=3.0), ["relax.power"]),
        "middle_axis": (dict(axes=(1,)), ["relax.mean", "relax.sqrt"]),
        "gamma_per_row": (dict(gamma=rng.uniform(0.5, 1.5, (6, 1)).astype(np.float32)),
                          ["relax.nn.layer_norm", "relax.multiply"]),  # normalised, but the scale stays outside
    }


def _norm_model(rng, spellings):
    g = GraphBuilder(rng)
    outputs = [_layer_norm(g, "data", name, **options) for name, (options, _) in spellings.items()]
    return g.model("layer_norms", {"data": (2, 6, 16)}, outputs, opset=OPSET)


def test_layer_norm_spellings_become_one_op_with_their_epsilon(rng):
    for name, (options, expected) in _norm_spellings(rng).items():
        model = _norm_model(rng, {name: (options, expected)})
        before, after = Counter(_ops(import_onnx(model).mod)), _prepared_ops(model)
        if expected == LAYER_NORM:
            assert after == LAYER_NORM, (name, after)
            assert before["relax.mean"] == 2 and sum(before.values()) >= 6
        else:
            assert set(expected) <= set(after), (name, after)
    mod = prepare_graph(import_onnx(_norm_model(rng, {"eps": (dict(eps=1e-6, axes=(2,)), LAYER_NORM)})).mod)
    (norm,) = _calls(mod, "relax.nn.layer_norm")
    assert math.isclose(norm.attrs.epsilon, 1e-6, rel_tol=1e-6) and list(norm.attrs.axes) == [2]


def _calls(mod, op_name):
    from tvm import relax

    found = []
    relax.analysis.post_order_visit(mod["main"].body, lambda e: found.append(e) if isinstance(e, relax.Call)
                                    and getattr(e.op, "name", None) == op_name else None)
    return found


def test_layer_norms_match_onnxruntime_when_compiled(rng):
    model = _norm_model(rng, _norm_spellings(rng))
    # an offset and a spread like a transformer's residual stream: a one-pass variance would lose digits
    feeds = {"data": (rng.standard_normal((2, 6, 16)) * 3 + 20).astype(np.float32)}
    _check_against_onnxruntime(model, feeds)


def _small_cnn_with_decomposed_ops(rng):
    """conv + Paddle HardSwish, conv + x*sigmoid(x), pooled, FC + decomposed LayerNorm, FC + Mish: the
    shapes of an OCR recogniser's head, small."""
    g = GraphBuilder(rng)
    y = _hardswish_divided_outside(g, g.conv_bn("data", "c1", 3, 8, act=None), "hswish")
    y = _swish(g, g.conv_bn(y, "c2", 8, 16, stride=2, act=None), "silu", beta=1.0)
    y = g.op("Flatten", [g.op("GlobalAveragePool", [y], "gap")], "flat")
    y = _layer_norm(g, g.gemm(y, "fc1", 16, 16), "ln", gamma=rng.uniform(0.5, 1.5, 16).astype(np.float32),
                    beta=rng.normal(0, 0.3, 16).astype(np.float32))
    y = _mish_log_exp(g, g.gemm(y, "fc2", 16, 10), "mish")
    return g.model("small_cnn", {"data": (1, 3, 12, 12)}, [y], opset=OPSET)


def test_fp32_fuses_the_canonical_forms_into_conv_and_fc_kernels(rng):
    model = _small_cnn_with_decomposed_ops(rng)
    feeds = random_inputs(model, rng)
    built = compiler.compile(model, target="native")
    for g, w in zip(built.run(**feeds), onnxruntime_outputs(model, feeds)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
    fused = {rule: n for rule, n in built.report.fusion.items() if n}
    assert fused.get("conv_bn_act") == 2, built.report  # HardSwish and SiLU in the conv epilogues
    assert built.report.unfused_ops.get("layer_norm") == 1 and "divide" not in built.report.unfused_ops


def test_int8_compiles_and_stays_close_with_the_canonical_forms(rng):
    model = _small_cnn_with_decomposed_ops(rng)
    calib = [rng.standard_normal((1, 3, 12, 12)).astype(np.float32) for _ in range(4)]
    built = compiler.compile(model, target="native", calib=calib, bias_correction=None)
    assert sum(built.report.quantization.int8_ops.values()) >= 2
    feeds = {"data": calib[0]}
    got, want = built.run(**feeds)[0], onnxruntime_outputs(model, feeds)[0]
    assert float(got.ravel() @ want.ravel() / (np.linalg.norm(got) * np.linalg.norm(want))) > 0.99
