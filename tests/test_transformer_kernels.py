"""A transformer's kernels (targets.transformer) against numpy on each target this host runs, and their
instructions read from the assembly for other targets (AVX-512 VNNI, and AVX2-only code).

Kernels are built as a model's are: relax ops legalized by TVM (softmax, layer norm, matmul), or the fused
blocks a GELU epilogue lowers to, then scheduled by targets.schedules.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import tvm
from tvm import relax, te, tirx, topi

import targets.vector_math  # noqa: F401 - the erf and exp lowerings, as the schedules use them
from targets import resolve_target
from targets.layout import vector_lanes
from targets.legalize import legalize_overrides
from tests.host_targets import HOST_TARGETS
from tests.test_kernels import build_func as _build
from tests.test_kernels import full_range as _full_range
from tests.test_kernels import run_lib as _run
from tests.test_kernels import schedule_func as _schedule


def _legalized(op, *inputs: tuple[tuple, str], overrides=None) -> tirx.PrimFunc:
    """The PrimFunc TVM (or `overrides`: a target's LegalizeOps overrides) legalizes `op` over parameters of
    these (shape, dtype) into."""
    bb = relax.BlockBuilder()
    params = [relax.Var(f"x{i}", relax.TensorType(shape, dtype)) for i, (shape, dtype) in enumerate(inputs)]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(op(*params))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps(overrides)(bb.get())
    (func,) = [f for f in mod.functions.values() if isinstance(f, tirx.PrimFunc)]
    return func.with_attr("global_symbol", "main")


erf = np.vectorize(math.erf)


def _assembly(lib) -> str:
    return lib.mod.inspect_source("asm")


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# (shape): attention scores, a row narrower than a vector, a row that is not a multiple of one
SOFTMAX_SHAPES = [(1, 4, 32, 128), (2, 3, 8), (6, 40)]


@pytest.mark.parametrize("target", HOST_TARGETS)
@pytest.mark.parametrize("shape", SOFTMAX_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_softmax_matches_numpy(target, shape):
    spec = resolve_target(target)
    x = (np.random.default_rng(0).standard_normal(shape) * 8).astype("float32")
    x.flat[:5] = -1e30  # masked positions, as an attention mask adds them
    lib, rule = _build(_softmax_kernel(shape, spec), spec)
    assert rule == "softmax"
    np.testing.assert_allclose(_run(lib, [x], shape, "float32"), _softmax(x.astype(np.float64)), rtol=1e-5,
                               atol=1e-7)


def _softmax_kernel(shape, spec) -> tirx.PrimFunc:
    """The softmax kernel a model gets (targets.softmax's legalization)."""
    return _legalized(lambda a: relax.op.nn.softmax(a, axis=-1), (shape, "float32"),
                      overrides=legalize_overrides(vector_lanes(spec)))


def test_softmax_divides_once_per_row_not_per_element():
    """A vector division per 16 elements was a third of an attention softmax's time: the norm multiplies by
    the row's reciprocal (one scalar division, hoisted out of the row's loop)."""
    spec = resolve_target("cascadelake")
    lib, _ = _build(_softmax_kernel((1, 6, 96, 96), spec), spec)
    asm = _assembly(lib)
    assert re.search(r"\bvmulps\s+[^\n]*%zmm", asm) and not re.search(r"\bvdivps\b", asm)
    topi_lib, _ = _build(_legalized(lambda a: relax.op.nn.softmax(a, axis=-1), ((1, 6, 96, 96), "float32")), spec)
    assert re.search(r"\bvdivps\s+[^\n]*%zmm", _assembly(topi_lib))  # what the test would catch


@pytest.mark.parametrize("target", HOST_TARGETS)
def test_softmax_with_a_quantize_after_it_in_its_kernel(target):
    """softmax then u8 quantization (attention's probabilities in int8), one kernel: the quantize is
    computed in the softmax's last pass."""
    spec = resolve_target(target)
    shape = (2, 16, 64)
    x = te.placeholder(shape, "float32", name="x")
    probabilities = topi.nn.softmax(x, axis=-1)
    scaled = te.compute(x.shape, lambda *i: te.round(probabilities(*i) * tirx.const(255.0, "float32")), name="scale")
    quantized = te.compute(x.shape, lambda *i: scaled(*i).astype("uint8"), name="quantize")
    scheduled, rule = _schedule(te.create_prim_func([x, quantized]), spec)
    assert rule == "softmax"
    assert "scale" not in re.findall(r'T\.sblock\("(\w+)"\)', scheduled.script())
    data = np.random.default_rng(7).standard_normal(shape).astype("float32") * 4
    got = _run(tvm.compile(scheduled, target=spec.tvm_target()), [data], shape, "uint8")
    expected = np.round(_softmax(data.astype(np.float64)) * 255)
    assert np.abs(got.astype(np.int64) - expected).max() <= 1  # float32 against float64 at a rounding edge


@pytest.mark.parametrize("target", HOST_TARGETS)
@pytest.mark.parametrize("shape", [(1, 16, 384), (3, 40)], ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_matches_numpy(target, shape):
    spec = resolve_target(target)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 3 + 2).astype("float32")
    gamma, beta = rng.standard_normal(shape[-1:]).astype("float32"), rng.standard_normal(shape[-1:]).astype("float32")
    func = _legalized(lambda a, g, b: relax.op.nn.layer_norm(a, g, b, axes=[-1], epsilon=1e-12),
                      (shape, "float32"), (shape[-1:], "float32"), (shape[-1:], "float32"))
    lib, rule = _build(func, spec)
    assert rule == "layer_norm"
    wide = x.astype(np.float64)
    mean, var = wide.mean(-1, keepdims=True), wide.var(-1, keepdims=True)
    expected = (wide - mean) / np.sqrt(var + 1e-12) * gamma + beta
    np.testing.assert_allclose(_run(lib, [x, gamma, beta], shape, "float32"), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", HOST_TARGETS)
def test_mean_centering_is_a_row_reduction_and_matches_numpy(target):
    """A decomposed normalization's first step (x - ReduceMean(x)), as an exporter writes layer norm."""
    spec = resolve_target(target)
    x = te.placeholder((2, 24, 64), "float32", name="x")
    mean = topi.divide(topi.sum(x, axis=-1, keepdims=True), tirx.const(64.0, "float32"))
    lib, rule = _build(te.create_prim_func([x, topi.subtract(x, mean)]), spec)
    assert rule == "row_reduction"
    data = np.random.default_rng(6).standard_normal((2, 24, 64)).astype("float32") + 5
    expected = data - data.astype(np.float64).mean(-1, keepdims=True)
    np.testing.assert_allclose(_run(lib, [data], data.shape, "float32"), expected, rtol=1e-5, atol=1e-5)


def test_pooling_reductions_are_not_row_kernels():
    """A reduction over two axes (a pooling window) is not a row reduction: the window rule takes it."""
    x = te.placeholder((1, 2, 8, 8, 8), "float32", name="data")
    pooled = topi.nn.pool2d(x, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], "max", layout="NCHW8c")
    _, rule = _schedule(te.create_prim_func([x, pooled]), resolve_target("avx2"))
    assert rule == "pool_nchwc"


@pytest.mark.parametrize("target", HOST_TARGETS)
@pytest.mark.parametrize("shapes", [((1, 4, 32, 16), (1, 4, 16, 32)), ((2, 8, 64), (2, 64, 24)),
                                    ((1, 2, 24, 48), (1, 2, 48, 20)), ((1, 3, 37, 16), (1, 3, 16, 37))],
                         ids=["scores", "context", "head-of-20", "37-tokens"])
def test_fp32_batch_matmul_matches_numpy(target, shapes):
    spec = resolve_target(target)
    rng = np.random.default_rng(2)
    a, b = (rng.standard_normal(s).astype("float32") for s in shapes)
    lib, rule = _build(_legalized(relax.op.matmul, (shapes[0], "float32"), (shapes[1], "float32")), spec)
    assert rule == "batch_matmul"
    expected = a.astype(np.float64) @ b
    np.testing.assert_allclose(_run(lib, [a, b], expected.shape, "float32"), expected, rtol=1e-4, atol=1e-4)


def _int8_batch_matmul(a_dtype, shapes):
    return _legalized(lambda a, b: relax.op.matmul(a, b, out_dtype="int32"), (shapes[0], a_dtype), (shapes[1], "int8"))


@pytest.mark.parametrize("target", HOST_TARGETS)
@pytest.mark.parametrize("a_dtype", ["uint8", "int8"])
@pytest.mark.parametrize("shapes", [((1, 2, 16, 32), (1, 2, 32, 32)), ((3, 4, 8), (3, 8, 16))],
                         ids=["attention", "3d"])
def test_int8_batch_matmul_is_exact_over_the_full_range(target, a_dtype, shapes):
    """Q.K^T (s8 x s8) and P.V (u8 x s8) as the int8 rewrite emits them, the second operand packed in the
    kernel for the dot intrinsic; extremes of both ranges."""
    spec = resolve_target(target)
    rng = np.random.default_rng(3)
    a, b = _full_range(rng, shapes[0], a_dtype), _full_range(rng, shapes[1], "int8")
    lib, rule = _build(_int8_batch_matmul(a_dtype, shapes), spec)
    assert rule.startswith("batch_matmul_int8[quantvm_dot_"), rule
    expected = a.astype(np.int64) @ b.astype(np.int64)
    np.testing.assert_array_equal(_run(lib, [a, b], expected.shape, "int32"), expected)


def test_int8_batch_matmul_that_does_not_fit_the_intrinsic_is_still_exact():
    """K not a multiple of 4: plain loops, still exact."""
    spec = resolve_target("avx2")
    rng = np.random.default_rng(4)
    shapes = ((2, 5, 6), (2, 6, 16))
    a, b = _full_range(rng, shapes[0], "uint8"), _full_range(rng, shapes[1], "int8")
    lib, rule = _build(_int8_batch_matmul("uint8", shapes), spec)
    assert rule.startswith("batch_matmul_int8_"), rule
    np.testing.assert_array_equal(_run(lib, [a, b], (2, 5, 16), "int32"), a.astype(np.int64) @ b.astype(np.int64))


def _matmul_gelu(m, k, n):
    """x . w + bias, then GELU as its legalization writes it: the biased output read twice."""
    x = te.placeholder((m, k), "float32", name="x")
    w = te.placeholder((k, n), "float32", name="w")
    bias = te.placeholder((n,), "float32", name="bias")
    red = te.reduce_axis((0, k), name="k")
    mm = te.compute((m, n), lambda i, j: te.sum(x[i, red] * w[red, j], axis=red), name="matmul")
    biased = te.compute((m, n), lambda i, j: mm[i, j] + bias[j], name="T_add")
    scaled = te.compute((m, n), lambda i, j: biased[i, j] * tirx.const(0.7071067811865476, "float32"),
                        name="T_multiply")
    erfed = te.compute((m, n), lambda i, j: te.erf(scaled[i, j]), name="compute")
    half = te.compute((m, n), lambda i, j: erfed[i, j] * tirx.const(0.5, "float32"), name="T_multiply_1")
    shifted = te.compute((m, n), lambda i, j: tirx.const(0.5, "float32") + half[i, j], name="T_add1")
    out = te.compute((m, n), lambda i, j: biased[i, j] * shifted[i, j], name="T_multiply_2")
    return te.create_prim_func([x, w, bias, out])


@pytest.mark.parametrize("target", HOST_TARGETS)
def test_matmul_with_gelu_epilogue_matches_numpy_and_calls_no_erf(target):
    spec = resolve_target(target)
    rng = np.random.default_rng(5)
    m, k, n = 8, 32, 64
    x, w = rng.standard_normal((m, k)).astype("float32"), rng.standard_normal((k, n)).astype("float32") / 4
    bias = rng.standard_normal(n).astype("float32")
    scheduled, rule = _schedule(_matmul_gelu(m, k, n), spec)
    assert rule == "matmul"
    blocks = re.findall(r'T\.sblock\("(\w+)"\)', scheduled.script())
    assert "compute" not in blocks and "T_multiply" not in blocks, f"GELU left passes of its own: {blocks}"
    lib = tvm.compile(scheduled, target=spec.tvm_target())
    pre = x.astype(np.float64) @ w + bias
    expected = pre * 0.5 * (1 + erf(pre / np.sqrt(2)))
    np.testing.assert_allclose(_run(lib, [x, w, bias], (m, n), "float32"), expected, rtol=1e-5, atol=1e-5)
    asm = _assembly(lib)
    assert "erff" not in asm, "erf is still a libm call, one element at a time"


@pytest.mark.parametrize("name, function, reference", [("erf", te.erf, erf), ("exp", te.exp, np.exp)])
def test_erf_and_exp_are_vector_arithmetic_and_accurate(name, function, reference):
    spec = resolve_target("native")
    x = te.placeholder((4, 1024), "float32", name="x")
    y = te.compute(x.shape, lambda i, j: function(x[i, j]), name="y")
    lib, _ = _build(te.create_prim_func([x, y]), spec)
    values = np.linspace(-87, 87, 4096).astype("float32").reshape(4, 1024)
    got = _run(lib, [values], values.shape, "float32")
    expected = reference(values.astype(np.float64))
    np.testing.assert_allclose(got, expected, rtol=5e-7, atol=5e-7)
    assert f"{name}f" not in _assembly(lib)
    # exp's extremes: underflow to 0 (a masked attention score), overflow to inf, as expf does
    if name == "exp":
        edges = np.array([[-1e30, -200.0, 200.0, 0.0] * 256] * 4, "float32")
        expected = np.array([[0.0, 0.0, np.inf, 1.0] * 256] * 4, "float32")
        np.testing.assert_array_equal(_run(lib, [edges], edges.shape, "float32"), expected)


# (TVM itself cannot lower a float16 erf on LLVM)
@pytest.mark.parametrize("dtype, function, reference", [("float64", te.exp, np.exp), ("float64", te.erf, erf),
                                                        ("float16", te.exp, np.exp)])
def test_exp_and_erf_of_other_dtypes_keep_tvms_lowering(dtype, function, reference):
    x = te.placeholder((64,), dtype, name="x")
    y = te.compute(x.shape, lambda i: function(x[i]), name="y")
    lib, _ = _build(te.create_prim_func([x, y]), resolve_target("native"))
    values = np.linspace(-3, 3, 64).astype(dtype)
    expected = reference(values.astype(np.float64))
    np.testing.assert_allclose(_run(lib, [values], (64,), dtype), expected, rtol=2e-3 if dtype == "float16" else 1e-12)


def test_avx2_target_kernels_use_256_bit_vectors_and_its_dot_sequence():
    """AVX2 code compiled on an AVX-512 host: ymm arithmetic, and the int8 batch matmul's exact
    vpmaddwd sequence rather than VNNI (which would abort an AVX2-only CPU)."""
    spec = resolve_target("avx2")
    lib, _ = _build(_legalized(lambda a: relax.op.nn.softmax(a, axis=-1), ((4, 64), "float32")), spec)
    asm = _assembly(lib)
    assert re.search(r"\bv(max|add|mul)ps\s+[^\n]*%ymm", asm) and "%zmm" not in asm
    lib, rule = _build(_int8_batch_matmul("uint8", ((1, 2, 16, 32), (1, 2, 32, 32))), spec)
    assert rule == "batch_matmul_int8[quantvm_dot_8x4_u8s8_avx2]"
    asm = _assembly(lib)
    assert re.search(r"\bvpmaddwd\s+[^\n]*%ymm", asm) and "vpdpbusd" not in asm


@pytest.mark.parametrize("a_dtype", ["uint8", "int8"])
def test_cascadelake_int8_attention_matmul_uses_vpdpbusd(a_dtype):
    lib, rule = _build(_int8_batch_matmul(a_dtype, ((1, 12, 128, 32), (1, 12, 32, 128))), resolve_target("cascadelake"))
    assert rule == f"batch_matmul_int8[quantvm_dot_16x4_{'u8' if a_dtype == 'uint8' else 's8'}s8_vnni]"
    assert re.search(r"\bvpdpbusd\s+[^\n]*%zmm", _assembly(lib))


def test_cascadelake_softmax_and_layer_norm_use_512_bit_vectors():
    spec = resolve_target("cascadelake")
    lib, _ = _build(_softmax_kernel((1, 12, 128, 128), spec), spec)
    assert re.search(r"\bvmaxps\s+[^\n]*%zmm", _assembly(lib))
    func = _legalized(lambda a, g, b: relax.op.nn.layer_norm(a, g, b, axes=[-1]),
                      ((1, 128, 384), "float32"), ((384,), "float32"), ((384,), "float32"))
    lib, _ = _build(func, spec)
    assert re.search(r"\bvaddps\s+[^\n]*%zmm", _assembly(lib))
