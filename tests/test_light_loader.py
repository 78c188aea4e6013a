"""Loading and running an artifact needs neither onnx nor the compiler; the metadata and the compile report are
typed, and their JSON is the format earlier versions wrote (an artifact exported before they were typed
still loads)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import compiler
from compiler.artifact import SECTION, read_metadata
from compiler.metadata import ArtifactMetadata
from compiler.report import CompileReport

DATA = Path(__file__).parent / "data"
LEGACY = DATA / "artifact_v2_mlp_avx2.so"  # exported by quantvm before the metadata was typed (tests/data/README.md)

# What only the compiler needs: none of it may be imported by a process that loads and runs.
COMPILER_ONLY = ("onnx", "relay_passes", "calib", "compiler.build", "compiler.frontend", "targets.schedules")

_LOAD_AND_RUN = """
import json, sys
import numpy as np
{imports}
model = load(sys.argv[1])
feeds = {{s.name: np.zeros(s.shape, s.dtype) for s in model.inputs}}
outputs = model.run(**feeds)
print(json.dumps({{"outputs": [list(o.shape) for o in outputs],
                  "imported": sorted(m for m in {compiler_only!r} if m in sys.modules)}}))
"""


@pytest.mark.parametrize("imports", ["from compiler import load", "from compiler.runtime import load"])
def test_a_process_that_loads_and_runs_imports_neither_onnx_nor_the_passes(digits_builds, imports):
    _, path = digits_builds["native"]
    code = _LOAD_AND_RUN.format(imports=imports, compiler_only=COMPILER_ONLY)
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"outputs": [[4, 10]], "imported": []}


def test_an_artifact_exported_before_the_metadata_was_typed_still_loads_and_runs():
    expected = np.load(DATA / "artifact_v2_mlp_avx2.npz")
    model = compiler.load(LEGACY)
    np.testing.assert_allclose(model.run(data=expected["data"])[0], expected["probs"], rtol=1e-5, atol=1e-6)
    meta = read_metadata(LEGACY)
    assert meta.target.name == "avx2" and meta.format_version == 2 and meta.precision == "fp32"
    assert [(s.name, s.shape, s.dtype) for s in meta.inputs] == [("data", (4, 32), "float32")]


def test_the_metadata_json_round_trips_byte_for_byte():
    from elftools.elf.elffile import ELFFile

    with LEGACY.open("rb") as f:
        raw = ELFFile(f).get_section_by_name(SECTION).data().rstrip(b"\0")
    written = json.loads(raw)
    assert json.dumps(ArtifactMetadata.from_json(written).to_json(), sort_keys=True).encode() == raw
    unknown = {**written, "written_by_a_later_version": {"kept": True}}  # a key this version does not know
    assert ArtifactMetadata.from_json(unknown).to_json() == unknown


def test_the_compile_report_is_typed_and_its_json_keeps_the_keys_earlier_versions_wrote(demo_model_path):
    calib = np.load(demo_model_path.parent / "digits_calib.npz")["image"][:8]
    built = compiler.compile(demo_model_path, target="native", input_shapes={"image": (8, 1, 8, 8)},
                             calib=[calib], calib_mode="naive")
    report = built.report
    assert isinstance(report, CompileReport) and report.precision == "int8" and report.kernels > 0
    assert report.quantization.calib_mode == "naive" and report.quantization.output_error["cosine"] > 0.99
    data = report.to_json()
    assert set(data) == {"rules", "fusion", "unfused_ops", "rejected", "elementwise", "kernels",
                         "layout_transforms", "schedules", "layout", "quantization", "calibration_seconds"}
    assert set(data["quantization"]) == {"calib_mode", "options", "layers", "int8_ops", "fp32_ops",
                                         "fp32_layers", "output_error", "bias_correction"}
    assert set(data["schedules"]) == {"applied", "unscheduled", "tuned"}
    assert CompileReport.from_json(json.loads(json.dumps(data))) == report
    assert built.metadata.quantization.int8_ops == report.quantization.int8_ops


def test_every_public_name_is_the_api_not_a_submodule_of_the_same_name():
    import types

    import compiler.cli  # imports most of compiler's modules, as the quantvm command does

    shadowed = [name for name in compiler.__all__ if isinstance(getattr(compiler, name), types.ModuleType)]
    assert shadowed == []
