"""INT8 accuracy machinery: the MSE threshold search, graph bounds, bias correction, the accuracy-aware
fallback and its bad inputs, the options object. Numerics are checked against numpy and onnxruntime."""

import numpy as np
import pytest

import compiler
from calib import MSECollector
from calib.mse import mse_threshold
from calib.histogram import SymmetricHistogram
from compiler.int8_options import QuantizationOptions, add_cli_arguments, from_cli
from quantvm.errors import CalibrationError, QuantvmError
from relay_passes.bounds import tensor_bounds
from targets import resolve_target
from targets.intrinsics import needs_bounded_pairs
from tests import fixtures
from tests.fixtures import onnxruntime_outputs


def _stored(x, t, unsigned):
    """x as the int8 kernels store it with threshold t (numpy reference)."""
    steps, levels = (255.0, (0, 255)) if unsigned else (127.0, (-127, 127))
    scale = t / steps
    return np.clip(np.round(x / scale), *levels) * scale


@pytest.mark.parametrize("unsigned", [False, True])
def test_mse_threshold_is_within_one_percent_of_the_brute_force_optimum(rng, unsigned):
    x = rng.standard_t(3, 200_000)  # heavy tails: clipping pays
    if unsigned:
        x = np.abs(x)
    hist = SymmetricHistogram.of(x.astype(np.float32), 8001)
    chosen, _ = mse_threshold(hist.counts, hist.edges, unsigned)
    candidates = np.linspace(0.02, 1, 400) * np.abs(x).max()
    errors = [np.mean((x - _stored(x, t, unsigned)) ** 2) for t in candidates]
    best = float(np.min(errors))
    assert chosen < np.abs(x).max() * 0.9  # it does clip the rare tail
    assert np.mean((x - _stored(x, chosen, unsigned)) ** 2) <= best * 1.01


def test_mse_keeps_the_whole_range_of_a_uniform_tensor(rng):
    collector = MSECollector()
    collector.collect("u", "conv2d", rng.uniform(-2, 2, 100_000).astype(np.float32))
    lo, hi = collector.post_collect()["u"]
    assert hi > 1.97 and lo < -1.97


def test_graph_bounds_follow_clip_sigmoid_hardsigmoid_and_scaling(rng):
    from compiler.frontend import import_onnx
    from relay_passes import prepare_graph

    g = fixtures.GraphBuilder(rng)
    relu6 = fixtures._clip(g, "data", "relu6", 0, 6)
    pooled = g.op("MaxPool", [relu6], "pool", kernel_shape=[2, 2], strides=[2, 2])
    hs = g.op("HardSigmoid", ["data"], "hs", alpha=0.2, beta=0.5)
    scaled = g.op("Mul", [g.op("Sigmoid", ["data"], "sig"), g.const("two", np.float32(2))], "scaled")
    free = g.op("Relu", ["data"], "relu")
    model = g.model("bounds", {"data": (1, 2, 4, 4)}, [pooled, hs, scaled, free])
    func = prepare_graph(import_onnx(model).mod)["main"]
    from tvm import relax

    outputs = relax.analysis.get_var2val(func)[func.body.body].fields
    by_output = [tensor_bounds(func).get(o) for o in outputs]
    assert by_output[0] == (0.0, 6.0)  # ReLU6, through max pooling
    assert by_output[1] == (0.0, 1.0)  # HardSigmoid
    assert by_output[2] == (0.0, 2.0)  # Sigmoid times 2
    assert by_output[3] is None  # ReLU: unbounded above


def _relu6_then_conv(rng):
    g = fixtures.GraphBuilder(rng)
    y = g.conv_bn("data", "first", 4, 8, act="Relu6")
    y = g.conv_bn(y, "second", 8, 8, act=None)
    return g.model("relu6_conv", {"data": (2, 4, 8, 8)}, [y])


def test_a_bounded_input_is_never_clipped_inside_its_bound(rng):
    """Entropy clips ReLU6 outputs (the real-model loss): with the graph's bound known, the calibrated range
    of the conv after a ReLU6 is the whole range seen, whatever the mode."""
    model = _relu6_then_conv(rng)
    calib = [rng.normal(0, 3, (2, 4, 8, 8)).astype(np.float32) for _ in range(4)]
    seen = max(float(np.max(onnxruntime_outputs(_first_output_model(model, "first.relu6"), {"data": c})[0]))
               for c in calib)
    for mode in ("entropy", "mse", "percentile"):
        built = compiler.compile(model, target="native", calib=calib, calib_mode=mode, bias_correction=None)
        row = next(r for r in built.report.quantization.layers if r["name"] == "second.conv")
        assert row["threshold"][1] == pytest.approx(seen, rel=1e-6), mode


def _first_output_model(model, name):
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    out.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return out


def _channel_bias(model, int8, calib):
    """Per output channel, the mean of (int8 - fp32) over the calibration batches; onnxruntime is fp32."""
    diffs = [int8.run(data=c)[0] - onnxruntime_outputs(model, {"data": c})[0] for c in calib]
    return np.abs(np.mean(diffs, axis=(0, 1, 3, 4)))


def test_bias_correction_removes_the_mean_error_of_depthwise_layers(rng):
    model = fixtures.depthwise_separable_block(rng)
    calib = [rng.normal(0, 1, (2, 3, 20, 20)).astype(np.float32) for _ in range(8)]
    errors = {}
    for mode in (None, "fast", "full"):
        built = compiler.compile(model, target="native", calib=calib, calib_mode="naive", bias_correction=mode)
        errors[mode] = _channel_bias(model, built, calib)
        if mode:
            summary = built.report.quantization.bias_correction
            assert summary["mode"] == mode and summary["layers"] == 6
    assert errors["fast"].mean() < 0.5 * errors[None].mean()
    assert errors["full"].mean() <= errors["fast"].mean() * 1.05


def _mlp_data(rng, n=4):
    return [rng.normal(0, 1, (4, 32)).astype(np.float32) for _ in range(n)]


def test_fallback_with_a_user_metric_reverts_until_the_goal_holds(rng):
    model = fixtures.mlp(rng)
    probe = rng.normal(0, 1, (4, 32)).astype(np.float32)
    reference = onnxruntime_outputs(model, {"data": probe})[0]
    calls = []

    def closeness(m):  # higher is better: minus the error against onnxruntime's fp32
        calls.append(m)
        return -float(np.abs(m.run(data=probe)[0] - reference).max())

    built = compiler.compile(model, target="native", calib=_mlp_data(rng), max_drop=1e-6, metric=closeness)
    fallback = built.report.quantization.fallback
    assert fallback["metric"] == "test_fallback_with_a_user_metric_reverts_until_the_goal_holds.<locals>.closeness"
    assert fallback["reached"] and fallback["steps"][0]["layer"] is None
    assert [s["layer"] for s in fallback["steps"][1:]] == fallback["reverted"]
    assert fallback["steps"][-1]["drop"] <= 1e-6 < fallback["steps"][0]["drop"]
    assert len(calls) == len(fallback["steps"]) + 1  # fp32 once, then once per step
    for name in fallback["reverted"]:
        assert built.report.quantization.fp32_layers[name] == "reverted to fp32 by the accuracy fallback"
    assert -float(np.abs(built.run(data=probe)[0] - reference).max()) >= fallback["steps"][-1]["metric"] - 1e-6


def test_fallback_without_a_metric_uses_agreement_or_cosine_on_eval_data(rng):
    model = fixtures.depthwise_separable_block(rng)  # not a classifier: cosine
    calib = [rng.normal(0, 1, (2, 3, 20, 20)).astype(np.float32) for _ in range(4)]
    held_out = [rng.normal(0, 1, (2, 3, 20, 20)).astype(np.float32) for _ in range(2)]
    built = compiler.compile(model, target="native", calib=calib, eval_data=held_out, max_drop=1e-4)
    fallback = built.report.quantization.fallback
    assert fallback["metric"] == "cosine" and fallback["fp32_metric"] == 1.0
    drops = [s["drop"] for s in fallback["steps"]]
    assert fallback["reached"] == (min(drops) <= 1e-4)
    cosines = [np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b)
               for a, b in ((built.run(data=h)[0], onnxruntime_outputs(model, {"data": h})[0]) for h in held_out)]
    assert 1 - float(np.mean(cosines)) == pytest.approx(min(drops), abs=2e-5)


def test_fallback_warns_with_the_figures_when_the_goal_is_missed(rng):
    model = fixtures.mlp(rng)
    answers = iter([1.0] + [0.0] * 10)  # fp32 scores 1, every int8 variant 0: unreachable

    with pytest.warns(UserWarning, match=r"max_drop 0.01 not reached: .* by 1 \(0.99 over\)"):
        built = compiler.compile(model, target="native", calib=_mlp_data(rng), max_drop=0.01,
                                 metric=lambda m: next(answers))
    fallback = built.report.quantization.fallback
    assert not fallback["reached"] and fallback["reverted"] == []  # the first model is as good as any


@pytest.mark.parametrize("metric, message", [
    (lambda m: 1 / 0, "raised ZeroDivisionError"),
    (lambda m: float("nan"), "returned nan"),
    (lambda m: "good", "returned 'good'"),
])
def test_a_bad_metric_is_named(rng, metric, message):
    with pytest.raises(QuantvmError, match=rf"metric '.*<lambda>' {message}"):
        compiler.compile(fixtures.mlp(rng), target="native", calib=_mlp_data(rng), max_drop=0.01, metric=metric)


@pytest.mark.parametrize("keywords, message", [
    ({"max_drop": -0.1}, "max_drop must be a number in \\[0, 1\\), got -0.1"),
    ({"max_drop": 1.0}, "max_drop must be a number in \\[0, 1\\), got 1.0"),
    ({"max_drop": 0.01, "eval_data": []}, "the eval_data loader yielded no batches"),
    ({"max_drop": 0.01, "eval_data": [np.zeros((4, 31), np.float32)]}, "eval_data batch 0, input 'data': shape \\[4, 31\\]"),
    ({"bias_correction": "slow"}, "bias_correction must be one of 'fast', 'full', None"),
    ({"calib_mode": "kl"}, "calib_mode must be one of"),
    ({"smoothquant": True}, "unknown int8 option\\(s\\) smoothquant"),
    ({"metric": 3}, "metric must be a callable"),
    ({"bounded_pairs": "off"}, "bounded_pairs must be None \\(auto\\), True or False, got 'off'"),
    ({"smooth_quant": "on"}, "smooth_quant must be None \\(auto\\), True or False, got 'on'"),
])
def test_bad_int8_arguments_are_named(rng, keywords, message):
    with pytest.raises(QuantvmError, match=message):
        compiler.compile(fixtures.mlp(rng), target="native", calib=_mlp_data(rng), **keywords)


def test_calibration_errors_are_quantvm_errors():
    assert issubclass(CalibrationError, QuantvmError)


def test_one_options_object_for_every_entry_point(rng):
    import argparse

    options = QuantizationOptions(calib_mode="naive", bias_correction=None, exclude_layers=["fc1"])
    assert options.exclude_layers == ("fc1",)
    model = fixtures.mlp(rng)
    data = _mlp_data(rng)
    by_object = compiler.compile(model, target="native", calib=data, quantization=options)
    by_keywords = compiler.compile(model, target="native", calib=data, calib_mode="naive", bias_correction=None,
                                   exclude_layers=["fc1"])
    assert by_object.report.quantization.options == by_keywords.report.quantization.options
    overridden = compiler.compile(model, target="native", calib=data, quantization=options, exclude_layers=[])
    assert "fc1" not in overridden.report.quantization.fp32_layers
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    parsed = from_cli(parser.parse_args(["--calib-mode", "naive", "--bias-correction", "none",
                                          "--exclude-layers", "fc1", "--max-drop", "0.02"]))
    assert parsed == QuantizationOptions(calib_mode="naive", bias_correction=None, exclude_layers=("fc1",),
                                         max_drop=0.02)
    defaults = QuantizationOptions()
    assert (defaults.calib_mode, defaults.bias_correction, defaults.smooth_quant, defaults.per_token) == \
        ("mse", "fast", None, False)


def test_analyze_writes_json_and_a_self_contained_html_page(tmp_path, rng):
    import json
    from html.parser import HTMLParser

    from tests.test_cli import quantvm

    model = fixtures.depthwise_separable_block(rng)
    path = tmp_path / "dw.onnx"
    path.write_bytes(model.SerializeToString())
    np.savez(tmp_path / "calib.npz", data=rng.normal(0, 1, (8, 3, 20, 20)).astype(np.float32))
    quantvm("analyze", path, "--calib", tmp_path / "calib.npz", "--json", tmp_path / "a.json",
            "--html", tmp_path / "a.html", "--calib-mode", "naive")
    report = json.loads((tmp_path / "a.json").read_text())
    names = [layer["name"] for layer in report["layers"]]
    assert names == ["stem.conv", "dw1.conv", "pw1.conv", "dw2.conv", "pw2.conv", "grouped.conv"]
    assert report["batches"] == 4 and report["calib_mode"] == "naive" and report["bias_correction"] == "fast"
    for layer in report["layers"]:
        assert layer["input_sqnr_db"] > 20 and layer["only_int8_sqnr_db"] > report["all_int8_sqnr_db"]
    # with only that layer in int8 the model is closer to fp32 than all-int8 is: every gain is >= ~0
    assert min(layer["only_fp32_gain_db"] for layer in report["layers"]) > -0.5

    class Tags(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags = []

        def handle_starttag(self, tag, attrs):
            self.tags.append((tag, dict(attrs)))

    page = Tags()
    page.feed((tmp_path / "a.html").read_text())
    assert [t for t, _ in page.tags].count("svg") == 1
    assert not any(t in ("script", "link", "img") for t, _ in page.tags)
    assert all(name in (tmp_path / "a.html").read_text() for name in names)


def attention_block(rng, tokens=8, width=16, heads=2):
    """One self-attention layer as exporters write it: Q, K, V dense, heads split by Reshape/Transpose,
    softmax(Q.K^T / sqrt(d)).V, heads merged, output dense. Channel 3 of the input carries outliers, as
    LayerNorm outputs of trained transformers do."""
    g = fixtures.GraphBuilder(rng)
    d = width // heads

    def dense(x, name):
        w = g.const(f"{name}.w", rng.normal(0, width ** -0.5, (width, width)).astype(np.float32))
        b = g.const(f"{name}.b", rng.normal(0, 0.1, width).astype(np.float32))
        return g.op("Add", [g.op("MatMul", [x, w], f"{name}.matmul"), b], name)

    def split(x, name, perm):
        shape = g.const(f"{name}.shape", np.array([1, tokens, heads, d], np.int64))
        return g.op("Transpose", [g.op("Reshape", [x, shape], f"{name}.reshape")], f"{name}.t", perm=perm)

    q = split(dense("data", "q"), "qh", [0, 2, 1, 3])
    k = split(dense("data", "k"), "kh", [0, 2, 3, 1])
    v = split(dense("data", "v"), "vh", [0, 2, 1, 3])
    scores = g.op("Div", [g.op("MatMul", [q, k], "scores"), g.const("sqrt_d", np.float32(d ** 0.5))], "scaled")
    probs = g.op("Softmax", [scores], "probs", axis=-1)
    merged = g.op("Transpose", [g.op("MatMul", [probs, v], "context")], "ctx.t", perm=[0, 2, 1, 3])
    flat = g.op("Reshape", [merged, g.const("flat", np.array([1, tokens, width], np.int64))], "ctx.flat")
    return g.model("attention", {"data": (1, tokens, width)}, [dense(flat, "out")])


def _tokens(rng, n):
    batches = []
    for _ in range(n):
        x = rng.normal(0, 1, (1, 8, 16)).astype(np.float32)
        x[..., 3] *= 20  # an outlier channel
        batches.append(x)
    return batches


def _cosine(a, b):
    return float(np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b))


def test_attention_matmuls_run_in_int8_on_request_and_token_inputs_are_smoothed_by_default(rng):
    model = attention_block(rng)
    calib, held_out = _tokens(rng, 8), _tokens(rng, 4)
    default = compiler.compile(model, target="native", calib=calib).report.quantization
    assert default.int8_ops == {"dense": 4} and default.fp32_ops == {"matmul": 2}
    assert "attention_int8=True" in default.fp32_layers["scores"]
    built = compiler.compile(model, target="native", calib=calib, attention_int8=True)
    quant = built.report.quantization
    assert quant.int8_ops == {"dense": 4, "matmul": 2} and quant.fp32_ops == {}
    rows = {r["name"]: r for r in quant.layers}
    assert all("smooth_alpha" in rows[f"{n}.matmul"] for n in ("q", "k", "v", "out"))
    assert any(rows[f"{n}.matmul"]["smooth_alpha"] is not None for n in "qkv")  # the outlier channel
    assert rows["scores"]["dtype"] == "int8" and rows["context"]["dtype"] == "uint8"  # softmax: u8 over [0, 1]
    assert 0.99 < rows["context"]["threshold"][1] <= 1.0
    for x in held_out:
        assert _cosine(built.run(data=x)[0], onnxruntime_outputs(model, {"data": x})[0]) > 0.995


def test_per_token_beats_one_range_per_tensor_on_outlier_channels(rng):
    model = attention_block(rng)
    calib, held_out = _tokens(rng, 8), _tokens(rng, 4)

    def worst_cosine(**options):
        built = compiler.compile(model, target="native", calib=calib, calib_mode="naive", **options)
        return min(_cosine(built.run(data=x)[0], onnxruntime_outputs(model, {"data": x})[0]) for x in held_out)

    per_tensor = worst_cosine(smooth_quant=False)
    assert worst_cosine(per_token=True, smooth_quant=False) > per_tensor
    smoothed = compiler.compile(model, target="native", calib=calib, calib_mode="naive", smooth_quant=True)
    alphas = [r["smooth_alpha"] for r in smoothed.report.quantization.layers if r["op"] == "dense"]
    assert any(a is not None for a in alphas)  # the outlier channel is worth smoothing somewhere
    assert min(_cosine(smoothed.run(data=x)[0], onnxruntime_outputs(model, {"data": x})[0]) for x in held_out) \
        >= per_tensor - 1e-3


def _digit_strips(count, rng):
    """Text-line images made of real handwritten digits (the demo's held-out set), dark on light, 48x192,
    normalised as PaddleOCR does; every other one turned upside down."""
    from compiler.demo import demo_files

    digits = np.load(demo_files()[1])["image"][:, 0]  # (n, 8, 8) in [0, 1]
    strips = []
    for i in range(count):
        picks = rng.choice(len(digits), 4, replace=False)
        line = np.concatenate([np.kron(1 - digits[p], np.ones((6, 6))) for p in picks], axis=1)  # 48 x 192
        if i % 2:
            line = line[::-1, ::-1]
        strips.append(((np.repeat(line[None, None], 3, 1) - 0.5) / 0.5).astype(np.float32))
    return strips


def _sqnr(reference, approx) -> float:
    ref, err = np.concatenate(reference), np.concatenate(reference) - np.concatenate(approx)
    return float(10 * np.log10(np.sum(ref ** 2) / np.sum(err ** 2)))


def test_a_real_pretrained_classifier_keeps_its_answers_with_the_default_int8():
    """PaddleOCR's text-direction classifier (pretrained MobileNetV3: hard-swish, SE with HardSigmoid) on
    lines of real handwritten digits: the default int8 is closer to fp32 than the old default (naive, no
    bias correction) and keeps >= 95 % of the answers (these lines are far from its training data: many
    answers have margins under 0.05). (onnxruntime's quantizer cannot take this model: its shape inference
    fails on the dynamic width.)"""
    from tests.fuzz.models import PPOCR_CLS

    strips = _digit_strips(96, np.random.default_rng(0))
    calib, held_out = strips[:32], strips[32:]
    import onnx

    model = onnx.load(str(PPOCR_CLS.path))
    fp32 = [onnxruntime_outputs(model, {"x": s})[0] for s in held_out]

    def outputs(**options):
        built = compiler.compile(model, target="native", input_shapes={"x": (1, 3, 48, 192)}, calib=calib,
                                 **options)
        return built, [built.run(x=s)[0] for s in held_out]

    built, default = outputs()
    # the calibration defaults against the old ones on full s8 weights: bounded weight pairs (a host without
    # VNNI) add the same weight error to both, which narrows the margin (22.6 against 21.8 dB on a Zen 3)
    exact = outputs(bounded_pairs=False)[1] if needs_bounded_pairs(resolve_target("native")) else default
    _, old = outputs(calib_mode="naive", bias_correction=None, bounded_pairs=False)
    assert _sqnr(fp32, exact) > _sqnr(fp32, old) + 1.0
    assert np.mean([a.argmax() == b.argmax() for a, b in zip(fp32, default)]) >= 0.95
    quant = built.report.quantization
    assert quant.bias_correction["layers"] > 10 and not quant.fp32_ops


def test_cli_max_drop_with_bad_eval_data_names_it_and_writes_nothing(tmp_path, rng):
    from tests.test_cli import quantvm

    path = tmp_path / "mlp.onnx"
    path.write_bytes(fixtures.mlp(rng).SerializeToString())
    np.savez(tmp_path / "calib.npz", data=rng.normal(0, 1, (8, 32)).astype(np.float32))
    np.savez(tmp_path / "bad.npz", data=rng.normal(0, 1, (8, 31)).astype(np.float32))
    done = quantvm("compile", path, "-t", "native", "-o", tmp_path / "m.so", "--calib", tmp_path / "calib.npz",
                   "--max-drop", "0.01", "--eval-data", tmp_path / "bad.npz", check=False)
    assert done.returncode == 1
    assert "eval_data batch 0, input 'data': shape [8, 31]" in done.stderr and "internal error" not in done.stderr
    assert {p.name for p in tmp_path.iterdir()} == {"mlp.onnx", "calib.npz", "bad.npz"}
