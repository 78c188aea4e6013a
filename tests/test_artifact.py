"""The exported .so: an x86-64 ELF with metadata, loadable in a fresh process, refused where it cannot run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from elftools.elf.elffile import ELFFile

import compiler
from compiler.artifact import read_metadata
from targets import missing_features, resolve_target
from tests.fixtures import MODELS, onnxruntime_outputs, random_inputs


def _elf_kind(path):
    with open(path, "rb") as f:
        elf = ELFFile(f)
        return elf["e_machine"], elf["e_type"]


@pytest.mark.parametrize("target", ["native", "cascadelake"])
def test_export_is_an_x86_64_shared_object_with_metadata(digits_builds, target):
    model, path = digits_builds[target]
    assert _elf_kind(path) == ("EM_X86_64", "ET_DYN")
    meta = read_metadata(path)
    assert meta == model.metadata
    assert meta["target"]["name"] == target
    assert meta["target"]["required_features"] == list(resolve_target(target).required_features)
    assert meta["inputs"] == [{"name": "image", "shape": [4, 1, 8, 8], "dtype": "float32"}]
    assert meta["outputs"] == [{"name": "logits", "shape": [4, 10], "dtype": "float32"}]
    assert meta["tvm_version"].startswith("0.27")
    assert len(meta["model"]["sha256"]) == 64


def test_fresh_process_loads_and_matches_onnxruntime(tmp_path, rng):
    onnx_model = MODELS["resnet_bottleneck"](rng)
    feeds = random_inputs(onnx_model, rng)
    path = compiler.compile(onnx_model, target="native").export(tmp_path / "block.so")
    np.save(tmp_path / "x.npy", feeds["data"])
    script = ("import sys, numpy as np, compiler; m = compiler.load(sys.argv[1]); "
              "np.save(sys.argv[3], m.run(data=np.load(sys.argv[2]))[0]); "
              "print('tvm.relax.frontend.onnx' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npy")], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False", "load() must not need the compiler's ONNX importer"
    assert "Scope" not in done.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), onnxruntime_outputs(onnx_model, feeds)[0],
                               rtol=1e-4, atol=1e-4)


def test_cascadelake_artifact_is_refused_by_name_on_a_host_without_its_features(digits_builds):
    model, path = digits_builds["cascadelake"]
    missing = missing_features(model.metadata["target"]["required_features"])
    images = np.zeros((4, 1, 8, 8), np.float32)
    if not missing:  # a Xeon host: the same artifact must then simply run
        native, _ = digits_builds["native"]
        np.testing.assert_allclose(compiler.load(path)(images)[0], native(images)[0], rtol=1e-5, atol=1e-5)
        return
    with pytest.raises(compiler.HostMismatchError) as err:
        compiler.load(path)
    message = str(err.value)
    assert "cascadelake" in message and str(path) in message
    assert all(feature in message for feature in missing)
    with pytest.raises(compiler.HostMismatchError, match="avx512"):
        model.run(images)


def test_running_a_foreign_cpu_artifact_never_dies_of_an_illegal_instruction(digits_builds, tmp_path):
    _, path = digits_builds["cascadelake"]
    if not missing_features(read_metadata(path)["target"]["required_features"]):
        pytest.skip("this host has AVX-512 VNNI: nothing to refuse")
    np.save(tmp_path / "x.npy", np.zeros((4, 1, 8, 8), np.float32))
    done = subprocess.run([sys.executable, "-m", "compiler", "run", str(path), "--input", str(tmp_path / "x.npy")],
                          capture_output=True, text=True)
    assert done.returncode == 1, done.stderr  # a SIGILL would be -4
    assert done.stderr.startswith("quantvm: error:") and "avx512_vnni" in done.stderr
    assert "Traceback" not in done.stderr


class _FailingExecutable:
    """Writes half a file, then fails, as a linker killed midway would."""

    def export_library(self, path, **_):
        with open(path, "wb") as f:
            f.write(b"\x7fELF half")
        raise RuntimeError("ld: killed")


def test_failed_export_leaves_nothing_and_keeps_the_good_file(digits_builds, tmp_path):
    model, good = digits_builds["native"]
    target = tmp_path / "model.so"
    target.write_bytes(good.read_bytes())
    broken = compiler.CompiledModel(_FailingExecutable(), model.metadata, 0.0)
    with pytest.raises(compiler.ArtifactError, match="ld: killed"):
        broken.export(target)
    assert target.read_bytes() == good.read_bytes()
    assert os.listdir(tmp_path) == ["model.so"]


def test_export_into_a_missing_folder_is_an_error_that_creates_nothing(digits_builds, tmp_path):
    model, _ = digits_builds["native"]
    with pytest.raises(compiler.ArtifactError, match="does not exist"):
        model.export(tmp_path / "no" / "such" / "model.so")
    assert os.listdir(tmp_path) == []


def test_export_replaces_an_existing_artifact(digits_builds, tmp_path):
    model, _ = digits_builds["native"]
    path = tmp_path / "model.so"
    path.write_text("old")
    model.export(path)
    assert read_metadata(path)["target"]["name"] == "native"


@pytest.mark.parametrize("content, words", [
    (b"just text\n", "not an ELF"),
    (b"", "not an ELF"),
])
def test_foreign_files_are_not_artifacts(tmp_path, content, words):
    path = tmp_path / "foreign.so"
    path.write_bytes(content)
    with pytest.raises(compiler.ArtifactError, match=words):
        compiler.load(path)


def test_a_shared_library_without_metadata_is_not_an_artifact(tmp_path):
    source = tmp_path / "plain.c"
    source.write_text("int answer(void) { return 42; }\n")
    lib = tmp_path / "plain.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(source)], check=True)
    with pytest.raises(compiler.ArtifactError, match="no .quantvm_meta section"):
        compiler.load(lib)


def test_missing_artifact(tmp_path):
    with pytest.raises(compiler.ArtifactError, match="not found"):
        compiler.load(tmp_path / "nope.so")


def test_newer_format_is_refused(tmp_path, digits_builds):
    from compiler.artifact import export_executable

    model, _ = digits_builds["native"]
    meta = json.loads(json.dumps(model.metadata))
    meta["format_version"] = 99
    path = export_executable(model.executable, meta, tmp_path / "future.so")
    with pytest.raises(compiler.ArtifactError, match="upgrade quantvm"):
        compiler.load(path)
