"""fp32 FC weights packed [N/lanes, K, lanes] (targets.layout.pack_dense_weights) and read packed by the
matmul rule: the numbers are onnxruntime's, whatever the shapes."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

import re

import compiler
from compiler.frontend import import_onnx
from relay_passes import prepare_graph
from targets.layout import pack_dense_weights, vector_lanes
from targets.registry import resolve_target
from tests.fixtures import GraphBuilder, onnxruntime_outputs, random_inputs
from tests.host_targets import HOST_TARGETS
from tests.test_kernels import run_lib
from tests.test_transformer_kernels import _assembly, _build, _legalized

MAX_RELATIVE_ERROR = 1e-4


def _matmul_model(rng, x_shape: tuple, n: int, gemm: bool):
    """x @ w + b then ReLU (a MatMul as a transformer's FC is exported), or a Gemm with its weight [K, N]."""
    g = GraphBuilder(rng)
    k = x_shape[-1]
    if gemm:
        out = g.gemm("x", "fc", k, n, trans_b=False)
    else:
        w = g.const("fc.w", rng.normal(0, k ** -0.5, (k, n)).astype(np.float32))
        b = g.const("fc.b", rng.normal(0, 0.1, n).astype(np.float32))
        out = g.op("Relu", [g.op("Add", [g.op("MatMul", ["x", w], "fc"), b], "fc.add")], "fc.relu")
    return g.model("fc", {"x": x_shape}, [out])


# (x shape, N, Gemm?): K not a multiple of the lanes (37, 40); N a multiple of half a vector only (24);
# a transformer's 3-D activations; N no block divides (20, 37: packed with zero columns to whole vectors, the
# result cropped; 6: less than a vector, left generic).
SHAPES = [((4, 40), 24, True), ((3, 37), 48, False), ((1, 128, 384), 96, False), ((5, 16), 20, True),
          ((5, 16), 37, True), ((5, 16), 6, True)]


@pytest.mark.parametrize("x_shape,n,gemm", SHAPES)
def test_fc_matches_onnxruntime(x_shape, n, gemm, rng):
    model = _matmul_model(rng, x_shape, n, gemm)
    feeds = random_inputs(model, rng)
    built = compiler.compile(model, target="native")
    got = np.asarray(built.run(**feeds)[0])
    want = onnxruntime_outputs(model, feeds)[0]
    assert np.abs(got - want).max() <= MAX_RELATIVE_ERROR * np.abs(want).max()
    applied = built.report.schedules.applied
    lanes = vector_lanes(resolve_target("native"))
    padded = n % 8 != 0 and n > lanes
    # a packed weight's unpacking is fused into the FC's kernel, which the matmul rule still schedules
    assert any("layout_transform" in name for name in applied) == (n % 8 == 0 or padded)
    # a padded FC's crop is in the FC's kernel too, with its bias and ReLU (the fc rules take the crop)
    assert set(applied.values()) == ({"generic"} if n == 6 else {"matmul"})
    assert any("strided_slice" in name for name in applied) == padded
    assert not padded or built.report.fusion["fc_act" if not gemm else "fc_bias"] == 1


def test_a_lone_fc_reads_its_packed_weight(rng):
    """A Gemm with no bias and nothing after it (GPT-2's projections): the packed weight's unpacking is still
    in the FC's kernel, not folded back to [K, N] by constant folding."""
    g = GraphBuilder(rng)
    w = g.const("fc.w", rng.normal(0, 0.1, (64, 96)).astype(np.float32))
    model = g.model("lone_fc", {"x": (8, 64)}, [g.op("Gemm", ["x", w], "fc")])
    built = compiler.compile(model, target="native")
    feeds = random_inputs(model, rng)
    want = onnxruntime_outputs(model, feeds)[0]
    assert np.abs(built.run(**feeds)[0] - want).max() <= MAX_RELATIVE_ERROR * np.abs(want).max()
    assert built.report.fusion["fc_packed"] == 1
    assert any("layout_transform" in name for name in built.report.schedules.applied)


def _packed_weight(k: int, n: int, lanes: int):
    """A [K, N] weight and what pack_dense_weights makes the matmul read instead of it."""
    x = relax.Var("x", relax.TensorType((2, k), "float32"))
    weight = np.arange(k * n, dtype=np.float32).reshape(k, n)
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        bb.emit_func_output(bb.emit(relax.op.matmul(x, relax.const(weight))))
    bindings = pack_dense_weights(bb.get(), lanes)["main"].body.blocks[0].bindings
    values = {binding.var: binding.value for binding in bindings}
    matmul = next(b.value for b in bindings if b.value.op == tvm.ir.Op.get("relax.matmul"))
    read = matmul.args[1]
    return weight, values.get(read, read)


def test_weight_is_stored_in_lane_blocks_along_k():
    weight, unpack = _packed_weight(k=5, n=32, lanes=16)
    assert unpack.op == tvm.ir.Op.get("relax.layout_transform")
    packed = unpack.args[0].value.numpy()
    assert packed.shape == (2, 5, 16)
    np.testing.assert_array_equal(packed[1, 3], weight[3, 16:32])


def test_weight_no_vector_block_divides_is_padded_with_zero_columns():
    weight, unpack = _packed_weight(k=5, n=20, lanes=16)
    packed = unpack.args[0].value.numpy()
    assert packed.shape == (2, 5, 16)
    np.testing.assert_array_equal(packed[1, :, :4], weight[:, 16:])
    assert not packed[1, :, 4:].any()


def test_weight_narrower_than_a_vector_is_left_as_it_is():
    _, weight = _packed_weight(k=5, n=6, lanes=16)
    assert isinstance(weight, tvm.ir.expr.GenericConst) and weight.value.numpy().shape == (5, 6)


@pytest.mark.parametrize("x_shape", [(7, 1, 40), (2, 3, 1, 40)])
def test_fc_over_row_blocks_is_one_fc_over_all_rows(x_shape, rng):
    """torch's MultiheadAttention projections on sequence-first x [S, 1, K]: the matmul reads x as [S, K]."""
    model = _matmul_model(rng, x_shape, 48, gemm=False)
    matmuls = [call for call in _calls(prepare_graph(import_onnx(model).mod)) if call.op.name == "relax.matmul"]
    assert [[int(d) for d in call.args[0].ty.shape.values] for call in matmuls] == [[int(np.prod(x_shape[:-1])), 40]]
    feeds = random_inputs(model, rng)
    got = compiler.compile(model, target="native").run(**feeds)[0]
    want = onnxruntime_outputs(model, feeds)[0]
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= MAX_RELATIVE_ERROR * np.abs(want).max()


def _calls(mod) -> list:
    calls = []
    relax.analysis.post_order_visit(mod["main"], lambda e: calls.append(e) if isinstance(e, relax.Call)
                                    and isinstance(e.op, tvm.ir.Op) else None)
    return calls


@pytest.mark.parametrize("target", HOST_TARGETS)
def test_fc_of_a_width_no_vector_divides_runs_on_whole_vectors(target):
    """A classifier of 97 classes (a CRNN's): the FC reads a zero-padded copy of its weight and stores whole
    vectors; with the last vector's lanes masked off, LLVM wrote the whole kernel as scalar FMAs (1.7 GMAC/s)."""
    spec = resolve_target(target)
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((80, 192)).astype(np.float32), rng.standard_normal((192, 97)).astype(np.float32)
    lib, rule = _build(_legalized(relax.op.matmul, ((80, 192), "float32"), ((192, 97), "float32")), spec)
    assert rule == "matmul"
    assert re.search(r"\bvfmadd\w*ps\b", _assembly(lib)) and not re.search(r"\bvfmadd\w*ss\b", _assembly(lib))
    np.testing.assert_allclose(run_lib(lib, [x, w], (80, 97), "float32"), x.astype(np.float64) @ w,
                               rtol=1e-4, atol=1e-4)  # every host here has AVX2


@pytest.mark.parametrize("target", HOST_TARGETS)
def test_int8_fc_of_a_width_no_vector_divides_runs_on_whole_vectors(target, rng):
    """A 37-class int8 classifier: its s8 weight packed with zero columns for the dot instruction, the s32
    result cropped before the dequantization; within int8 error of onnxruntime fp32."""
    model = _matmul_model(rng, (16, 64), 37, gemm=False)
    calib = [rng.standard_normal((64, 64)).astype(np.float32)]
    built = compiler.compile(model, target=target, calib=calib, calib_mode="naive")
    assert built.report.quantization.int8_ops == {"dense": 1}
    feeds = random_inputs(model, rng)
    got, want = built.run(**feeds)[0], onnxruntime_outputs(model, feeds)[0]
    assert np.abs(got - want).max() <= 0.03 * np.abs(want).max()
    applied = built.report.schedules.applied
    assert any(rule.startswith("matmul_int8") for rule in applied.values())
    assert any("strided_slice" in name for name in applied)


@pytest.mark.parametrize("target", ["cascadelake", "avx2"])
def test_fc_register_tile_is_stored_one_vector_at_a_time(target, rng):
    """An FC's register tile spans several vectors of columns (3 x 16 here); its store reads the accumulators
    one vector at a time. Stored as one 48-wide vector, LLVM assembled it lane by lane out of the three (vinsertps
    and shuffles): GPT-2's FCs ran 5x slower. Nor is the tile heap workspace (targets.register_tiles)."""
    from tests.test_kernels import assembly_by_kernel

    built = compiler.compile(_matmul_model(rng, (1, 32, 64), 96, gemm=False), target=target)
    kernels = {name: body for name, body in assembly_by_kernel(built.executable).items() if "matmul" in name}
    assert kernels
    for name, body in kernels.items():
        assert "vinsertps" not in body, name
        assert "TVMBackendAllocWorkspace" not in body, name


@pytest.mark.parametrize("target", ["cascadelake", "avx2"])
def test_an_int8_fc_runs_its_column_tiles_outermost(target, rng):
    """An int8 FC's column tiles are its parallel loop and its row tiles run inside: each panel of the packed
    weight is read by every row tile from cache. Rows outermost streamed the whole weight from L3 once per
    row tile (DistilBERT's 768 x 3072 FFN: 2.4 MB per 4 rows); BERT, GPT-2 and ViT int8 ran 17-38% faster
    with columns outermost (compiled, not run)."""
    from compiler.build import ModelJob, select_rules, target_with_threads
    from compiler.int8_options import QuantizationOptions
    from relay_passes.pipeline import GraphBuild
    from targets import resolve_target

    model = _matmul_model(rng, (1, 64, 256), 1024, gemm=False)
    calib = [rng.standard_normal((1, 64, 256)).astype(np.float32)]
    spec = target_with_threads(resolve_target(target), 2)
    job = ModelJob(model, None, None, GraphBuild(spec, select_rules(True)), calib, QuantizationOptions(), 2, None)
    job.run(stop="schedule")
    assert any(rule.startswith("matmul_int8") for rule in job.build.schedules.applied.values())
    (kernel,) = [f.script() for gv, f in job.build.mod.functions.items() if "matmul" in gv.name_hint]
    # the output's axes are i0 (batch), i1 (rows), i2 (columns)
    loops = re.findall(r"for (\w+) in (?:T\.parallel|range)\(", kernel)
    parallel = re.findall(r"for (\w+) in T\.parallel\(", kernel)
    assert len(parallel) == 1 and "i2" in parallel[0] and "i1" not in parallel[0], kernel
    assert loops[loops.index(parallel[0]) + 1].startswith("i1"), loops
