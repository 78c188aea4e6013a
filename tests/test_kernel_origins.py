"""Which ONNX nodes each kernel call came from (relay_passes.kernel_origins, the artifact's `kernels` table):
through the rewrites that rebuild calls (SiLU spelled x * sigmoid(x), the blocked layout) and through fused
functions shared by several groups of one form (YOLO's conv + SiLU, a transformer's projections)."""

from __future__ import annotations

import compiler
from tests.fixtures import GraphBuilder


def _calls(built) -> list[dict]:
    """Each kernel call's entry (nodes, ops), every call of a shared kernel apart."""
    return [call for entry in built.metadata.kernels.values() for call in entry.get("calls", [entry])]


def _nodes_of(calls, op: str) -> list[list[str]]:
    return [[n for n, o in zip(call["nodes"], call["ops"]) if o == op] for call in calls]


def test_each_conv_silu_kernel_names_its_own_conv_and_silu(rng):
    g = GraphBuilder(rng)
    x = "x"
    for i in range(3):  # blocks of one form: one fused function serves them all
        y = g.conv(x, f"conv{i}", 16, 16, 3)
        x = g.op("Mul", [y, g.op("Sigmoid", [y], f"sigmoid{i}")], f"silu{i}")
    model = g.model("conv_silu_chain", {"x": (1, 16, 12, 12)}, [x])
    calls = [call for call in _calls(compiler.compile(model, target="native")) if "Conv" in call["ops"]]
    assert sorted(tuple(sorted(call["nodes"])) for call in calls) == [
        (f"conv{i}", f"sigmoid{i}", f"silu{i}") for i in range(3)]


def test_each_projection_of_a_transformer_names_its_own_nodes(rng):
    """Query and key projections of one form (MatMul + Add, then Reshape and Transpose to heads): every
    MatMul, Reshape and Transpose is named by exactly one kernel call."""
    g = GraphBuilder(rng)
    heads = []
    for name in ("query", "key"):
        w = g.const(f"{name}.w", rng.normal(0, 0.2, (32, 32)).astype("float32"))
        b = g.const(f"{name}.b", rng.normal(0, 0.1, 32).astype("float32"))
        y = g.op("Add", [g.op("MatMul", ["x", w], f"{name}_matmul"), b], f"{name}_add")
        shape = g.const(f"{name}.shape", rng.integers(1, 2, 1).astype("int64") * [1, 8, 4, 8])
        y = g.op("Reshape", [y, shape], f"{name}_reshape")
        heads.append(g.op("Transpose", [y], f"{name}_transpose", perm=[0, 2, 1, 3]))
    keys = g.op("Transpose", [heads[1]], "keys_t", perm=[0, 1, 3, 2])
    model = g.model("projections", {"x": (1, 8, 32)}, [g.op("MatMul", [heads[0], keys], "scores")])
    calls = _calls(compiler.compile(model, target="native"))
    for op, count in (("MatMul", 3), ("Reshape", 2), ("Add", 2)):
        named = [n for nodes in _nodes_of(calls, op) for n in nodes]
        assert len(named) == count and len(set(named)) == count, (op, named, calls)
