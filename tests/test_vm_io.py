"""Inputs reach the VM shared or staged (compiler.vm_io), and run() still returns the model's values in arrays
of the caller's own, whatever the input's size, alignment, layout or dtype."""

import numpy as np
import pytest
from onnx import TensorProto, helper

import compiler
from compiler.vm_io import ALIGNMENT, SHARE_FROM_BYTES, InputStager, output_arrays

ROWS, COLS = 256, 512  # x: 512 KiB of float32, over SHARE_FROM_BYTES (shared when aligned)


def _model():
    """(x [ROWS, COLS], s [1, COLS]) -> (x + s, x itself, where(x > 0, x, s))."""
    nodes = [helper.make_node("Add", ["x", "s"], ["sum"]),
             helper.make_node("Identity", ["x"], ["same"]),
             helper.make_node("Greater", ["x", "zero"], ["positive"]),
             helper.make_node("Where", ["positive", "x", "s"], ["picked"])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, COLS]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, COLS])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [ROWS, COLS]) for name in ("sum", "same", "picked")],
        initializer=[helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def model():
    return compiler.compile(_model(), target="native")


def _expected(x, s):
    return [x + s, x, np.where(x > 0, x, s)]


def _aligned(array: np.ndarray, offset: int = 0) -> np.ndarray:
    """A copy of `array` whose data starts `offset` bytes past a 64-byte boundary."""
    raw = np.empty(array.nbytes + 2 * ALIGNMENT, np.uint8)
    start = (-raw.ctypes.data) % ALIGNMENT + offset
    copy = raw[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    copy[...] = array
    return copy


@pytest.mark.parametrize("offset", [0, 4, 16])
def test_large_inputs_aligned_or_not_give_the_models_values(model, rng, offset):
    x = _aligned(rng.standard_normal((ROWS, COLS)).astype(np.float32), offset)
    assert x.nbytes >= SHARE_FROM_BYTES and (x.ctypes.data % ALIGNMENT == 0) == (offset == 0)
    s = rng.standard_normal((1, COLS)).astype(np.float32)
    for got, want in zip(model.run(x, s), _expected(x, s)):
        np.testing.assert_array_equal(got, want)


def test_outputs_are_the_callers_own(model, rng):
    """An output that is the input itself, or was computed from staged inputs, survives the next run and
    does not change with the caller's input."""
    x = _aligned(rng.standard_normal((ROWS, COLS)).astype(np.float32))
    s = rng.standard_normal((1, COLS)).astype(np.float32)
    first = model.run(x, s)
    want = _expected(x.copy(), s.copy())
    for out in first:
        assert not np.shares_memory(out, x) and not np.shares_memory(out, s)
    x[...] = 7.0
    model.run(x, -s)  # the same staging tensors and VM, other values
    for got, expected in zip(first, want):
        np.testing.assert_array_equal(got, expected)


def test_a_non_contiguous_input(model, rng):
    x = np.asfortranarray(rng.standard_normal((ROWS, COLS)).astype(np.float32))
    s = rng.standard_normal((2, COLS)).astype(np.float32)[::2]  # a strided view
    for got, want in zip(model.run(x=x, s=s), _expected(x, s)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", ["bool", "int64", "float16", "uint8"])
def test_the_stager_keeps_dtype_shape_and_values(dtype, rng):
    stager = InputStager(2)
    for shape in [(3, 5), (7,), ()]:  # a new shape re-stages the slot
        small = (rng.standard_normal(shape) > 0).astype(dtype)
        large = rng.integers(0, 2, (SHARE_FROM_BYTES // np.dtype(dtype).itemsize + 1,)).astype(dtype)
        tensors = stager.tensors([small, large])
        for tensor, array in zip(tensors, [small, large]):
            assert tensor.shape == array.shape and str(tensor.dtype) == dtype
            np.testing.assert_array_equal(tensor.numpy(), array)
        np.testing.assert_array_equal(output_arrays(tensors)[0], small)
