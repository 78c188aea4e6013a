"""INT8: exact integer kernels, calibrated accuracy on real data, the quantized graph, and bad input."""

import warnings

import numpy as np
import pytest
from onnx import numpy_helper

import compiler
from calib import CalibrationCollector, CalibrationError
from compiler.demo import calibration_file, demo_files
from relay_passes.weight_pairs import quantize_bounded
from targets import missing_features, resolve_target
from targets.intrinsics import needs_bounded_pairs
from tests import fixtures
from tests.host_targets import HOST_TARGETS
from tests.fixtures import onnxruntime_outputs, random_inputs
from tests.test_calib import MeanAbsCollector

DIGITS_BATCH = 40


def _int8_accumulators(target, data, weight, kind):
    import tvm
    from tvm import relax

    x = relax.Var("x", relax.TensorType(list(data.shape), str(data.dtype)))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            if kind == "conv2d":
                y = relax.op.nn.conv2d(x, relax.const(weight), padding=[1, 1, 1, 1], out_dtype="int32")
            else:
                y = relax.op.matmul(x, relax.const(weight), out_dtype="int32")
            out = bb.emit_output(bb.emit(y))
        bb.emit_func_output(out)
    spec = compiler.build.resolve_target(target)
    executable = tvm.compile(bb.get(), spec.tvm_target())
    return relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(data)).numpy()


def _numpy_conv(data, weight):
    x = np.pad(data.astype(np.int64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))  # n c h w 3 3
    return np.einsum("nchwij,ocij->nohw", windows, weight.astype(np.int64))


@pytest.mark.parametrize("target", HOST_TARGETS)
@pytest.mark.parametrize("data_dtype", ["uint8", "int8"])
def test_int8_accumulators_are_bit_exact_on_full_range_data(target, data_dtype, rng):
    info = np.iinfo(data_dtype)
    data = rng.integers(info.min, info.max + 1, (2, 64, 6, 6)).astype(data_dtype)
    data[0, :, 0, 0] = info.max  # the pairs that saturate vpmaddubsw's int16 sums
    weight = rng.integers(-128, 128, (8, 64, 3, 3)).astype(np.int8)
    weight[0] = -128
    got = _int8_accumulators(target, data, weight, "conv2d")
    assert got.dtype == np.int32 and np.array_equal(got, _numpy_conv(data, weight))
    matrix = rng.integers(info.min, info.max + 1, (16, 256)).astype(data_dtype)
    dense_weight = rng.integers(-128, 128, (256, 32)).astype(np.int8)
    got = _int8_accumulators(target, matrix, dense_weight, "dense")
    assert np.array_equal(got, matrix.astype(np.int64) @ dense_weight.astype(np.int64))


def _digits():
    model_path, holdout = demo_files()
    data = np.load(holdout)
    calib = np.load(calibration_file())["image"]
    return model_path, data["image"], data["label"], calib


def _accuracy(model, images, labels):
    logits = np.concatenate([model(images[i:i + DIGITS_BATCH])[0] for i in range(0, len(images), DIGITS_BATCH)])
    return float((logits.argmax(1) == labels).mean())


@pytest.fixture(scope="module")
def digits_fp32_accuracy():
    model_path, images, labels, _ = _digits()
    fp32 = compiler.compile(model_path, target="native", input_shapes={"image": (DIGITS_BATCH, 1, 8, 8)})
    return _accuracy(fp32, images, labels)


@pytest.mark.parametrize("mode", ["mse", "naive", "entropy", "percentile"])
def test_digits_int8_accuracy_within_half_a_point_of_fp32(mode, digits_fp32_accuracy):
    model_path, images, labels, calib = _digits()
    int8 = compiler.compile(model_path, target="native", input_shapes={"image": (DIGITS_BATCH, 1, 8, 8)},
                            calib=[calib[:240]], calib_mode=mode)
    assert digits_fp32_accuracy - _accuracy(int8, images, labels) <= 0.005
    quant = int8.report.quantization
    assert quant.int8_ops == {"conv2d": 4, "avg_pool": 1, "dense": 1} and quant.fp32_ops == {}
    names = [row["name"] for row in quant.layers]
    assert sorted(names) == ["block_a.conv", "block_b.conv", "gap", "head.gemm", "stem.conv", "wide.conv"]
    # the image is quantized by a kernel of its own, and zero-padded to a channel block for the stem conv;
    # the stem output, also read by the residual Add, is stored int8 only, by the stem's kernel: the Add reads
    # that copy (relay_passes.quantized_residuals)
    assert int8.report.unfused_ops == {"max_pool2d": 1, "pad": 1, "quantize": 1, "reshape": 1}
    assert int8.report.elementwise["second_outputs"] == 0
    sqnr = [row["sqnr_db"] for row in quant.layers]
    assert sqnr == sorted(sqnr) and min(sqnr) > 20  # worst first
    assert all(row["dtype"] == "uint8" for row in quant.layers)  # image in [0, 1] and ReLU outputs
    assert quant.output_error["cosine"] > 0.999
    assert int8.metadata.quantization.mode == "int8"


@pytest.mark.parametrize("name", ["resnet_bottleneck", "depthwise_separable", "mlp", "pooling"])
def test_int8_models_stay_close_to_onnxruntime_fp32(name, rng):
    model = fixtures.MODELS[name](rng)
    feeds = random_inputs(model, rng)
    calib = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in feeds.items()} for _ in range(4)]
    int8 = compiler.compile(model, target="native", calib=calib, calib_mode="naive")
    got, want = int8.run(**feeds)[0], onnxruntime_outputs(model, feeds)[0]
    cosine = float(got.ravel() @ want.ravel() / (np.linalg.norm(got) * np.linalg.norm(want)))
    assert cosine > 0.99, cosine
    assert sum(int8.report.quantization.int8_ops.values()) >= 3


def test_signed_inputs_are_s8_and_forced_dtypes_are_honoured(rng):
    model = fixtures.MODELS["mlp"](rng)
    calib = [rng.standard_normal((4, 32)).astype(np.float32)]
    layers = {r["name"]: r["dtype"] for r in compiler.compile(model, target="native", calib=calib,
                                                              calib_mode="naive").report.quantization.layers}
    assert layers["fc1"] == "int8" and layers["fc2.matmul"] == "uint8"  # fc1 reads the signed input
    forced = compiler.compile(model, target="native", calib=calib, calib_mode="naive", quantized_dtype="int8")
    assert {r["dtype"] for r in forced.report.quantization.layers} == {"int8"}


def test_custom_collector_end_to_end():
    model_path, images, labels, calib = _digits()
    mine = MeanAbsCollector()
    int8 = compiler.compile(model_path, target="native", input_shapes={"image": (DIGITS_BATCH, 1, 8, 8)},
                            calib=[calib[:80]], calib_mode="custom", collector=mine)
    assert mine.include_layers == {"stem.conv", "block_a.conv", "block_b.conv", "wide.conv", "gap", "head.gemm"}
    thresholds = {r["name"]: r["threshold"] for r in int8.report.quantization.layers}
    assert thresholds == {k: list(v) for k, v in mine.min_max_dict.items()}
    assert _accuracy(int8, images, labels) > 0.9


def test_exclusions_keep_layers_in_fp32():
    model_path, _, _, calib = _digits()
    shapes = {"image": (DIGITS_BATCH, 1, 8, 8)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = compiler.compile(model_path, target="native", input_shapes=shapes, calib=[calib[:40]],
                                 calib_mode="naive", exclude_layers=["stem.conv", "no.such.layer"],
                                 exclude_layers_match=["block_"], exclude_operators=["Gemm", "GlobalAveragePool"])
    assert any("no.such.layer" in str(w.message) for w in caught)
    quant = model.report.quantization
    assert quant.int8_ops == {"conv2d": 1} and quant.fp32_ops == {"conv2d": 3, "avg_pool": 1, "dense": 1}
    assert quant.fp32_layers == {"stem.conv": "excluded by name", "block_a.conv": "excluded by name match",
                                    "block_b.conv": "excluded by name match", "gap": "excluded by op type",
                                    "head.gemm": "excluded by op type"}


class _FakeTensor:
    """Stands in for a torch tensor: np.asarray reads it through __array__."""

    def __init__(self, array):
        self.array = array

    def __array__(self, dtype=None, copy=None):
        return self.array


def test_loaders_of_every_shape_are_accepted(rng):
    model = fixtures.MODELS["mlp"](rng)
    base = rng.standard_normal((8, 32)).astype(np.float32)
    ranges = []
    for loader in ([base], [{"data": base}], [(base,)], ([_FakeTensor(base[:3]), _FakeTensor(base[3:])]),
                   (b for b in [base[:5], base[5:]])):
        built = compiler.compile(model, target="native", calib=loader, calib_mode="naive")
        ranges.append([row["threshold"] for row in sorted(built.report.quantization.layers,
                                                          key=lambda r: r["name"])])
    assert all(r == ranges[0] for r in ranges)
    labels = np.arange(8)
    with pytest.warns(UserWarning, match="trailing ones"):  # a DataLoader of (images, labels)
        built = compiler.compile(model, target="native", calib=[(base, labels)], calib_mode="naive")
    assert [row["threshold"] for row in sorted(built.report.quantization.layers,
                                               key=lambda r: r["name"])] == ranges[0]


def test_calibration_streams_and_stops_at_num_calib_batches(rng):
    model = fixtures.MODELS["mlp"](rng)
    consumed = []

    def endless():
        while True:
            consumed.append(1)
            yield rng.standard_normal((4, 32)).astype(np.float32)

    compiler.compile(model, target="native", calib=endless(), calib_mode="entropy", num_calib_batches=3)
    assert len(consumed) == 3


@pytest.mark.parametrize("calib, words", [
    ([], "yielded no batches"),
    ([np.zeros((4, 31), np.float32)], r"calibration batch 0, input 'data': shape \[4, 31\]"),
    ([np.zeros((4, 32), np.int32)], "dtype int32 given, float32 expected"),
    ([np.ones((4, 32), np.float32), np.full((4, 32), np.nan, np.float32)], "batch 1, input 'data' holds NaN"),
    ([{"x": np.zeros((4, 32), np.float32)}], "do not match the model's"),
    ([np.zeros((2, 32), np.float32)], "fewer than one batch"),
])
def test_bad_calibration_data_is_named(calib, words, rng):
    with pytest.raises(CalibrationError, match=words):
        compiler.compile(fixtures.MODELS["mlp"](rng), target="native", calib=calib, calib_mode="naive")


class _Silent(CalibrationCollector):
    def collect(self, name, op_name, arr):
        pass


class _Misnamed(CalibrationCollector):
    def collect(self, name, op_name, arr):
        self.min_max_dict["ghost_layer"] = (0.0, 1.0)


@pytest.mark.parametrize("collector, words", [(_Silent(), "empty dict"), (_Misnamed(), "unknown tensor.*ghost_layer")])
def test_custom_collector_mistakes_are_named(collector, words, rng):
    with pytest.raises(CalibrationError, match=words):
        compiler.compile(fixtures.MODELS["mlp"](rng), target="native", calib=[np.ones((4, 32), np.float32)],
                         calib_mode="custom", collector=collector)


def test_an_all_zero_input_range_leaves_that_layer_in_fp32(rng):
    model = fixtures.MODELS["mlp"](rng)
    with pytest.warns(UserWarning, match="'fc1' is 0 on every batch"):
        built = compiler.compile(model, target="native", calib=[np.zeros((4, 32), np.float32)], calib_mode="naive")
    quant = built.report.quantization
    assert quant.fp32_layers["fc1"] == "zero range in calibration"
    x = rng.standard_normal((4, 32)).astype(np.float32)
    assert np.isfinite(built.run(x)[0]).all()


def test_cascadelake_int8_build_and_metadata(tmp_path):
    model_path, _, _, calib = _digits()
    built = compiler.compile(model_path, target="cascadelake", input_shapes={"image": (DIGITS_BATCH, 1, 8, 8)},
                             calib=[calib[:40]], calib_mode="naive")
    path = built.export(tmp_path / "digits_int8_clx.so")
    meta = compiler.artifact.read_metadata(path)
    assert meta.quantization.to_json() == {"mode": "int8", "calib_mode": "naive",
                                    "int8_ops": {"conv2d": 4, "avg_pool": 1, "dense": 1}, "fp32_ops": {}}
    if missing_features(meta.target.required_features):
        assert built.report.quantization.output_error is None  # it cannot run here to be measured
    else:  # a host with AVX-512 VNNI runs it, and measures it against fp32 as on any host target
        assert built.report.quantization.output_error["cosine"] > 0.99


def test_calib_mode_none_computes_ranges_at_run_time(digits_fp32_accuracy):
    model_path, images, labels, calib = _digits()
    shapes = {"image": (DIGITS_BATCH, 1, 8, 8)}
    dynamic = compiler.compile(model_path, target="native", input_shapes=shapes, calib_mode="none")
    quant = dynamic.report.quantization
    assert quant.int8_ops == {"conv2d": 4, "dense": 1} and all(r["threshold"] is None for r in quant.layers)
    assert digits_fp32_accuracy - _accuracy(dynamic, images, labels) <= 0.005
    assert dynamic.report.unfused_ops["max"] == 5  # the run-time range: one extra reduction per int8 op
    with pytest.warns(UserWarning, match="calibration data is not used"):
        compiler.compile(model_path, target="native", input_shapes=shapes, calib=[calib[:40]], calib_mode="none")


def _single_op_model(rng, op: str):
    """One FC (Gemm) or conv on signed data: the s8 input the rewrite stores as u8 + 128 (FC, 1x1 conv, a
    padded stem on 3 channels, padded with 128 before it) or keeps s8 (a padded conv on 16 channels, 9 or 17
    columns: the second computed in whole register tiles, then cut)."""
    g = fixtures.GraphBuilder(rng)
    if op == "fc":
        return g.model("fc", {"x": (4, 64)}, [g.gemm("x", "fc", 64, 48)])
    k, pad, channels, size = {"conv1x1": (1, 0, 16, 9), "conv3x3": (3, 1, 16, 9), "conv3x3_17": (3, 1, 16, 17),
                              "stem7x7": (7, 3, 3, 9)}[op]
    w = g.const("conv.w", rng.normal(0, 0.2, (32, channels, k, k)).astype(np.float32))
    b = g.const("conv.b", rng.normal(0, 0.1, 32).astype(np.float32))
    y = g.op("Conv", ["x", w, b], "conv", kernel_shape=[k, k], pads=[pad] * 4)
    return g.model(op, {"x": (1, channels, size, size)}, [y])


def _int8_reference(model, x, calib):
    """The int8 op in numpy, as the rewrite plans it (naive ranges, no bias correction): s8 input over
    max|x|, s8 weights per output channel, s32 bias, one fp32 multiply back."""
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    node = model.graph.node[0]
    weight, bias = inits[node.input[1]], inits[node.input[2]]
    x_scale = np.abs(calib).max() / 127
    w = weight.reshape(weight.shape[0], -1)  # output channels first (Gemm's transB and conv's O)
    w_scale = np.abs(w).max(axis=1) / 127
    w_q = np.clip(np.round(weight / w_scale.reshape(-1, *[1] * (weight.ndim - 1))), -127, 127)
    if needs_bounded_pairs(resolve_target("native")):  # the weights this host's vpmaddubsw kernels take
        w_q, w_scale = quantize_bounded(weight, w_scale)
        w_q = w_q.astype(np.float64)
    b_q = np.round(bias / (x_scale * w_scale))
    x_q = np.clip(np.round(x / np.float32(x_scale)), -128, 127).astype(np.float64)
    if weight.ndim == 2:
        acc = x_q @ w_q.T + b_q
        return acc * (x_scale * w_scale), x_scale * np.abs(w_q).max() * w_scale.max()
    pad = (weight.shape[-1] - 1) // 2
    windows = np.lib.stride_tricks.sliding_window_view(
        np.pad(x_q, ((0, 0), (0, 0), (pad, pad), (pad, pad))), weight.shape[2:], axis=(2, 3))
    acc = np.einsum("nchwij,ocij->nohw", windows, w_q) + b_q.reshape(1, -1, 1, 1)
    return acc * (x_scale * w_scale).reshape(1, -1, 1, 1), x_scale * np.abs(w_q).max() * w_scale.max()


@pytest.mark.parametrize("op", ["fc", "conv1x1", "stem7x7", "conv3x3", "conv3x3_17"])
def test_signed_data_runs_as_offset_u8_and_stays_exact(op, rng):
    """s8 data into an FC or an unpadded conv is stored as u8 + 128 (one vpdpbusd a step instead of two) and
    the + 128 comes off in the bias: the result is the s8 computation's, to within one input quantum. A
    padded stem is padded with 128 by a pad op before it. Other padded convs keep s8 in the graph, and on
    this host (VNNI, or vpmaddubsw on bounded pairs) their kernel reads it sign-flipped, as u8 + 128
    (targets.signed_data)."""
    stored = "u8s8"
    model = _single_op_model(rng, op)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    calib = rng.standard_normal([8, *shape[1:]]).astype(np.float32)
    x = rng.standard_normal(shape).astype(np.float32)
    int8 = compiler.compile(model, target="native", calib=[calib], calib_mode="naive", bias_correction=None,
                            smooth_quant=False)
    rules = [r for r in int8.report.schedules.applied.values() if "int8" in r]
    assert rules and all(stored in r for r in rules), rules
    assert {row["dtype"] for row in int8.report.quantization.layers} == {"int8"}  # an s8 grid either way
    want, quantum = _int8_reference(model, x, calib)
    np.testing.assert_allclose(int8.run(x)[0], want, rtol=0, atol=1.01 * quantum)
