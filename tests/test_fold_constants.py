"""Constant folding in numpy (relay_passes.fold_constants): the same constants as TVM's FoldConstant, bit for
bit, on what a BatchNorm and a blocked weight layout leave; what it must leave to FoldConstant; and a
conv + BatchNorm network against onnxruntime."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.ir.expr import GenericConst

import compiler
from relay_passes.analysis import op_name
from relay_passes.fold_constants import FoldConstantsInNumpy
from tests.fixtures import onnxruntime_outputs, random_inputs

CHANNELS = 20  # not a multiple of the 8-lane block: the layout transform pads


def _module(extra=None):
    """main(x) = (x - mean) / sqrt(var + eps) * gamma + beta, a BatchNorm in its inference form with its
    parameters expanded to [C, 1, 1], and a conv weight put in OIHW8i8o (padded), as outputs; and
    `extra(x)`'s value last."""
    rng = np.random.default_rng(3)
    mean, gamma, beta = (rng.standard_normal(CHANNELS).astype(np.float32) for _ in range(3))
    var = rng.random(CHANNELS).astype(np.float32)
    weight = rng.standard_normal((CHANNELS, 12, 3, 3)).astype(np.float32)
    x = relax.Var("x", relax.TensorType((1, CHANNELS, 4, 4), "float32"))
    bb = relax.BlockBuilder()

    def per_channel(values):
        return bb.emit(relax.op.expand_dims(relax.const(values), [1, 2]))

    with bb.function("main", [x]):
        with bb.dataflow():
            root = bb.emit(relax.op.sqrt(relax.op.add(relax.const(var), relax.const(np.float32(1e-5)))))
            scale = bb.emit(relax.op.divide(per_channel(gamma), relax.op.reshape(root, (CHANNELS, 1, 1))))
            centred = bb.emit(relax.op.subtract(x, per_channel(mean)))
            normed = bb.emit(relax.op.add(relax.op.multiply(centred, scale), per_channel(beta)))
            packed = bb.emit(relax.op.layout_transform(
                relax.const(weight), lambda o, i, h, w: (o // 8, i // 8, h, w, i % 8, o % 8), pad_value=0.0))
            transposed = bb.emit(relax.op.permute_dims(relax.const(weight), [1, 0, 3, 2]))
            rsqrt = bb.emit(relax.op.rsqrt(relax.const(var)))
            outputs = [normed, packed, transposed, rsqrt] + ([bb.emit(extra(x))] if extra else [])
            out = bb.emit_output(relax.Tuple(outputs))
        bb.emit_func_output(out)
    return bb.get()


def _folded_outputs(mod):
    """The function's outputs that are constants after dead code elimination: their arrays, by position."""
    mod = relax.transform.DeadCodeElimination()(relax.transform.CanonicalizeBindings()(mod))
    body = mod["main"].body
    bound = {b.var: b.value for block in body.blocks for b in block.bindings}
    fields = bound.get(body.body, body.body).fields
    return [bound.get(f, f) for f in fields]


def _calls_on_constants(mod) -> list[str]:
    bound, found = {}, []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            bound[binding.var] = binding.value
            value = binding.value
            if isinstance(value, relax.Call) and all(isinstance(bound.get(a, a), GenericConst) for a in value.args[:1]):
                found.append(op_name(value))
    return found


def test_folds_as_tvm_folds_bit_for_bit():
    mod = _module()
    ours = _folded_outputs(FoldConstantsInNumpy(mod))
    reference = _folded_outputs(relax.transform.FoldConstant()(mod))
    assert _calls_on_constants(relax.transform.DeadCodeElimination()(FoldConstantsInNumpy(mod))) == []
    for position in (1, 2, 3):  # the weight put in blocks, the transposed weight, the rsqrt
        assert isinstance(ours[position], GenericConst)
        np.testing.assert_array_equal(ours[position].value.numpy(), reference[position].value.numpy())
    packed = ours[1].value.numpy()
    assert packed.shape == (3, 2, 3, 3, 8, 8)
    assert not packed[2, :, :, :, :, 4:].any() and not packed[:, 1, :, :, 4:, :].any()  # the padding is zero


def test_normalization_matches_fold_constant_on_data():
    mod = _module()
    x = np.random.default_rng(0).standard_normal((1, CHANNELS, 4, 4)).astype(np.float32)
    results = []
    for folded in (FoldConstantsInNumpy(mod), relax.transform.FoldConstant()(mod)):
        executable = relax.build(folded, "llvm")
        vm = relax.VirtualMachine(executable, tvm.cpu())
        results.append(vm["main"](x)[0].numpy())
    np.testing.assert_array_equal(results[0], results[1])


def _ints(values):
    return relax.const(np.array(values, dtype=np.int64))


GRID = np.arange(30, dtype=np.float32).reshape(5, 6) - 7.5
CASES = {
    "strided_slice": lambda x: relax.op.strided_slice(relax.const(GRID), [0, 1], [1, -4], [100, 6], [2, 1]),
    "strided_slice_backwards": lambda x: relax.op.strided_slice(relax.const(GRID), [1], [-1], [0], [-2]),
    "take": lambda x: relax.op.take(relax.const(GRID), _ints([4, 0, 2]), axis=0),
    "take_columns": lambda x: relax.op.take(relax.const(GRID), _ints([[5, 1], [0, 0]]), axis=1),
    "scatter_nd_update": lambda x: relax.op.scatter_nd(relax.const(GRID), _ints([[1, 2], [4, 0]]),
                                                       relax.const(np.array([7, 8], np.float32))),
    "scatter_nd_add": lambda x: relax.op.scatter_nd(relax.const(GRID), _ints([[1], [3]]),
                                                    relax.const(np.ones((2, 6), np.float32)), "add"),
    "shape_of_a_tensor": lambda x: relax.op.shape_to_tensor(relax.op.shape_of(x)),
    "index_made_positive": lambda x: relax.op.where(relax.op.less(_ints([-1, 2]), _ints(0)),
                                                    relax.op.add(_ints([-1, 2]), _ints(5)), _ints([-1, 2])),
    "cast_and_compare": lambda x: relax.op.logical_not(relax.op.equal(relax.op.astype(relax.const(GRID), "int32"),
                                                                      relax.const(np.int32(3)))),
    "broadcast": lambda x: relax.op.broadcast_to(relax.const(np.arange(6, dtype=np.float32)), (2, 5, 6)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_shape_and_index_arithmetic_folds_as_tvm_folds(case):
    """What exporters leave on constants (Swin-T's attention mask), each op folded here as FoldConstant does."""
    mod = _module(CASES[case])
    ours = relax.transform.DeadCodeElimination()(FoldConstantsInNumpy(mod))
    assert _calls_on_constants(ours) == []
    expected = _folded_outputs(relax.transform.FoldConstant()(mod))[-1]
    got = _folded_outputs(ours)[-1]
    assert isinstance(got, GenericConst) and isinstance(expected, GenericConst)
    np.testing.assert_array_equal(got.value.numpy(), expected.value.numpy())
    assert got.value.numpy().dtype == expected.value.numpy().dtype


def test_out_of_range_take_is_left_alone():
    """An index past the end is an error at run time, not a value to fold."""
    mod = _module(lambda x: relax.op.take(relax.const(GRID), _ints([7]), axis=0))
    assert "relax.take" in _calls_on_constants(relax.transform.DeadCodeElimination()(FoldConstantsInNumpy(mod)))


def test_leaves_integer_division_to_fold_constant():
    """Integer division and dtypes mixed by the op are Relax's own rules: left to FoldConstant."""
    def int_divide(x):
        return relax.op.divide(relax.const(np.array([7, -7], np.int32)), relax.const(np.array([2, 2], np.int32)))

    folded = relax.transform.DeadCodeElimination()(FoldConstantsInNumpy(_module(int_divide)))
    assert _calls_on_constants(folded) == ["relax.divide"]


def _batchnorm_network(path):
    """Eight conv + BatchNorm + ReLU layers on a 1x3x16x16 input, saved at `path`; the model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    nodes, inits, channels, name = [], [], 3, "x"
    for i in range(8):
        inits += [numpy_helper.from_array(rng.standard_normal((16, channels, 3, 3)).astype(np.float32) * 0.3, f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), f"g{i}"),
                  numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), f"b{i}"),
                  numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), f"m{i}"),
                  numpy_helper.from_array(rng.random(16).astype(np.float32) + 0.5, f"v{i}")]
        nodes += [helper.make_node("Conv", [name, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"),
                  helper.make_node("BatchNormalization", [f"c{i}", f"g{i}", f"b{i}", f"m{i}", f"v{i}"], [f"n{i}"],
                                   name=f"bn{i}"),
                  helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}")]
        channels, name = 16, f"r{i}"
    graph = helper.make_graph(nodes, "bn_net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 16, 16, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, path)
    return model


def test_batchnorm_network_matches_onnxruntime(tmp_path):
    """Eight conv + BatchNorm layers, their constants folded here (padded to blocks of 8 on AVX2): the build
    matches onnxruntime."""
    path = tmp_path / "bn_net.onnx"
    model = _batchnorm_network(path)
    inputs = random_inputs(model, np.random.default_rng(2))
    compiled = compiler.compile(str(path), target="avx2", num_threads=1)
    expected = onnxruntime_outputs(model, inputs)[0]
    got = compiled(**inputs)
    got = got[0] if isinstance(got, (list, tuple)) else got
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("target", ["avx2", "cascadelake"])
@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_blocked_weights_are_the_graph_fold_constant_makes(tmp_path, target, int8):
    """The layout phase with this folding gives the very graph TVM's FoldConstant gives: every weight layout
    (OIHW8i8o, the int8 dot packings OIHW8o4i and OIHW16o4i) packed alike, on a target this host may lack."""
    from compiler.build import prepare_model
    from compiler.int8_options import QuantizationOptions
    from relay_passes.fold_constants import fold_constants
    from targets import block_channels, resolve_target

    path = tmp_path / "bn_net.onnx"
    _batchnorm_network(path)
    spec = resolve_target(target)
    options = QuantizationOptions(calib_mode="none") if int8 else QuantizationOptions()  # int8 needs no data
    job = prepare_model(str(path), None, None, True, None, options, 1, spec=spec)
    ours, _ = block_channels(job.build.mod, spec, fold_constants())
    reference, _ = block_channels(job.build.mod, spec)
    assert any(str(c.value.numpy().dtype) == ("int8" if int8 else "float32") and c.value.numpy().ndim == 6
               for c in _constants(ours))  # the blocked weights are there, folded
    tvm.ir.assert_structural_equal(ours, reference, map_free_vars=True)


def _constants(mod) -> list:
    found = []
    relax.analysis.post_order_visit(mod["main"], lambda e: found.append(e) if isinstance(e, GenericConst) else None)
    return found
