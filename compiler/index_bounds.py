"""Which integer inputs a Gather reads as indices, and the range their values must keep.

TVM's take kernel does not check its indices (the importer maps a negative one into range; one out of
range reads outside the table, and a token id past an embedding's rows crashed the process). onnxruntime
refuses such an input; so does run(), from the bound recorded here in the input's spec.
"""

from __future__ import annotations

import dataclasses

import onnx

from compiler.kernel_origins import node_label
from compiler.metadata import IndexBound, TensorSpec

# Ops that pass index values on unchanged (an input cast, reshaped or unsqueezed before its Gather).
VALUE_PRESERVING = frozenset({"Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})


def with_index_bounds(proto: onnx.ModelProto, inputs: list[TensorSpec]) -> list[TensorSpec]:
    """`inputs`, each integer one that reaches a Gather's indices given its tightest bound."""
    bounds = _gathered_bounds(proto)
    return [dataclasses.replace(spec, index_bound=bounds[spec.name]) if spec.name in bounds else spec
            for spec in inputs]


def _gathered_bounds(proto: onnx.ModelProto) -> dict[str, IndexBound]:
    graph = proto.graph
    shapes = _static_shapes(graph)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    bounds = {}
    for value in graph.input:
        if value.type.tensor_type.elem_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            continue
        for gather in _gathers_of(value.name, consumers):
            shape = shapes.get(gather.input[0])
            axis = next((a.i for a in gather.attribute if a.name == "axis"), 0)
            if shape is None or not -len(shape) <= axis < len(shape) or not shape[axis]:
                continue
            extent = int(shape[axis])
            if value.name not in bounds or extent < bounds[value.name].extent:
                bounds[value.name] = IndexBound(extent, node_label(gather))
    return bounds


def _gathers_of(name: str, consumers: dict) -> list[onnx.NodeProto]:
    """The Gathers that read `name`'s values as indices, directly or through VALUE_PRESERVING ops."""
    found, frontier, seen = [], [name], {name}
    while frontier:
        for node in consumers.get(frontier.pop(), ()):
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] in seen:
                found.append(node)
            elif node.op_type in VALUE_PRESERVING and node.input[0] in seen:
                for out in node.output:
                    if out not in seen:
                        seen.add(out)
                        frontier.append(out)
    return found


def _static_shapes(graph: onnx.GraphProto) -> dict[str, tuple]:
    """Tensor name -> shape, where it is known: initializers, Constant nodes, declared value infos."""
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            shapes[node.output[0]] = tuple(node.attribute[0].t.dims)
    for info in list(graph.value_info) + list(graph.input):
        dims = info.type.tensor_type.shape.dim
        if info.name not in shapes and dims and all(d.HasField("dim_value") for d in dims):
            shapes[info.name] = tuple(d.dim_value for d in dims)
    return shapes
