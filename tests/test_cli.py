"""The quantvm command, run as a user runs it."""

import shlex
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

from tests.fixtures import MODELS, random_inputs


def quantvm(*args, check=True):
    done = subprocess.run([sys.executable, "-m", "compiler", *map(str, args)], capture_output=True, text=True)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def test_console_script_is_installed():
    assert shutil.which("quantvm"), "pip install should put the quantvm command on PATH"


@pytest.mark.parametrize("command", ["compile", "tune", "run", "inspect", "bench", "analyze", "demo", "profile"])
def test_every_command_has_help(command):
    done = quantvm(command, "--help")
    assert "usage: quantvm " + command in done.stdout


def test_compile_inspect_run_round_trip(tmp_path, rng, demo_model_path):
    so = tmp_path / "digits.so"
    done = quantvm("compile", demo_model_path, "-t", "native", "-o", so, "--input-shape", "image=2,1,8,8")
    assert f"-> {so}" in done.stdout
    shown = quantvm("inspect", so).stdout
    assert "target:   native" in shown and "input:    image [2, 1, 8, 8] float32" in shown
    images = rng.uniform(0, 1, (2, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", images)
    quantvm("run", so, "--input", f"image={tmp_path / 'x.npy'}", "--output", tmp_path / "y.npz")
    expected = ReferenceEvaluator(str(demo_model_path)).run(None, {"image": images})[0]
    np.testing.assert_allclose(np.load(tmp_path / "y.npz")["logits"], expected, rtol=1e-4, atol=1e-5)


def test_cascadelake_compile_and_inspect_show_target_and_features(tmp_path, rng):
    model_path = tmp_path / "mlp.onnx"
    onnx.save(MODELS["mlp"](rng), model_path)
    so = tmp_path / "mlp_clx.so"
    quantvm("compile", model_path, "-t", "llvm -mcpu=cascadelake", "-o", so)
    shown = quantvm("inspect", so).stdout
    assert "target:   cascadelake (mcpu cascadelake)" in shown
    features = next(line for line in shown.splitlines() if line.startswith("features:")).split()[1:]
    assert {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= set(features)
    import json

    assert json.loads(quantvm("inspect", so, "--json").stdout)["target"]["name"] == "cascadelake"


@pytest.mark.parametrize("args, words", [
    (["compile", "missing.onnx", "-t", "native", "-o", "x.so"], "model file not found: missing.onnx"),
    (["compile", "m.onnx", "-t", "pentium", "-o", "x.so"], "unknown target 'pentium'"),
    (["inspect", "nothing.so"], "artifact not found: nothing.so"),
    (["run", "nothing.so", "--input", "x.npy"], "artifact not found"),
    (["tune", "m.onnx", "-t", "native", "--db", "db", "--rpc", "nohost"], "expected TRACKER_HOST:PORT:KEY"),
    (["compile", "m.onnx", "-t", "native", "-o", "x.so", "--tuning-db", "nothing"], "tuning database nothing: no such"),
])
def test_errors_are_one_line_without_traceback(tmp_path, args, words):
    (tmp_path / "m.onnx").write_bytes(b"")
    done = subprocess.run([sys.executable, "-m", "compiler", *args], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("quantvm: error: ")
    assert words in done.stderr


def test_verbose_shows_the_traceback(tmp_path):
    done = quantvm("--verbose", "inspect", tmp_path / "nothing.so", check=False)
    assert done.returncode == 1 and "Traceback" in done.stderr


def test_bad_input_shape_syntax_is_a_usage_error(tmp_path):
    done = quantvm("compile", "m.onnx", "-o", "x.so", "--input-shape", "data=1,x", check=False)
    assert done.returncode == 2 and "NAME=D0,D1" in done.stderr


def test_run_names_a_wrong_input(tmp_path, rng):
    model = MODELS["mlp"](rng)
    model_path, so = tmp_path / "mlp.onnx", tmp_path / "mlp.so"
    onnx.save(model, model_path)
    quantvm("compile", model_path, "-t", "native", "-o", so)
    np.save(tmp_path / "x.npy", random_inputs(model, rng)["data"][:1])
    done = quantvm("run", so, "--input", f"data={tmp_path / 'x.npy'}", check=False)
    assert done.returncode == 1 and "input 'data': shape [1, 32] given, [4, 32] expected" in done.stderr


def test_demo_passes():
    done = subprocess.run(["quantvm", "demo"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "accuracy 99" in done.stdout
    assert "refused on this host" in done.stdout or "this host can run it" in done.stdout
    assert "demo passed" in done.stdout


def test_bench_times_fused_unfused_and_onnxruntime(tmp_path, demo_model_path):
    import json

    done = quantvm("bench", demo_model_path, "--input-shape", "image=2,1,8,8", "--rounds", "3", "--no-fuse",
                   "--json", tmp_path / "bench.json")
    assert "quantvm fp32 --no-fuse" in done.stdout and "onnxruntime fp32" in done.stdout
    result = json.loads((tmp_path / "bench.json").read_text())["batches"][0]
    assert [r["name"] for r in result["rows"]] == ["quantvm fp32", "quantvm fp32 --no-fuse", "onnxruntime fp32"]
    assert all(r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] for r in result["rows"])
    assert result["batch"] == 2 and result["rows"][0]["speedup_of_first_row"] == 1.0


def test_bench_int8_against_onnxruntime_int8(tmp_path, demo_model_path):
    import json

    from compiler.demo import calibration_file

    done = quantvm("bench", demo_model_path, "--input-shape", "image=32,1,8,8", "--rounds", "2", "--int8",
                   "--calib", calibration_file(), "--calib-mode", "naive", "--json", tmp_path / "b.json")
    assert "WARNING" not in done.stderr
    section = json.loads((tmp_path / "b.json").read_text())["batches"][0]
    rows = [r["name"] for r in section["rows"]]
    assert rows == ["quantvm int8", "quantvm fp32", "onnxruntime int8", "onnxruntime fp32"]
    assert [(r["contender"], r["baseline"]) for r in section["ratios"]] == [
        ("quantvm fp32", "onnxruntime fp32"), ("quantvm int8", "onnxruntime int8"), ("quantvm int8", "quantvm fp32")]
    assert "speedup quantvm int8 vs quantvm fp32: " in done.stdout
    missing = quantvm("bench", demo_model_path, "--int8", check=False)
    assert missing.returncode == 1 and "--int8 needs --calib" in missing.stderr


def _medians(section) -> dict:
    return {row["name"]: row["median_ms"] for row in section["rows"]}


def test_bench_at_several_batch_sizes_quantvm_alone(tmp_path, demo_model_path):
    import json

    done = quantvm("bench", demo_model_path, "--batch", "1,2", "--compare", "none", "--threads", "1",
                   "--rounds", "3", "--json", tmp_path / "b.json")
    typed = ["quantvm", "bench", demo_model_path, "--batch", "1,2", "--compare", "none", "--threads", "1",
             "--rounds", "3", "--json", tmp_path / "b.json"]
    assert done.stdout.splitlines()[0] == shlex.join(map(str, typed))  # printed first, to paste with the results
    assert "1 thread(s) for every contender" in done.stdout and "onnxruntime" not in done.stdout
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["threads"] == 1 and result["compare"] == "none" and result["command"] == done.stdout.splitlines()[0]
    assert [s["batch"] for s in result["batches"]] == [1, 2]
    assert [s["inputs"][0]["shape"] for s in result["batches"]] == [[1, 1, 8, 8], [2, 1, 8, 8]]
    for section in result["batches"]:
        assert f"batch {section['batch']} (image [{section['batch']}, 1, 8, 8])" in done.stdout
        (row,) = section["rows"]
        assert row["name"] == "quantvm fp32" and 0 < row["median_ms"] <= row["p90_ms"]
        assert row["throughput"] == pytest.approx(section["batch"] / (row["median_ms"] / 1e3))
        assert section["ratios"] == []


def test_bench_batch_overrides_the_input_shape_and_compares_with_onnxruntime(tmp_path, demo_model_path):
    import json

    done = quantvm("bench", demo_model_path, "--input-shape", "image=5,1,8,8", "--batch", "3", "--threads", "2",
                   "--rounds", "3", "--json", tmp_path / "b.json")
    result = json.loads((tmp_path / "b.json").read_text())
    (section,) = result["batches"]
    assert result["threads"] == 2 and section["batch"] == 3 and section["inputs"][0]["shape"] == [3, 1, 8, 8]
    medians = _medians(section)
    assert list(medians) == ["quantvm fp32", "onnxruntime fp32"] and min(medians.values()) > 0
    (ratio,) = section["ratios"]
    assert (ratio["contender"], ratio["baseline"]) == ("quantvm fp32", "onnxruntime fp32")
    assert ratio["speedup"] == pytest.approx(medians["onnxruntime fp32"] / medians["quantvm fp32"])
    assert f"speedup quantvm fp32 vs onnxruntime fp32: {ratio['speedup']:.3g}x" in done.stdout


def test_bench_rounds_give_each_contender_a_settled_block_in_turn():
    """Each round, each contender runs a block (untimed calls until the other's threads settle, then timed
    calls), starting one contender later each round; every timed call is recorded."""
    import time

    from compiler.bench import BLOCK_SECONDS, SETTLE_SECONDS, Contender, interleave

    calls = []

    def contender(name):
        def run(_feeds):
            calls.append(name)
            time.sleep(0.01)
        return Contender(name, run)

    contenders = [contender(name) for name in "abc"]
    interleave(contenders, {}, rounds=3, warmup=0)
    blocks = [name for i, name in enumerate(calls) if i == 0 or calls[i - 1] != name]
    assert blocks == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    for c in contenders:
        assert sum(c.seconds) >= 3 * BLOCK_SECONDS
        assert len(c.seconds) >= 3 * 3  # several timed calls per block, not one
    untimed = len(calls) - sum(len(c.seconds) for c in contenders)
    assert untimed >= 9 * int(SETTLE_SECONDS / 0.02)


@pytest.mark.parametrize("args, words", [
    (["--batch", "1,0"], "batch sizes >= 1"), (["--batch", "1,x"], "batch sizes >= 1"),
    (["--threads", "0"], "whole number >= 1"), (["--compare", "tensorrt"], "invalid choice"),
])
def test_bench_usage_errors(demo_model_path, args, words):
    done = quantvm("bench", demo_model_path, *args, check=False)
    assert done.returncode == 2 and words in done.stderr


def test_compile_report_json_and_no_fuse(tmp_path, demo_model_path):
    import json

    fused_report, unfused_report = tmp_path / "fused.json", tmp_path / "unfused.json"
    done = quantvm("compile", demo_model_path, "-t", "native", "-o", tmp_path / "a.so",
                   "--input-shape", "image=1,1,8,8", "--report", fused_report)
    assert "fused:   conv_bn_sum_act x1, conv_bn_act x3, fc_bias x1" in done.stdout
    fused = json.loads(fused_report.read_text())
    # (the one-channel image is zero-padded to a channel block for the stem conv)
    assert fused["fusion"]["conv_bn_act"] == 3
    assert fused["unfused_ops"] == {"max_pool2d": 1, "mean": 1, "reshape": 1}
    quantvm("compile", demo_model_path, "-t", "native", "-o", tmp_path / "b.so", "--input-shape", "image=1,1,8,8",
            "--no-fuse", "--report", unfused_report)
    unfused = json.loads(unfused_report.read_text())
    assert unfused["fusion"] == {} and unfused["unfused_ops"]["conv2d"] == 4 and unfused["unfused_ops"]["relu"] == 4
    assert unfused["kernels"] > fused["kernels"]


def test_int8_compile_from_an_npz_writes_the_layer_report(tmp_path, demo_model_path):
    import json

    from compiler.demo import calibration_file

    report = tmp_path / "int8.json"
    done = quantvm("compile", demo_model_path, "-t", "native", "-o", tmp_path / "int8.so",
                   "--input-shape", "image=32,1,8,8", "--calib", calibration_file(), "--calib-mode", "percentile",
                   "--calib-batches", "4", "--exclude-operators", "Gemm", "--report", report)
    assert "int8:    {'conv2d': 4, 'avg_pool': 1} (percentile calibration" in done.stdout
    assert "head.gemm" in done.stdout and "excluded by op type" in done.stdout
    data = json.loads(report.read_text())["quantization"]
    assert data["int8_ops"] == {"conv2d": 4, "avg_pool": 1} and data["fp32_ops"] == {"dense": 1}
    assert {row["name"] for row in data["layers"]} == {"stem.conv", "block_a.conv", "block_b.conv", "wide.conv", "gap"}
    assert all(set(row) >= {"dtype", "threshold", "sqnr_db", "cosine"} for row in data["layers"])
    assert "precision: int8" in quantvm("inspect", tmp_path / "int8.so").stdout


def test_bad_calibration_file_is_one_line(tmp_path, demo_model_path):
    bad = tmp_path / "calib.npz"
    bad.write_text("not an npz")
    done = quantvm("compile", demo_model_path, "-t", "native", "-o", tmp_path / "x.so", "--input-shape",
                   "image=32,1,8,8", "--calib", bad, check=False)
    assert done.returncode == 1 and "--calib" in done.stderr and done.stderr.count("\n") == 1
    assert not (tmp_path / "x.so").exists()


def test_tune_then_compile_and_bench_with_the_database(tmp_path, demo_model_path):
    import json

    db = tmp_path / "db"
    shape = ("--input-shape", "image=8,1,8,8")
    done = quantvm("tune", demo_model_path, "-t", "native", "--trials", "4", "--db", db, *shape,
                   "--json", tmp_path / "t.json")
    assert "measuring the default schedule of" in done.stderr and "trials" in done.stderr  # progress
    assert "kernel time of the tuned kernels: default" in done.stdout
    tuned = json.loads((tmp_path / "t.json").read_text())
    assert tuned["tasks"] and all(t["default_ms"] and t["best_ms"] <= t["default_ms"] for t in tuned["tasks"])
    again = quantvm("tune", demo_model_path, "-t", "native", "--trials", "0", "--db", db, *shape)
    assert "measuring the default" not in again.stderr  # resumed: the records are there
    report = tmp_path / "r.json"
    compiled = quantvm("compile", demo_model_path, "-t", "native", "-o", tmp_path / "m.so", "--tuning-db", db,
                       *shape, "--report", report)
    assert f"kernel(s) from {db}" in compiled.stdout and not compiled.stderr.strip()
    assert sorted(json.loads(report.read_text())["tuning"]["tuned_kernels"]) == sorted(t["name"] for t in tuned["tasks"])
    bench = quantvm("bench", demo_model_path, *shape, "--rounds", "2", "--compare", "none", "--tuning-db", db)
    assert "speedup quantvm fp32 tuned vs quantvm fp32: " in bench.stdout
    other_batch = quantvm("bench", demo_model_path, "--input-shape", "image=2,1,8,8", "--rounds", "2",
                          "--compare", "none", "--tuning-db", db, check=False)
    assert other_batch.returncode == 1 and "image [8, 1, 8, 8]" in other_batch.stderr


@pytest.mark.parametrize("dynamic", [False, True])
def test_onnxruntime_int8_peer_runs_an_opset_11_conv_model(rng, dynamic, tmp_path):
    """onnxruntime's quantizer writes per-channel DequantizeLinear (opset 13) into an opset 11 model, which
    then fails to load, and its shape inference stops at a dynamic dim (PP-OCR's detector): the peer
    quantizes a copy at opset 13 with the timed shapes fixed, and its int8 stays near its fp32."""
    from compiler.peers import _quantizable_copy, onnxruntime_contender, onnxruntime_int8_contender
    from tests.fixtures import GraphBuilder

    g = GraphBuilder(rng)
    y = g.op("Relu", [g.conv("x", "c1", 8, 16, k=3, bias=True)], "r1")
    model = g.model("opset11", {"x": (1, 8, 10, 10)}, [g.conv(y, "c2", 16, 8, k=1, bias=True)], opset=11)
    batches = [random_inputs(model, rng) for _ in range(4)]
    if dynamic:  # batch, height and width named, as PaddleOCR's exports leave them
        for dim, name in zip(model.graph.input[0].type.tensor_type.shape.dim, ["n", None, "h", "w"]):
            if name:
                dim.dim_param = name
        copy = onnx.load(_quantizable_copy(None, model, batches[0], str(tmp_path)))
        assert [d.dim_value for d in copy.graph.input[0].type.tensor_type.shape.dim] == [1, 8, 10, 10]
        assert copy.opset_import[0].version == 13
    int8 = onnxruntime_int8_contender(None, model, batches, 1)
    fp32 = onnxruntime_contender(model.SerializeToString(), 1)
    got, expected = int8.run(batches[0])[0], fp32.run(batches[0])[0]
    assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max()


def test_onnxruntime_int8_peer_quantizes_without_its_failing_pre_processing_and_leaves_no_file(
        rng, monkeypatch, tmp_path):
    """onnxruntime's symbolic shape inference, failing, saves its partial model into the working directory and
    raises: the peer quantizes without that step and removes what it left."""
    import onnxruntime.quantization.shape_inference as ort_shape_inference

    from compiler.peers import ORT_FAILED_INFERENCE_FILES, onnxruntime_int8_contender
    from tests.fixtures import GraphBuilder

    def failing_pre_process(source, prepared):
        onnx.save(onnx.load(source), ORT_FAILED_INFERENCE_FILES[0])
        raise Exception("Incomplete symbolic shape inference")

    monkeypatch.setattr(ort_shape_inference, "quant_pre_process", failing_pre_process)
    g = GraphBuilder(rng)
    model = g.model("conv", {"x": (1, 8, 10, 10)}, [g.conv("x", "c1", 8, 16, k=3, bias=True)])
    path = tmp_path / "conv.onnx"
    onnx.save(model, path)
    working = tmp_path / "working"
    working.mkdir()
    monkeypatch.chdir(working)
    batches = [random_inputs(model, rng) for _ in range(2)]
    int8 = onnxruntime_int8_contender(path, model, batches, 1)
    assert int8 is not None and int8.run(batches[0])[0].shape == (1, 16, 10, 10)
    assert list(working.iterdir()) == []
