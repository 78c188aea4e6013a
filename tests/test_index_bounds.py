"""Inputs read as Gather indices: in range (negative ones included) they match onnxruntime; out of range,
run() refuses them with an InputError naming the input, the value and the Gather, as onnxruntime refuses
them (the kernel does not check: an id past an embedding's rows crashed the process)."""

import contextlib
import io

import numpy as np
import pytest

import compiler
from compiler.cli import main
from compiler.errors import InputError
from compiler.metadata import IndexBound
from tests.fixtures import onnxruntime_outputs, token_embedding


@pytest.fixture(scope="module")
def embedding(tmp_path_factory):
    model = token_embedding(np.random.default_rng(3))
    compiled = compiler.compile(model, target="native")
    return model, compiled, compiled.export(tmp_path_factory.mktemp("gather") / "embedding.so")


def _feeds(ids=(1, -1, 9), type_ids=(0, 1, -2)):
    return {"ids": np.array([ids], np.int64), "type_ids": np.array(type_ids, np.int32),
            "mask": np.array([[1, 0, 1]], np.int64)}


def test_gathered_inputs_carry_their_tables_bound_and_the_mask_none(embedding):
    _, compiled, path = embedding
    expected = {"ids": IndexBound(10, "word_gather"), "type_ids": IndexBound(2, "type_gather"), "mask": None}
    assert {spec.name: spec.index_bound for spec in compiled.inputs} == expected
    assert {spec.name: spec.index_bound for spec in compiler.load(path).inputs} == expected  # kept in the artifact


def test_indices_in_range_negative_ones_included_match_onnxruntime(embedding):
    model, compiled, path = embedding
    feeds = _feeds()
    want = onnxruntime_outputs(model, feeds)[0]
    np.testing.assert_allclose(compiled.run(**feeds)[0], want, rtol=1e-6)
    np.testing.assert_allclose(compiler.load(path).run(**feeds)[0], want, rtol=1e-6)


@pytest.mark.parametrize("name, feeds, message", [
    ("ids", _feeds(ids=(1, 10, 2)), (r"input 'ids': value 10 at \[0, 1\] is out of range for Gather 'word_gather', "
                                     r"which takes indices in \[-10, 9\]")),
    ("ids", _feeds(ids=(-11, 0, 2)), r"input 'ids': value -11 at \[0, 0\]"),
    ("ids", _feeds(ids=(0, 0, 10**12)), r"value 1000000000000 at \[0, 2\]"),
    ("type_ids", _feeds(type_ids=(0, 1, 2)), (r"input 'type_ids': value 2 at \[2\] is out of range for Gather "
                                              r"'type_gather', which takes indices in \[-2, 1\]")),
])
def test_indices_out_of_range_are_an_input_error_like_onnxruntimes(embedding, name, feeds, message):
    model, compiled, path = embedding
    for runner in (compiled, compiler.load(path)):
        with pytest.raises(InputError, match=message):
            runner.run(**feeds)
    with pytest.raises(Exception, match="out of data bounds"):  # the reference refuses it too
        onnxruntime_outputs(model, feeds)


def test_calibration_batches_out_of_range_are_a_calibration_error_naming_the_batch():
    from calib import CalibrationError

    model = token_embedding(np.random.default_rng(3))
    with pytest.raises(CalibrationError, match=r"calibration batch 1, input 'ids': value 12 at \[0, 2\] is out of "
                                               r"range for Gather 'word_gather'"):
        compiler.compile(model, target="native", calib=[_feeds(), _feeds(ids=(0, 1, 12))])


def test_compiling_a_gather_writes_no_tvm_noise_and_keeps_other_stderr(capfd):
    """TVM warns on stderr for every Gather it legalizes that out-of-range indices would crash it: quantvm
    checks the inputs' indices itself, so the line is dropped (quantvm.quiet); other output is kept."""
    import os
    import threading

    from quantvm.quiet import tvm_noise_silenced

    compiler.compile(token_embedding(np.random.default_rng(3)), target="native")
    assert "Fast mode" not in capfd.readouterr().err
    inside = threading.Event()
    with tvm_noise_silenced():
        other = threading.Thread(target=lambda: (os.write(2, b"kept\n"), inside.set()))
        other.start()
        other.join()
    assert inside.is_set() and capfd.readouterr().err == "kept\n"


def test_inspect_shows_each_inputs_index_range(embedding):
    _, _, path = embedding
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        assert main(["inspect", str(path)]) == 0
    lines = shown.getvalue().splitlines()
    assert "input:    ids [1, 3] int64, indices in [-10, 9] (word_gather)" in lines
    assert "input:    type_ids [3] int32, indices in [-2, 1] (type_gather)" in lines
    assert "input:    mask [1, 3] int64" in lines
