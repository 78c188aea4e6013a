"""Seeded mutations of a real ONNX model: each takes the model's serialized bytes and a numpy Generator and
returns the mutant's bytes and a few words on what it changed, so (model, mutation, seed) replays a case."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

# Op types to swap in: common ones with other arities and attribute sets than most nodes have.
SWAP_OPS = ["Relu", "Conv", "Gemm", "MatMul", "Add", "Concat", "Reshape", "Transpose", "MaxPool", "Softmax",
            "BatchNormalization", "Flatten", "Identity", "Resize", "ConvTranspose", "Slice", "Split",
            "ReduceMean", "Pad", "Cast", "Where", "Gather", "LSTM", "NoSuchOp"]
DTYPES = [TensorProto.INT64, TensorProto.INT8, TensorProto.UINT8, TensorProto.DOUBLE, TensorProto.FLOAT16,
          TensorProto.BOOL, TensorProto.STRING, TensorProto.BFLOAT16, TensorProto.INT32, 0, 99]
BAD_INTS = [0, -1, -7, 2, 3, 7, 1 << 20, -(1 << 40), 1 << 62]
BAD_FLOATS = [float("nan"), float("inf"), -1.0, 0.0, 1e30]


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def drop_node(m, rng):
    i = int(rng.integers(len(m.graph.node)))
    node = m.graph.node[i]
    del m.graph.node[i]
    return f"dropped node {node.name!r} ({node.op_type})"


def drop_initializer(m, rng):
    if not m.graph.initializer:
        return drop_node(m, rng)
    i = int(rng.integers(len(m.graph.initializer)))
    name = m.graph.initializer[i].name
    del m.graph.initializer[i]
    return f"dropped initializer {name!r}"


def swap_op(m, rng):
    node = _pick(rng, m.graph.node)
    old, node.op_type = node.op_type, _pick(rng, SWAP_OPS + sorted({n.op_type for n in m.graph.node}))
    return f"node {node.name!r}: {old} -> {node.op_type}"


def dangle_input(m, rng):
    nodes = [n for n in m.graph.node if n.input]
    node = _pick(rng, nodes)
    k = int(rng.integers(len(node.input)))
    old, node.input[k] = node.input[k], f"fuzz_nothing_makes_this_{k}"
    return f"node {node.name!r} input {k} {old!r} dangles"


def rewire_input(m, rng):
    """A node input fed by another (existing) tensor: shapes and dtypes that do not fit."""
    nodes = [n for n in m.graph.node if n.input]
    node = _pick(rng, nodes)
    earlier = [o for n in m.graph.node[: list(m.graph.node).index(node)] for o in n.output]
    sources = earlier + [i.name for i in m.graph.input] + [t.name for t in m.graph.initializer]
    k = int(rng.integers(len(node.input)))
    old, node.input[k] = node.input[k], _pick(rng, sources)
    return f"node {node.name!r} input {k} {old!r} -> {node.input[k]!r}"


def corrupt_attribute(m, rng):
    nodes = [n for n in m.graph.node if n.attribute and n.op_type not in ("Constant", "If", "Loop")]
    if not nodes:
        return swap_op(m, rng)
    node = _pick(rng, nodes)
    attr = _pick(rng, node.attribute)
    how = int(rng.integers(4))
    if how == 0:
        node.attribute.remove(attr)
        return f"node {node.name!r}: removed attribute {attr.name}"
    if how == 1:
        node.attribute.add().CopyFrom(onnx.helper.make_attribute("fuzz_unknown", 1))
        return f"node {node.name!r}: added an unknown attribute"
    if attr.type == onnx.AttributeProto.INT:
        attr.i = _pick(rng, BAD_INTS)
    elif attr.type == onnx.AttributeProto.FLOAT:
        attr.f = _pick(rng, BAD_FLOATS)
    elif attr.type == onnx.AttributeProto.INTS:
        values = list(attr.ints)
        if how == 2 and values:
            values[int(rng.integers(len(values)))] = _pick(rng, BAD_INTS)
        else:
            values = values[:-1] if values and rng.random() < 0.5 else values + [_pick(rng, BAD_INTS)]
        del attr.ints[:]
        attr.ints.extend(values)
    elif attr.type == onnx.AttributeProto.STRING:
        attr.s = _pick(rng, [b"", b"NOPE", b"\xff\xfe", b"SAME_UPPER"])
    else:  # a tensor, graph or float list: make it an int instead
        attr.type, attr.i = onnx.AttributeProto.INT, _pick(rng, BAD_INTS)
    return f"node {node.name!r}: attribute {attr.name} corrupted"


def _dims_holders(m):
    return [("input", v.name, v.type.tensor_type.shape.dim) for v in m.graph.input] + \
           [("output", v.name, v.type.tensor_type.shape.dim) for v in m.graph.output] + \
           [("initializer", t.name, t.dims) for t in m.graph.initializer]


def corrupt_dims(m, rng):
    kind, name, dims = _pick(rng, _dims_holders(m))
    how = int(rng.integers(3))
    if kind == "initializer":
        if how == 0 or not dims:
            dims.append(int(_pick(rng, [1, 2, 0])))
        elif how == 1:
            del dims[-1]
        else:
            dims[int(rng.integers(len(dims)))] = _pick(rng, [0, 1, 3, 1 << 31, -2])
    elif how == 0 or not dims:
        dims.add().dim_value = int(_pick(rng, [1, 3]))
    elif how == 1:
        del dims[-1]
    else:
        dims[int(rng.integers(len(dims)))].dim_value = _pick(rng, [0, 1, 5, 1 << 31, -3])
    return f"{kind} {name!r}: dims corrupted"


def corrupt_dtype(m, rng):
    kind, name, _ = _pick(rng, _dims_holders(m))
    dtype = _pick(rng, DTYPES)
    if kind == "initializer":
        next(t for t in m.graph.initializer if t.name == name).data_type = dtype
    else:
        values = m.graph.input if kind == "input" else m.graph.output
        next(v for v in values if v.name == name).type.tensor_type.elem_type = dtype
    return f"{kind} {name!r}: dtype -> {dtype}"


def change_opset(m, rng):
    opset = next((o for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or rng.random() < 0.15:
        m.opset_import.add().CopyFrom(onnx.helper.make_opsetid("", int(rng.integers(1, 30))))
        return "added a second default-domain opset"
    opset.version = int(_pick(rng, [1, 6, 7, 9, 10, 11, 13, 14, 17, 18, 21, 23, 28, 1000]))
    return f"opset -> {opset.version}"


def shuffle_nodes(m, rng):
    nodes = list(m.graph.node)
    i, j = sorted(rng.choice(len(nodes), 2, replace=False)) if len(nodes) > 1 else (0, 0)
    nodes[i], nodes[j] = nodes[j], nodes[i]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return f"swapped nodes {i} and {j} (order)"


def truncate(data: bytes, rng):
    cut = int(rng.integers(len(data)))
    return data[:cut], f"truncated to {cut} of {len(data)} bytes"


def flip_bytes(data: bytes, rng):
    buf = bytearray(data)
    count = int(rng.integers(1, 9))
    for pos in rng.integers(len(buf), size=count):
        buf[pos] ^= int(rng.integers(1, 256))
    return bytes(buf), f"flipped {count} bytes"


PROTO_MUTATORS = {f.__name__: f for f in (drop_node, drop_initializer, swap_op, dangle_input, rewire_input,
                                          corrupt_attribute, corrupt_dims, corrupt_dtype, change_opset,
                                          shuffle_nodes)}
BYTE_MUTATORS = {f.__name__: f for f in (truncate, flip_bytes)}
MUTATIONS = list(PROTO_MUTATORS) + list(BYTE_MUTATORS)


def mutate(data: bytes, mutation: str, seed: int) -> tuple[bytes, str]:
    """The mutant of `data` (a serialized model) for `mutation` and `seed`, and what changed."""
    rng = np.random.default_rng(seed)
    if mutation in BYTE_MUTATORS:
        return BYTE_MUTATORS[mutation](data, rng)
    model = onnx.ModelProto.FromString(data)
    what = PROTO_MUTATORS[mutation](model, rng)
    return model.SerializeToString(), what
