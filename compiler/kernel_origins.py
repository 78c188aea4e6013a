"""Which ONNX nodes each kernel of a build came from: the artifact metadata's optional `kernels` table.

At import, every call of the imported graph is tagged with the index of its ONNX node (`tag_imported`,
spans: relay_passes.kernel_origins). The `kernels` phase reads the tags that survived to each kernel call
(the build report's `kernel_calls`). Passes that rebuild an op (BatchNorm folded into its conv, the int8
rewrite) drop its tag, so a kernel's tags are seeds: `kernel_table` walks the ONNX graph from them, the
calls in the order they run, and gives each call its tagged nodes and every ancestor node no earlier call
has claimed (the Conv and BatchNormalization before a tagged Relu; a Flatten folded into the FC after it).

    "kernels": {"fused_relax_nn_conv2d_relax_add_relax_nn_relu": {"nodes": ["conv1", "bn1", "relu1"],
                                                                 "ops": ["Conv", "BatchNormalization", "Relu"]},
                "reshape": {"nodes": [...], "ops": [...], "calls": [{"nodes": [...], "ops": [...]}, ...]}}

"calls" appears where one kernel is called more than once (the same PrimFunc serving several ops): each
call's own nodes, in the order they run; "nodes" is then their union. A kernel no tag reached (a layout
transform, an int8 quantize) has empty lists. Nothing here may fail a compile: any error gives no table.
"""

from __future__ import annotations

import warnings

import onnx

SOURCE_PREFIX = "onnx:"
# Ops that make a kernel of their own: the walk up from a kernel's tags takes one (its tag lost when a
# BatchNorm was folded into it) but not what feeds it, which earlier kernels computed.
ANCHOR_OPS = frozenset({"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "Gemm", "MatMul", "MatMulInteger",
                        "QLinearMatMul", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LSTM",
                        "GRU", "RNN", "Softmax", "LogSoftmax", "LayerNormalization", "Resize", "Einsum",
                        "ReduceMean", "ReduceSum", "ReduceMax", "TopK", "NonMaxSuppression", "Gather"})


def node_label(node: onnx.NodeProto) -> str:
    """How the table names a node: its name, or for an unnamed one its op type and first output."""
    return node.name or f"{node.op_type}({node.output[0] if node.output else '?'})"


def _node_indices(proto: onnx.ModelProto, converted_nodes: list) -> dict:
    """id(OnnxNode) -> index in proto.graph.node, by walking both in order (the importer converts the nodes
    in graph order; it skips some, and a subgraph's nodes match none)."""
    nodes = proto.graph.node
    indices, j = {}, 0
    for node in converted_nodes:
        k = j
        while k < len(nodes) and not (nodes[k].op_type == node.op_type and nodes[k].name == node.name):
            k += 1
        if k < len(nodes):
            indices[id(node)] = k
            j = k + 1
    return indices


def tag_imported(mod, origins: dict, converted_nodes: list, proto: onnx.ModelProto):
    """`mod` with each call of `main` that `origins` (Var -> OnnxNode) places tagged with its node's index;
    `mod` unchanged where tagging fails."""
    try:
        from relay_passes.kernel_origins import tag_sources

        indices = _node_indices(proto, converted_nodes)
        sources = {var: f"{SOURCE_PREFIX}{indices[id(node)]}" for var, node in origins.items() if id(node) in indices}
        if not sources:
            return mod
        tagged = mod.clone()
        tagged["main"] = tag_sources(mod["main"], sources)
        return tagged
    except Exception as err:  # noqa: BLE001 (a profile without node names, never a failed compile)
        warnings.warn(f"kernel origins not recorded (tagging the imported graph failed: {err})", stacklevel=2)
        return mod


def kernel_table(proto: onnx.ModelProto, kernel_calls: list) -> dict | None:
    """The metadata's `kernels` entry from the build report's kernel calls ((name, source tags) in the order
    they run); None where there are none or anything goes wrong."""
    if not kernel_calls:
        return None
    try:
        return _kernel_table(proto, kernel_calls)
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"kernel origins not recorded ({type(err).__name__}: {err})", stacklevel=2)
        return None


def _kernel_table(proto: onnx.ModelProto, kernel_calls: list) -> dict:
    nodes = proto.graph.node
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    parents = [sorted({producer[x] for x in node.input if x in producer}) for node in nodes]
    seeds_of = [_seeds(sources, len(nodes)) for _, sources in kernel_calls]
    tagged = {n for seeds in seeds_of for n in seeds}  # a node some kernel's tag names is that kernel's
    claimed: set = set()
    per_call: list[tuple[str, list[int]]] = []
    for (name, _), seeds in zip(kernel_calls, seeds_of):
        mine = set(seeds)
        stack = [p for s in seeds if nodes[s].op_type not in ANCHOR_OPS for p in parents[s]]
        while stack:  # the unclaimed ancestors: computed by this kernel, their own tags lost
            n = stack.pop()
            if n in claimed or n in mine or n in tagged:
                continue
            mine.add(n)
            if nodes[n].op_type not in ANCHOR_OPS:  # a conv's inputs are another kernel's work
                stack.extend(parents[n])
        claimed |= mine
        per_call.append((name, sorted(mine)))
    table: dict = {}
    for name, members in per_call:
        table.setdefault(name, []).append(members)
    result = {}
    for name, calls in table.items():
        union = sorted({n for members in calls for n in members})
        entry = _entry(nodes, union)
        if len(calls) > 1:
            entry["calls"] = [_entry(nodes, members) for members in calls]
        result[name] = entry
    return result


def _seeds(sources, count: int) -> list[int]:
    seeds = [int(s[len(SOURCE_PREFIX):]) for s in sources
             if s.startswith(SOURCE_PREFIX) and s[len(SOURCE_PREFIX):].isdigit()]
    return [s for s in seeds if s < count]


def _entry(nodes, indices) -> dict:
    return {"nodes": [node_label(nodes[i]) for i in indices], "ops": [nodes[i].op_type for i in indices]}
