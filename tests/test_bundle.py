"""Deploying without Python: the C API (libquantvm.so), quantvm-run, `quantvm bundle` and the C/C++ examples,
on the built-in digits model. Needs a C++ compiler (as CI machines have): without one these fail, not skip."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import compiler
from compiler.bundle import bundle
from compiler.errors import ArtifactError, QuantvmError
from compiler.runtime import load

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (4, 1, 8, 8)


@pytest.fixture(scope="module")
def builds(tmp_path_factory, demo_model_path):
    """The demo model exported for this host (fp32, int8) and for a target whose features this host lacks."""
    from compiler.demo import calibration_file
    from tests.host_targets import foreign_target

    folder = tmp_path_factory.mktemp("artifacts")
    calib = np.load(calibration_file())["image"][:40]
    native = compiler.compile(demo_model_path, target="native", input_shapes={"image": SHAPE})
    int8 = compiler.compile(demo_model_path, target="native", input_shapes={"image": SHAPE}, calib=[calib])
    name, missing = foreign_target()
    foreign = compiler.compile(demo_model_path, target=name, input_shapes={"image": SHAPE})
    return {"fp32": native.export(folder / "digits.so"), "int8": int8.export(folder / "digits_int8.so"),
            "foreign": foreign.export(folder / f"digits_{name}.so"), "foreign_missing": missing,
            "foreign_name": name}


@pytest.fixture(scope="module")
def bundled(builds, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "digits"
    result = bundle(builds["fp32"], out)
    return out, result


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    x = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
    path = tmp_path_factory.mktemp("inputs") / "image.npy"
    np.save(path, x)
    return x, path


def run_clean(command, cwd=None, **env):
    """`command` as `env -i` would run it: no PYTHONPATH, no LD_LIBRARY_PATH, only `env`."""
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, cwd=cwd,
                          env={"PATH": "/usr/bin:/bin", **env})


def test_bundle_folder_is_self_contained(bundled):
    out, result = bundled
    names = {p.name for p in out.iterdir()}
    assert names == {"digits.so", "libtvm_runtime.so", "libtvm_ffi.so", "quantvm.h", "libquantvm.so", "quantvm-run",
                     "README.md"}
    assert result.total_bytes == sum(p.stat().st_size for p in out.iterdir())
    assert result.runtime_bytes == (out / "libtvm_runtime.so").stat().st_size + (out / "libtvm_ffi.so").stat().st_size
    for binary in ("libquantvm.so", "quantvm-run"):
        dynamic = subprocess.run(["readelf", "-d", str(out / binary)], capture_output=True, text=True).stdout
        assert "[$ORIGIN]" in dynamic, dynamic
    readme = (out / "README.md").read_text()
    assert "trust" in readme and "quantvm-run digits.so --input image=" in readme
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left beside it


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_runner_without_python_matches_python_run(bundled, builds, image, tmp_path, precision):
    out, _ = bundled
    x, path = image
    artifact = builds[precision]
    result = run_clean([out / "quantvm-run", artifact, "--input", f"image={path}", "--output-dir", tmp_path / "out"])
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # TVM's "Scope Loaded" warnings are dropped, as load() drops them
    written = np.load(tmp_path / "out" / "logits.npy")
    expected = load(artifact).run(x)[0]
    assert written.dtype == expected.dtype and written.shape == expected.shape
    np.testing.assert_array_equal(written, expected)
    if precision == "fp32":  # against onnxruntime too
        import onnxruntime as ort

        from compiler.demo import demo_files

        session = ort.InferenceSession(str(demo_files()[0]), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(written, session.run(None, {"image": x})[0], rtol=1e-4, atol=1e-4)


def _root_without_python(bundle_dir: Path, root: Path) -> None:
    """A file tree with the bundle in /app and only the system libraries its binaries load (ldd): no Python,
    no /usr/bin, no /tmp."""
    shutil.copytree(bundle_dir, root / "app")
    binaries = [root / "app" / name for name in ("quantvm-run", "libquantvm.so", "libtvm_runtime.so", "libtvm_ffi.so")]
    listing = subprocess.run(["ldd", *binaries], capture_output=True, text=True, check=True).stdout
    for word in listing.split():
        if word.startswith("/") and not word.startswith(str(root)) and Path(word).is_file():
            target = root / word.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(word, target)
    (root / "out").mkdir()


def test_runner_runs_in_a_root_with_no_python_at_all(bundled, builds, image, tmp_path):
    out, _ = bundled
    root = tmp_path / "root"
    _root_without_python(out, root)
    shutil.copy(image[1], root / "app" / "image.npy")
    assert not list(root.rglob("*python*"))
    # The root gets its own /proc, as every Linux machine has (the loader resolves $ORIGIN through
    # /proc/self/exe), in private mount and pid namespaces; not root: a user namespace as well.
    namespaces = ["unshare", "--mount", "--pid", "--fork", *([] if os.geteuid() == 0 else ["--map-root-user"])]
    script = ('mount -t proc proc "$1/proc" && exec chroot "$1" /app/quantvm-run /app/digits.so '
              '--input image=/app/image.npy --output-dir /out')
    (root / "proc").mkdir()
    done = subprocess.run([*namespaces, "sh", "-c", script, "sh", str(root)], capture_output=True, text=True,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, check=False)
    assert done.returncode == 0, done.stderr
    assert "Scope Loaded" not in done.stderr  # TVM's per-constant noise is dropped without a /tmp, too
    np.testing.assert_array_equal(np.load(root / "out" / "logits.npy"), load(builds["fp32"]).run(image=image[0])[0])


def test_runner_repeat_prints_one_json_line(bundled, image):
    out, _ = bundled
    result = run_clean([out / "quantvm-run", out / "digits.so", "--input", image[1], "--repeat", "5",
                        "--threads", "1"])
    assert result.returncode == 0, result.stderr
    timing = json.loads(result.stdout)
    assert timing["repeat"] == 5 and len(timing["times_ms"]) == 5 and timing["threads"] == 1
    assert 0 < timing["min_ms"] <= timing["median_ms"]


def test_runner_refuses_bad_npy_naming_the_file(bundled, tmp_path):
    out, _ = bundled
    cases = {"f64.npy": (np.zeros(SHAPE), "dtype float64 given for input 'image', float32 expected"),
             "shape.npy": (np.zeros((2, 1, 8, 8), np.float32), "shape [2, 1, 8, 8] given"),
             "big.npy": (np.zeros(SHAPE, ">f4"), "is big-endian"),
             "fortran.npy": (np.asfortranarray(np.zeros((4, 1, 8, 8), np.float32).transpose(3, 2, 1, 0)),
                             "Fortran order")}
    for name, (array, message) in cases.items():
        np.save(tmp_path / name, array)
        result = run_clean([out / "quantvm-run", out / "digits.so", "--input", f"image={tmp_path / name}"])
        assert result.returncode == 1 and str(tmp_path / name) in result.stderr and message in result.stderr, \
            (name, result.stderr)
    result = run_clean([out / "quantvm-run", out / "digits.so", "--input", f"nope={tmp_path / 'f64.npy'}"])
    assert result.returncode == 1 and "unknown input 'nope'" in result.stderr


@pytest.fixture(scope="module")
def capi_check(bundled, tmp_path_factory):
    """tests/capi_check.c built against the bundle's quantvm.h and libquantvm.so."""
    from compiler.capi import find_compiler

    out, _ = bundled
    exe = tmp_path_factory.mktemp("capi_check") / "capi_check"
    command = [*find_compiler(), "-x", "c", str(ROOT / "tests" / "capi_check.c"), "-x", "none", f"-I{out}",
               f"-L{out}", "-lquantvm", f"-Wl,-rpath,{out}", f"-Wl,-rpath-link,{out}", "-o", str(exe)]
    subprocess.run(command, check=True)
    return exe


def check_lines(exe, mode, path) -> dict:
    result = run_clean([exe, mode, path])
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)  # never aborts
    return dict(line.split(": ", 1) for line in result.stdout.splitlines())


def test_capi_refuses_bad_files_before_loading_them(capi_check, builds, bundled, tmp_path):
    out, _ = bundled
    artifact = builds["fp32"]
    data = artifact.read_bytes()
    (tmp_path / "truncated.so").write_bytes(data[: len(data) // 2])
    (tmp_path / "headers_only.so").write_bytes(data[:64])
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF
    (tmp_path / "flipped.so").write_bytes(bytes(flipped))
    (tmp_path / "text.so").write_text("not a library\n")
    cases = {
        tmp_path / "missing.so": "-2: artifact not found: {path}",
        tmp_path / "truncated.so": "-2: {path} is truncated or damaged",
        tmp_path / "headers_only.so": "-2: {path} is truncated or damaged",
        tmp_path / "flipped.so": "-2: {path} is damaged or was modified after export",
        tmp_path / "text.so": "-2: {path} is not a quantvm artifact: not an ELF file",
        out / "libtvm_ffi.so": "-2: {path} is not a quantvm artifact: it has no .quantvm_meta section",
        tmp_path: "-2: cannot read {path}: not a regular file",
    }
    for path, message in cases.items():
        line = check_lines(capi_check, "load", path)["load"]
        assert line.startswith("error " + message.format(path=path)), (path, line)
    assert check_lines(capi_check, "load", artifact)["load"] == "ok"


def test_capi_refuses_a_host_without_the_features(capi_check, builds):
    line = check_lines(capi_check, "load", builds["foreign"])["load"]
    assert line.startswith(f"error -3: {builds['foreign']} was built for target '{builds['foreign_name']}'"), line
    assert f"lacks: {', '.join(builds['foreign_missing'])} (host: " in line  # each missing feature, named


def test_capi_misuse_is_an_error_not_a_crash(capi_check, builds):
    lines = check_lines(capi_check, "misuse", builds["fp32"])
    assert lines["load_null"] == "error -1: quantvm_load: path is NULL"
    assert lines["num_inputs_null"] == "error -1: quantvm_num_inputs: model is NULL"
    assert lines["input_info_null_model"] == "error -1: quantvm_input_info: model is NULL"
    assert lines["input_info_null_info"] == "error -1: quantvm_input_info: info is NULL"
    assert lines["input_info_range"].startswith("error -1: quantvm_input_info: index 5 out of range")
    assert lines["output_info_negative"].startswith("error -1: quantvm_output_info: index -1 out of range")
    assert lines["run_null_model"] == "error -1: quantvm_run: model is NULL"
    assert lines["run_null_inputs"] == "error -1: quantvm_run: inputs is NULL"
    assert lines["run_null_outputs"] == "error -1: quantvm_run: outputs is NULL"
    assert lines["run_null_input"] == "error -1: quantvm_run: input 0 (image) is NULL"
    assert lines["run_input_size"].startswith("error -1: quantvm_run: input 0 (image) has 1020 bytes; it takes 1024")
    assert lines["run_output_size"].startswith("error -1: quantvm_run: output 0 (logits) buffer has 164 bytes; it needs 160")
    assert lines["run_typed_dtype"].startswith("error -1: quantvm_run_typed: input 0 (image) is int8; it takes float32")
    assert lines["run_typed_null_dtypes"].startswith("error -1: quantvm_run_typed: input_dtypes is NULL")
    assert lines["run_typed"] == "ok 0"
    assert lines["run_after_errors"] == "ok 0"


def test_capi_misaligned_inputs_give_the_same_outputs(capi_check, builds):
    lines = check_lines(capi_check, "aligned", builds["fp32"])
    assert lines["run_aligned"] == "ok 0" and lines["run_misaligned"] == "ok 0" and lines["same"] == "yes"


def test_bundle_refuses_a_non_empty_folder_and_leaves_it_untouched(builds, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="exists and is not empty: pass --force"):
        bundle(builds["fp32"], out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    code = subprocess.run([sys.executable, "-m", "compiler", "bundle", str(builds["fp32"]), "-o", str(out)],
                          capture_output=True, text=True)
    assert code.returncode == 1 and "pass --force" in code.stderr


def test_failing_bundle_leaves_nothing(builds, tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(QuantvmError, match="CXX.*not an executable"):
        bundle(builds["fp32"], out)
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails after the runtime was copied in
    with pytest.raises(QuantvmError, match="building libquantvm.so failed"):
        bundle(builds["fp32"], out)
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    with pytest.raises(QuantvmError, match="building libquantvm.so failed"):
        bundle(builds["fp32"], old, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"] and (old / "keep.txt").read_text() == "mine"
    with pytest.raises(ArtifactError, match="not a quantvm artifact"):
        bundle(ROOT / "README.md", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_bundle_force_replaces_the_folder(builds, bundled, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(bundled[0], out)
    (out / "stale.txt").write_text("old")
    result = subprocess.run([sys.executable, "-m", "compiler", "bundle", str(builds["int8"]), "-o", str(out),
                             "--force"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "MiB" in result.stdout and "TVM runtime" in result.stdout
    assert not (out / "stale.txt").exists() and (out / "digits_int8.so").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


def pattern_input() -> np.ndarray:
    """The input examples/c and examples/cpp feed: element i is ((i * 7) % 13 - 6) / 4."""
    i = np.arange(int(np.prod(SHAPE)))
    return (((i * 7) % 13 - 6) / 4).astype(np.float32).reshape(SHAPE)


@pytest.mark.parametrize("example", ["c", "cpp"])
def test_examples_build_against_the_wheel_and_match_python(example, builds, tmp_path):
    folder = tmp_path / example
    shutil.copytree(ROOT / "examples" / example, folder)
    env = {**os.environ, "QUANTVM_CACHE_DIR": str(tmp_path.parent / "capi-cache"),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    make = subprocess.run(["make", f"QUANTVM={sys.executable} -m compiler"], cwd=folder, env=env,
                          capture_output=True, text=True)
    assert make.returncode == 0, make.stdout + make.stderr
    result = run_clean([folder / "example", builds["fp32"]])  # RUNPATH finds libquantvm and the wheel's runtime
    assert result.returncode == 0, result.stderr
    header, *values = result.stdout.splitlines()
    assert header == "logits float32 4 10"
    expected = load(builds["fp32"]).run(pattern_input())[0]
    np.testing.assert_array_equal(np.array(values, dtype=np.float32).reshape(expected.shape), expected)


def test_bench_times_the_runner_beside_python(tmp_path, demo_model_path):
    from compiler.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", demo_model_path, "--input-shape", "image=4,1,8,8", "--compare", "none", "--runner",
                 "--rounds", "2", "--threads", "1", "--json", out]) == 0
    section = json.loads(out.read_text())["batches"][0]
    rows = {row["name"]: row for row in section["rows"]}
    assert set(rows) == {"quantvm fp32", "quantvm-run fp32"} and rows["quantvm-run fp32"]["median_ms"] > 0
    assert [(r["contender"], r["baseline"]) for r in section["ratios"]] == [("quantvm-run fp32", "quantvm fp32")]


def test_runner_refuses_gather_indices_out_of_range(bundled, tmp_path):
    """The C API checks an input read as Gather indices as run() does (the kernel would read outside its
    table), naming the input, the value and the Gather."""
    from tests.fixtures import token_embedding

    out, _ = bundled
    artifact = compiler.compile(token_embedding(np.random.default_rng(3)), target="native").export(
        tmp_path / "embedding.so")
    feeds = {"ids": np.array([[1, -1, 9]], np.int64), "type_ids": np.array([0, 1, 1], np.int32),
             "mask": np.ones((1, 3), np.int64)}
    for name, value in feeds.items():
        np.save(tmp_path / f"{name}.npy", value)
    command = [out / "quantvm-run", artifact, *[arg for n in feeds for arg in ("--input", f"{n}={tmp_path / n}.npy")],
               "--output-dir", tmp_path / "out"]
    ok = run_clean(command)
    assert ok.returncode == 0, ok.stderr
    np.testing.assert_array_equal(np.load(next((tmp_path / "out").iterdir())), load(artifact).run(**feeds)[0])
    np.save(tmp_path / "ids.npy", np.array([[1, 10, 9]], np.int64))
    refused = run_clean(command)
    assert refused.returncode == 1 and ("input 0 (ids): value 10 at flat index 1 is out of range for Gather "
                                        "'word_gather', which takes indices in [-10, 9]") in refused.stderr, refused.stderr
