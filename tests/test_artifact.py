"""The exported .so: an x86-64 ELF with metadata, loadable in a fresh process, refused where it cannot run."""

import contextlib
import dataclasses
import errno
import hashlib
import io
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from elftools.elf.elffile import ELFFile

import compiler
from compiler.artifact import DIGEST_KEY, metadata_addon_source, read_metadata
from compiler.atomic import atomic_path
from compiler.cli import main as quantvm_main
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
    assert dataclasses.replace(meta, artifact_sha256=None) == model.metadata
    assert meta.format_version == 2 and len(meta.artifact_sha256) == 64
    assert meta.target.name == target
    assert meta.target.required_features == tuple(resolve_target(target).required_features)
    assert [s.to_json() for s in meta.inputs] == [{"name": "image", "shape": [4, 1, 8, 8], "dtype": "float32"}]
    assert [s.to_json() for s in meta.outputs] == [{"name": "logits", "shape": [4, 10], "dtype": "float32"}]
    assert meta.tvm_version.startswith("0.27")
    assert len(meta.model.sha256) == 64


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


def test_cascadelake_artifact_runs_where_the_host_has_its_features_and_is_refused_elsewhere(digits_builds):
    model, path = digits_builds["cascadelake"]
    images = np.zeros((4, 1, 8, 8), np.float32)
    if missing_features(model.metadata.target.required_features):
        with pytest.raises(compiler.HostMismatchError, match="avx512"):
            compiler.load(path)
        return
    native, _ = digits_builds["native"]  # a Xeon host: the same artifact must then simply run
    np.testing.assert_allclose(compiler.load(path)(images)[0], native(images)[0], rtol=1e-5, atol=1e-5)


def test_an_artifact_for_a_cpu_this_host_lacks_is_refused_by_name(foreign_build):
    name, missing, model, path = foreign_build
    with pytest.raises(compiler.HostMismatchError) as err:
        compiler.load(path)
    message = str(err.value)
    assert name in message and str(path) in message
    assert all(feature in message for feature in missing)
    with pytest.raises(compiler.HostMismatchError, match=missing[0]):
        model.run(np.zeros((4, 1, 8, 8), np.float32))


def test_running_a_foreign_cpu_artifact_never_dies_of_an_illegal_instruction(foreign_build, tmp_path):
    _, missing, _, path = foreign_build
    np.save(tmp_path / "x.npy", np.zeros((4, 1, 8, 8), np.float32))
    done = subprocess.run([sys.executable, "-m", "compiler", "run", str(path), "--input", str(tmp_path / "x.npy")],
                          capture_output=True, text=True)
    assert done.returncode == 1, done.stderr  # a SIGILL would be -4
    assert done.stderr.startswith("quantvm: error:") and all(feature in done.stderr for feature in missing)
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


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
    broken = compiler.CompiledModel(_FailingExecutable(), model.metadata, 0.0, model.report)
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
    assert read_metadata(path).target.name == "native"


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
    meta = dataclasses.replace(model.metadata, format_version=99)
    path = export_executable(model.executable, meta, tmp_path / "future.so")
    with pytest.raises(compiler.ArtifactError, match="upgrade quantvm"):
        compiler.load(path)


# --- integrity: the recorded SHA-256 covers the whole file but the digest's own 64 characters -------------

def _section_span(data: bytes, name: str) -> tuple[int, int]:
    section = ELFFile(io.BytesIO(data)).get_section_by_name(name)
    return section["sh_offset"], section["sh_size"]


def _flip_in(name, where=0.5):
    """Damage: one byte flipped inside section `name`, `where` of the way through it."""
    def damage(data: bytearray) -> bytearray:
        offset, size = _section_span(bytes(data), name)
        data[offset + int(size * where)] ^= 0xFF
        return data
    return damage


def _zero_range(data: bytearray) -> bytearray:
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(4096)
    return data


def _drop_a_feature(data: bytearray) -> bytearray:
    """The metadata edited to claim less than the code needs (still valid JSON, same length)."""
    edited = bytes(data).replace(b'"avx2", ', b" " * len(b'"avx2", '), 1)
    assert edited != data
    return bytearray(edited)


def _flip_digest(data: bytearray) -> bytearray:
    slot = f'"{DIGEST_KEY}": "'.encode()
    at = bytes(data).index(slot) + len(slot)
    data[at] = ord("0") if data[at] != ord("0") else ord("1")
    return data


DAMAGES = {
    "truncated": lambda data: data[:len(data) * 2 // 3],
    "truncated by one byte": lambda data: data[:-1],
    "zeroed 4 KiB": _zero_range,
    "byte flipped in .text": _flip_in(".text"),
    "byte flipped in .rodata (weights)": _flip_in(".rodata"),
    "byte flipped in .data": _flip_in(".data"),
    "feature dropped from the metadata": _drop_a_feature,
    "recorded digest changed": _flip_digest,
    "ELF magic": lambda data: bytearray(b"\0\0\0\0") + data[4:],
    "ELF header e_machine": lambda data: data[:0x12] + bytearray(b"\x03\x00") + data[0x14:],  # x86-64 -> i386
    "ELF header e_shoff": lambda data: data[:0x28] + bytearray(8) + data[0x30:],  # no section headers
}


@pytest.fixture
def never_dlopen(monkeypatch):
    """Fail the test if anything gets as far as opening a library."""
    import tvm

    def refuse(path, *_, **__):
        raise AssertionError(f"{path} was opened as a library")
    monkeypatch.setattr(tvm.runtime, "load_module", refuse)


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_artifact_is_refused_by_load_and_inspect_and_never_opened(digits_builds, tmp_path, capsys,
                                                                             never_dlopen, damage):
    _, good = digits_builds["native"]
    path = tmp_path / "model.so"
    path.write_bytes(bytes(DAMAGES[damage](bytearray(good.read_bytes()))))
    with pytest.raises(compiler.ArtifactError, match="damaged|corrupted|not an ELF") as err:
        compiler.load(path)
    assert str(path) in str(err.value)
    for flags in ([], ["--verify"], ["--json"]):
        assert quantvm_main(["inspect", *flags, str(path)]) == 1
        shown = capsys.readouterr()
        assert shown.out == ""
        assert shown.err.startswith(f"quantvm: error: {path}") and shown.err.count("\n") == 1
        assert "internal error" not in shown.err and "Traceback" not in shown.err


def test_a_refused_artifact_is_not_mapped_into_the_process(digits_builds, tmp_path):
    _, good = digits_builds["native"]
    path = tmp_path / "flipped.so"
    path.write_bytes(bytes(_flip_in(".text")(bytearray(good.read_bytes()))))
    script = ("import sys, compiler\n"
              "try:\n    compiler.load(sys.argv[1])\nexcept compiler.ArtifactError as err:\n    print(err)\n"
              "print('mapped' if sys.argv[1] in open('/proc/self/maps').read() else 'not mapped')")
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "not mapped" and "damaged" in done.stdout
    done = subprocess.run([sys.executable, "-m", "compiler", "inspect", "--verify", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"quantvm: error: {path} is damaged") and "Traceback" not in done.stderr


def test_the_digest_is_the_sha256_of_the_file_with_its_own_characters_zeroed(digits_builds, capsys):
    _, path = digits_builds["native"]
    data = path.read_bytes()
    digest = read_metadata(path).artifact_sha256
    assert data.count(digest.encode()) == 1
    assert hashlib.sha256(data.replace(digest.encode(), b"0" * 64)).hexdigest() == digest
    assert quantvm_main(["inspect", "--verify", str(path)]) == 0
    assert capsys.readouterr().out == f"integrity: sha256 {digest} verified\n"
    assert quantvm_main(["inspect", str(path)]) == 0
    assert capsys.readouterr().out.endswith(f"\nintegrity: sha256 {digest} verified\n")


def test_an_artifact_without_a_digest_must_be_re_exported(digits_builds, tmp_path):
    model, _ = digits_builds["native"]
    addon = tmp_path / "meta.c"  # what quantvm wrote before artifacts carried a digest (format 1)
    addon.write_text(metadata_addon_source(dataclasses.replace(model.metadata, format_version=1)))
    path = tmp_path / "old.so"
    model.executable.export_library(str(path), addons=[str(addon)], workspace_dir=str(tmp_path))
    with pytest.raises(compiler.ArtifactError, match=f"{path} has no integrity digest.*re-export"):
        compiler.load(path)


# --- faults while writing: nothing is left behind, the error names the path and the cause ----------------

@contextlib.contextmanager
def _tmpfs(folder, options):
    """Mount a tmpfs with `options` on `folder`; yields whether it could (root in a container may not)."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)


def _os_error(code):
    def fail(*_, **__):
        raise OSError(code, os.strerror(code))
    return fail


def test_export_to_a_full_disk_is_an_error_that_leaves_nothing(digits_builds, tmp_path, monkeypatch):
    model, _ = digits_builds["native"]
    folder = tmp_path / "disk"
    with _tmpfs(folder, "size=64k") as mounted:  # the demo artifact is ~170 KiB: the linker runs out of space
        if not mounted:  # no mount allowed: the disk fills up as the file is flushed
            monkeypatch.setattr(os, "fsync", _os_error(errno.ENOSPC))
        with pytest.raises(compiler.ArtifactError) as err:
            model.export(folder / "model.so")
        assert str(folder / "model.so") in str(err.value) and "No space left on device" in str(err.value)
        assert os.listdir(folder) == []


@pytest.mark.parametrize("write", ["export", "report"])
def test_writing_into_a_read_only_folder_is_an_error_that_leaves_nothing(digits_builds, tmp_path, monkeypatch,
                                                                         write):
    model, _ = digits_builds["native"]
    folder = tmp_path / "ro"
    with _tmpfs(folder, "ro,size=1m") as mounted:  # as root, chmod 0555 would not stop a write
        if not mounted:
            monkeypatch.setattr(tempfile, "mkstemp", _os_error(errno.EROFS))
        with pytest.raises(compiler.ArtifactError) as err:
            if write == "export":
                model.export(folder / "model.so")
            else:  # the CLI's --report, --json and run --output go through the same atomic_path
                with atomic_path(folder / "model.so") as tmp:
                    tmp.write_text("{}")
        assert str(err.value) == f"cannot write {folder / 'model.so'}: Read-only file system"
        assert os.listdir(folder) == []
