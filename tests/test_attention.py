"""Fused attention: the `attention` rule (relay_passes.patterns) makes Q.K^T, the scale and mask, the softmax
and P.V one kernel, scheduled by targets.attention with the query rows across the vector lanes. Numbers
against onnxruntime on each target this host runs; other targets' instructions read from their assembly;
the shapes and graphs the rule refuses keep their own kernels and say why."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import compiler
from tests.fixtures import GraphBuilder, onnxruntime_outputs
from tests.host_targets import HOST_TARGETS
from tests.test_kernels import assembly_by_kernel

MASK_VALUE = np.finfo(np.float32).min  # what HF exporters add at masked positions


def attention_model(rng, heads: int, queries: int, keys: int, head_dim: int, scale: str = "Mul",
                    mask: str | None = None, probs_out: bool = False) -> onnx.ModelProto:
    """q [1, H, M, D], k and v [1, H, N, D] -> softmax(q.k^T scaled (+ mask)).v, heads merged to [1, M, H*D].
    `mask`: "keys" (an input [1, 1, 1, N], a padding mask) or "causal" (a constant [1, 1, M, N]);
    `probs_out`: the probabilities are also an output (read outside the attention)."""
    g = GraphBuilder(rng)
    scores = g.op("MatMul", ["q", g.op("Transpose", ["k"], "k.t", perm=[0, 1, 3, 2])], "scores")
    factor = head_dim ** -0.5 if scale == "Mul" else head_dim ** 0.5
    scores = g.op(scale, [scores, g.const("scale", np.float32(factor))], "scaled")
    inputs = {name: [1, heads, n, head_dim] for name, n in (("q", queries), ("k", keys), ("v", keys))}
    if mask == "keys":
        scores = g.op("Add", [scores, "mask"], "masked")
        inputs["mask"] = [1, 1, 1, keys]
    elif mask == "causal":
        causal = np.where(np.tril(np.ones((queries, keys), bool)), 0, MASK_VALUE).astype(np.float32)
        scores = g.op("Add", [scores, g.const("causal", causal[None, None])], "masked")
    probs = g.op("Softmax", [scores], "probs", axis=-1)
    context = g.op("MatMul", [probs, "v"], "context")
    merged = g.op("Reshape", [g.op("Transpose", [context], "context.t", perm=[0, 2, 1, 3]),
                              g.const("merge", np.array([1, queries, heads * head_dim], np.int64))], "merged")
    outputs = [merged, probs] if probs_out else [merged]
    graph = helper.make_graph(g.nodes, "attention",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="quantvm-tests")
    model.ir_version = 8
    return model


def _feeds(model, rng) -> dict:
    feeds = {}
    for tensor in model.graph.input:
        shape = [d.dim_value for d in tensor.type.tensor_type.shape.dim]
        feeds[tensor.name] = rng.standard_normal(shape).astype(np.float32) * 2
    if "mask" in feeds:
        feeds["mask"] = np.zeros_like(feeds["mask"])
        feeds["mask"][..., -3:] = MASK_VALUE  # the last keys are padding
    return feeds


def _matches_onnxruntime(model, target, rng):
    feeds = _feeds(model, rng)
    built = compiler.compile(model, target=target)
    for got, want in zip(built.run(**feeds), onnxruntime_outputs(model, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    return built


# (heads, queries, keys, head dim), scale op, mask: SVTR's 20-wide heads; keys no vector divides and a padding
# mask; one vector of queries and a causal mask; queries an odd number of vectors, head 24 wide
SHAPES = [((6, 64, 64, 20), "Mul", None), ((4, 32, 50, 32), "Div", "keys"), ((2, 16, 16, 8), "Mul", "causal"),
          ((3, 48, 40, 24), "Div", None)]


@pytest.mark.parametrize("target", HOST_TARGETS)
@pytest.mark.parametrize("shape,scale,mask", SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else str(v))
def test_attention_is_one_kernel_and_matches_onnxruntime(target, shape, scale, mask, rng):
    built = _matches_onnxruntime(attention_model(rng, *shape, scale=scale, mask=mask), target, rng)
    assert built.report.fusion["attention"] == 1
    assert sorted(built.report.schedules.applied.values()).count("attention") == 1
    assert not any(r["rule"] == "attention" for r in built.report.rejected)


@pytest.mark.parametrize("target,register,lanes", [("cascadelake", "zmm", 16), ("avx2", "ymm", 8)])
def test_attention_kernel_broadcasts_keys_onto_vectors_of_queries(target, register, lanes, rng):
    """The scores' and the context's inner loops: one vector of query rows times a broadcast key (or value)
    element per FMA, on the target's widest vectors (compiled and read, not run)."""
    built = compiler.compile(attention_model(rng, 4, 64, 96, 20), target=target)
    (body,) = [asm for name, asm in assembly_by_kernel(built.executable).items() if "softmax" in name]
    if lanes == 16:  # AVX-512 folds the broadcast into the FMA
        fmas = re.findall(rf"vfmadd231ps\s+[^\n]*\{{1to16\}}, %{register}\d+, %{register}\d+", body)
    else:
        fmas = re.findall(rf"vfmadd231ps\s+%{register}\d+, %{register}\d+, %{register}\d+", body)
        assert re.search(rf"vbroadcastss\s+[^\n]*%{register}", body)
    assert len(fmas) >= 2 * 8  # two register tiles (scores, context) of at least 8 accumulators


def test_queries_not_whole_vectors_keep_their_kernels_and_say_why(rng):
    """ViT's 197 tokens: the rule refuses (the kernel runs queries across vector lanes); numbers unchanged."""
    built = _matches_onnxruntime(attention_model(rng, 2, 20, 20, 16), "native", rng)
    assert built.report.fusion["attention"] == 0
    assert any(r["rule"] == "attention" and "20 queries" in r["reason"] for r in built.report.rejected)


def test_probabilities_read_elsewhere_are_not_fused(rng):
    built = _matches_onnxruntime(attention_model(rng, 2, 16, 16, 8, probs_out=True), "native", rng)
    assert built.report.fusion["attention"] == 0
    assert any(r["rule"] == "attention" and "read outside" in r["reason"] for r in built.report.rejected)


def test_keys_shared_by_every_head_are_not_fused(rng):
    """One K and V for all heads (broadcast over them by the matmuls): the kernel indexes each operand by the
    scores' batch, so the rule refuses and says why."""
    g = GraphBuilder(rng)
    scores = g.op("MatMul", ["q", g.op("Transpose", ["k"], "k.t", perm=[0, 1, 3, 2])], "scores")
    probs = g.op("Softmax", [g.op("Mul", [scores, g.const("scale", np.float32(0.25))], "scaled")], "probs", axis=-1)
    context = g.op("MatMul", [probs, "v"], "context")
    shapes = {"q": [1, 4, 16, 16], "k": [1, 1, 32, 16], "v": [1, 1, 32, 16]}
    graph = helper.make_graph(g.nodes, "shared_kv",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items()],
                              [helper.make_tensor_value_info(context, TensorProto.FLOAT, None)], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    built = _matches_onnxruntime(model, "native", rng)
    assert built.report.fusion["attention"] == 0
    assert any(r["rule"] == "attention" and "broadcast" in r["reason"] for r in built.report.rejected)


@pytest.mark.parametrize("target,lanes,rows", [("avx2", 8, 16), ("cascadelake", 16, 16)])
def test_each_block_of_query_rows_is_as_many_vectors_as_the_target_has_registers_for(target, lanes, rows, rng):
    """AVX2 runs two vectors of 8 query rows per block (each broadcast key feeds two FMAs: SVTR 25% faster),
    AVX-512 one of 16: the parallel loop runs heads x queries / rows blocks, and each register tile of keys
    fits the target's registers with one register per vector of rows (compiled, not run)."""
    from compiler.build import ModelJob, select_rules, target_with_threads
    from compiler.int8_options import QuantizationOptions
    from relay_passes.pipeline import GraphBuild
    from targets import resolve_target
    from targets.attention import ROW_VECTORS, _tile_width
    from targets.register_tiles import TILE_REGISTERS

    heads, queries = 4, 64
    spec = target_with_threads(resolve_target(target), 2)
    job = ModelJob(attention_model(rng, heads, queries, 96, 20), None, None, GraphBuild(spec, select_rules(True)),
                   None, QuantizationOptions(), 2, None)
    job.run(stop="schedule")
    (kernel,) = [f for gv, f in job.build.mod.functions.items() if "softmax" in gv.name_hint]
    parallel = re.findall(r"for \w+ in T\.parallel\((?:T\.int64\()?(\d+)", kernel.script())
    assert parallel == [str(heads * queries // rows)], parallel
    vectors = ROW_VECTORS[lanes]
    assert vectors * lanes == rows
    for extent in (96, 20, 960, 7):
        width = _tile_width(extent, lanes, vectors)
        assert 1 <= width <= extent and (width + 1) * vectors <= TILE_REGISTERS[lanes]
