"""Calibration data at the compiled shapes: inputs whose axis 0 is not a batch (a recurrent state, a
sequence-first tensor) are used as given, samples are cut on axis 0 only where that is unambiguous, and the
errors name the input, its compiled and given shapes and what to give instead."""

import warnings

import numpy as np
import pytest

import compiler
from calib import CalibrationError
from compiler.calib_data import Replay, model_batches
from compiler.metadata import TensorSpec
from tests.fixtures import GraphBuilder, onnxruntime_outputs

AUDIO, STATE = (1, 48), (2, 1, 8)  # a streaming voice-activity model's [1, 576] audio and [2, 1, 128] state
SEQ, FRAME = (6, 1, 16), (1, 16)  # a sequence-first [T, B, C] input beside a batch-first one


def streaming_model(rng):
    """audio -> Gemm and state -> MatMul, added (the audio features broadcast over the state's layers) -> Tanh."""
    g = GraphBuilder(rng)
    features = g.gemm("audio", "audio_fc", AUDIO[1], STATE[2])
    w = g.const("state_fc.w", rng.normal(0, STATE[2] ** -0.5, (STATE[2], STATE[2])).astype(np.float32))
    mixed = g.op("Add", [g.op("MatMul", ["state", w], "state_fc"), features], "mix")
    return g.model("streaming", {"audio": AUDIO, "state": STATE}, [g.op("Tanh", [mixed], "new_state")])


def sequence_first_model(rng):
    """seq [T, 1, C] -> MatMul, plus frame [1, C] -> Gemm broadcast over T, -> Relu."""
    g = GraphBuilder(rng)
    w = g.const("seq_fc.w", rng.normal(0, SEQ[2] ** -0.5, (SEQ[2], 8)).astype(np.float32))
    mixed = g.op("Add", [g.op("MatMul", ["seq", w], "seq_fc"), g.gemm("frame", "frame_fc", FRAME[1], 8)], "mix")
    return g.model("sequence_first", {"seq": SEQ, "frame": FRAME}, [g.op("Relu", [mixed], "out")])


def _normal(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _thresholds(built) -> dict:
    return {row["name"]: row["threshold"] for row in built.report.quantization.layers}


def _relative_error(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _compile(model, calib):
    return compiler.compile(model, target="native", calib=calib, calib_mode="naive", bias_correction=None)


@pytest.fixture(scope="module")
def streaming():
    """The streaming model, its calibration batches at exactly the compiled shapes, and its int8 build."""
    rng = np.random.default_rng(15)
    model = streaming_model(rng)
    batches = [{"audio": _normal(rng, *AUDIO), "state": _normal(rng, *STATE)} for _ in range(6)]
    return model, batches, _compile(model, batches)


def test_a_state_input_calibrates_at_the_compiled_shapes_and_matches_onnxruntime(streaming):
    model, batches, built = streaming
    assert built.report.quantization.int8_ops == {"dense": 2}  # the audio and the state matmuls
    errors = [_relative_error(built.run(**feeds)[0], onnxruntime_outputs(model, feeds)[0]) for feeds in batches]
    assert max(errors) < 0.03, errors


def test_samples_on_axis_0_are_cut_beside_a_held_state(streaming):
    """One state and six audio samples in one batch calibrate as six batches of one sample with that state."""
    model, batches, _ = streaming
    state = batches[0]["state"]
    audio = np.concatenate([b["audio"] for b in batches])
    exact = _compile(model, [{"audio": a[None], "state": state} for a in audio])
    cut = _compile(model, [{"audio": audio, "state": state}])
    assert _thresholds(cut) == _thresholds(exact)
    assert len(_thresholds(cut)) == 2


def test_a_sequence_first_input_is_held_and_the_batch_first_one_cut(rng):
    model = sequence_first_model(rng)
    seqs, frames = [_normal(rng, *SEQ) for _ in range(2)], _normal(rng, 5, FRAME[1])
    exact = _compile(model, [{"seq": seq, "frame": f[None]} for seq in seqs for f in frames])
    cut = _compile(model, [{"seq": seq, "frame": frames} for seq in seqs])
    assert _thresholds(cut) == _thresholds(exact)
    assert cut.report.quantization.int8_ops == {"dense": 2}
    errors = [_relative_error(cut.run(**feeds)[0], onnxruntime_outputs(model, feeds)[0])
              for feeds in ({"seq": seq, "frame": f[None]} for seq in seqs for f in frames)]
    assert max(errors) < 0.03, errors


STREAMING_SPECS = [TensorSpec("audio", AUDIO, "float32"), TensorSpec("state", STATE, "float32")]
TWO_BATCHED_SPECS = [TensorSpec("x", (2, 16), "float32"), TensorSpec("y", (2, 4), "float32")]
SEQUENCE_SPECS = [TensorSpec("seq", SEQ, "float32"), TensorSpec("frame", FRAME, "float32")]


def test_a_batch_at_the_compiled_shapes_is_used_as_it_is(rng):
    batch = {"audio": _normal(rng, *AUDIO), "state": _normal(rng, *STATE)}
    (got,) = list(model_batches([batch], STREAMING_SPECS))
    assert all(np.array_equal(got[n], batch[n]) and got[n].shape == batch[n].shape for n in batch)


def test_each_chunk_gets_its_own_batch_s_state_and_leftovers_are_dropped(rng):
    specs = [TensorSpec("audio", (3, 48), "float32"), TensorSpec("state", STATE, "float32")]
    loader = [{"audio": _normal(rng, 7, 48), "state": _normal(rng, *STATE)} for _ in range(2)]
    with pytest.warns(UserWarning, match="2 sample"):  # one of each batch: a state is not carried over
        chunks = list(model_batches(loader, specs))
    assert len(chunks) == 4
    for i, chunk in enumerate(chunks):
        given, start = loader[i // 2], 3 * (i % 2)
        assert np.array_equal(chunk["audio"], given["audio"][start:start + 3])
        assert np.array_equal(chunk["state"], given["state"])


def test_a_held_input_whose_axis_0_is_the_batch_size_is_ambiguous(rng):
    specs = [TensorSpec("audio", (2, 48), "float32"), TensorSpec("state", STATE, "float32")]
    with pytest.raises(CalibrationError, match=r"input 'state' is given at its compiled shape \[2, 1, 8\] while "
                                               r"'audio' carries 5 samples.*ambiguous.*or give every input at its "
                                               "compiled shape"):
        list(model_batches([{"audio": _normal(rng, 5, 48), "state": _normal(rng, *STATE)}], specs))
    exact = [{"audio": _normal(rng, 2, 48), "state": _normal(rng, *STATE)} for _ in range(3)]
    assert len(list(model_batches(exact, specs))) == 3  # the way out the error gives


def test_samples_carry_over_between_batches_when_every_input_carries_samples(rng):
    x, y = _normal(rng, 6, 16), _normal(rng, 6, 4)
    loader = [{"x": x[:1], "y": y[:1]}, {"x": x[1:4], "y": y[1:4]}, {"x": x[4:], "y": y[4:]}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chunks = list(model_batches(loader, TWO_BATCHED_SPECS))
    assert [c["x"].shape for c in chunks] == [(2, 16)] * 3
    assert np.array_equal(np.concatenate([c["y"] for c in chunks]), y)


@pytest.mark.parametrize("specs, batch, words", [
    (STREAMING_SPECS, {"audio": (4, 48), "state": (4, 1, 8)},
     r"compiled axis 0 sizes differ \('audio': 1, 'state': 2\).*give input 'state' at its compiled shape "
     r"\[2, 1, 8\] in every batch"),
    (STREAMING_SPECS, {"audio": (4, 48), "state": (1, 8)},
     r"input 'state': shape \[1, 8\] does not fit the compiled shape \[2, 1, 8\]; give it at the compiled shape"),
    (STREAMING_SPECS, {"audio": (4, 48), "state": (2, 1, 9)}, r"input 'state': shape \[2, 1, 9\] does not fit"),
    (STREAMING_SPECS, {"audio": (1, 50), "state": STATE},
     r"input 'audio': shape \[1, 50\] does not fit the compiled shape \[1, 48\]; give it at the compiled shape "
     r"\[1, 48\] \(or, if its axis 0 holds samples, as \[N, 48\]\)"),
    (SEQUENCE_SPECS, {"seq": (6, 3, 16), "frame": (3, 16)},
     r"input 'seq': shape \[6, 3, 16\] does not fit the compiled shape \[6, 1, 16\]"),
    (TWO_BATCHED_SPECS, {"x": (6, 16), "y": (2, 4)},
     r"input 'y' is given at its compiled shape \[2, 4\] while 'x' carries 6 samples.*ambiguous: give input 'y' "
     "with 6 samples"),
    (TWO_BATCHED_SPECS, {"x": (6, 16), "y": (4, 4)}, r"different sample counts \('x': 6, 'y': 4\)"),
])
def test_wrong_or_ambiguous_shapes_name_the_input_and_what_to_give(specs, batch, words):
    arrays = {name: np.zeros(shape, np.float32) for name, shape in batch.items()}
    with pytest.raises(CalibrationError, match=r"calibration batch 0.*" + words):
        list(model_batches([arrays], specs))


def test_eval_data_follows_the_same_rules(rng):
    good = {"audio": _normal(rng, 3, 48), "state": _normal(rng, *STATE)}
    assert len(list(Replay([good], STREAMING_SPECS, None, "eval_data"))) == 3
    bad = {"audio": _normal(rng, 3, 48), "state": _normal(rng, 3, 1, 8)}
    with pytest.raises(CalibrationError, match=r"eval_data batch 1: .*give input 'state' at its compiled shape"):
        list(Replay([good, bad], STREAMING_SPECS, None, "eval_data"))


def test_compile_names_a_state_given_with_samples(streaming):
    model, batches, _ = streaming
    audio = np.concatenate([b["audio"] for b in batches])
    states = np.concatenate([b["state"] for b in batches])  # 12 layers' states for 6 samples: not a batch
    with pytest.raises(CalibrationError, match=r"give input 'state' at its compiled shape \[2, 1, 8\]"):
        _compile(model, [{"audio": audio, "state": states}])
