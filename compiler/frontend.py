"""ONNX in, Relax out: read and validate the model, fix its input shapes, import it into an IRModule."""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
from google.protobuf.message import DecodeError
from onnx import helper

from compiler.diagnose import OnnxNode, default_opset, first_line, node_error, trace_origins
from compiler.errors import InputError, ModelError
from compiler.importer_fixes import NodeConversionError, patched_onnx_converters
from compiler.importer_rnn import RNN_OP_TYPES
from compiler.index_bounds import with_index_bounds
from compiler.kernel_origins import tag_imported
from compiler.metadata import TensorSpec


@dataclass
class ImportedModel:
    mod: object  # tvm.IRModule
    onnx_model: onnx.ModelProto
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    source: str  # where the model came from, for messages
    sha256: str
    origins: dict = field(default_factory=dict)  # Relax Var of mod["main"] -> the OnnxNode it came from


def model_source(model) -> str:
    """How messages name a model: its path, or what it was given as."""
    if isinstance(model, onnx.ModelProto):
        return "<onnx.ModelProto>"
    if isinstance(model, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return str(Path(model)) if isinstance(model, (str, os.PathLike)) else f"<{type(model).__name__}>"


def read_onnx(model) -> tuple[onnx.ModelProto, str, str]:
    """Accept a path, raw bytes or an onnx.ModelProto; return the checked model, its source and digest."""
    source = model_source(model)
    if isinstance(model, onnx.ModelProto):
        proto = model
    elif isinstance(model, (bytes, bytearray, memoryview)):
        proto = _parse(bytes(model), source)
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        proto = _parse(path.read_bytes(), source)
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
            onnx.load_external_data_for_model(proto, str(path.parent))
    else:
        raise ModelError(f"model must be an ONNX file path, bytes, an onnx.ModelProto or a torch.nn.Module (with "
                         f"example_inputs), got {type(model).__name__}")
    check_supported_ops(proto, source)  # before the checker, whose message would not name the node
    proto = _with_inferred_shapes(proto)
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError) as err:
        raise ModelError(f"{source} is not a valid ONNX model: {first_line(err)}") from err
    if not proto.graph.node:
        raise ModelError(f"{source} has an empty graph (no nodes)")
    check_initializer_sizes(proto, source)
    digest = hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()
    return proto, source, digest


def check_initializer_sizes(proto: onnx.ModelProto, source: str) -> None:
    """Name a weight whose stored values do not fill its dims (the checker does not look; the importer
    would fail later with a bare numpy reshape error)."""
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.data_type == onnx.TensorProto.STRING:
            continue
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        except (KeyError, TypeError, ValueError):
            continue  # a type numpy has no width for (4-bit, float8): left to the importer
        expected = int(np.prod(tensor.dims, dtype=np.int64))
        if tensor.raw_data:
            held, unit = len(tensor.raw_data), itemsize
        else:
            field = helper.tensor_dtype_to_field(tensor.data_type)
            held, unit = len(getattr(tensor, field)), 2 if "complex" in field else 1
        if held != expected * unit:
            raise ModelError(f"{source}: initializer {tensor.name!r} holds {held // unit} value(s), but its dims "
                             f"{list(tensor.dims)} need {expected}")


def _with_inferred_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Fill in missing output shapes (the checker requires them); keep the model as is where inference fails."""
    if proto.ByteSize() > 2**31 - 1:  # shape inference on a proto this large needs the file path
        return proto
    try:
        return onnx.shape_inference.infer_shapes(proto)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError):
        return proto


def _parse(data: bytes, source: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise ModelError(f"{source} is not an ONNX model (it does not parse as one: {first_line(err)}); "
                         "a truncated or corrupted download looks like this") from err
    if not proto.HasField("graph") or not proto.opset_import:
        raise ModelError(f"{source} is not an ONNX model (no graph or no opset in it)")
    return proto


def check_supported_ops(proto: onnx.ModelProto, source: str) -> None:
    """Name the first node whose op type the Relax ONNX importer cannot convert, before trying to."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = {*_get_convert_map(), *RNN_OP_TYPES}  # quantvm's converters for ops the stock importer lacks
    unsupported = [n for n in proto.graph.node if n.domain not in ("", "ai.onnx") or n.op_type not in known]
    if unsupported:
        node = unsupported[0]
        custom = node.domain not in ("", "ai.onnx")
        opsets = {o.domain or "": o.version for o in proto.opset_import}
        op = f"{node.domain}.{node.op_type}" if custom else node.op_type
        others = sorted({n.op_type for n in unsupported} - {node.op_type})
        more = f"; also unsupported: {', '.join(others)}" if others else ""
        reason = (f"quantvm compiles the standard ONNX domain only, not {node.domain!r}" if custom
                  else f"TVM's ONNX importer has no converter for {node.op_type}")
        raise node_error(source, OnnxNode(node.name, op, opsets.get(node.domain, default_opset(proto))),
                         "compiled", reason + more)
    for node in proto.graph.node:
        problem = _unsupported_usage(node)
        if problem:
            raise ModelError(f"{source}: {node.op_type} node {node.name or '<unnamed>'!r} {problem}")


def _unsupported_usage(node: onnx.NodeProto) -> str | None:
    """Ops the importer knows, used in a way an inference compiler cannot take."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "BatchNormalization" and attrs.get("training_mode", 0):
        return "has training_mode=1 (batch statistics); quantvm compiles inference graphs"
    if node.op_type == "MaxPool" and len([o for o in node.output if o]) > 1:
        return "asks for the Indices output, which is not supported"
    epsilon = attrs.get("epsilon")  # normalizations: a NaN or negative one gives NaNs that differ by backend
    if isinstance(epsilon, float) and not (math.isfinite(epsilon) and epsilon >= 0):
        return f"has epsilon={epsilon}; it must be a finite number >= 0"
    return None


def graph_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs: graph inputs that are not initializers (old exporters list weights as inputs too)."""
    weights = {t.name for t in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in weights]


def _dtype_name(elem_type: int, name: str, source: str) -> str:
    """numpy's name of input `name`'s element type; a ModelError for one with no numpy type (UNDEFINED, an
    unknown number), which the ONNX checker lets through on graph inputs."""
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        known = elem_type in onnx.TensorProto.DataType.values()
        label = onnx.TensorProto.DataType.Name(elem_type) if known else "unknown"
        raise ModelError(f"{source}: input {name!r} has element type {elem_type} ({label}), which quantvm cannot "
                         "take as an input") from None


def resolve_input_specs(proto: onnx.ModelProto, input_shapes: dict | None, source: str) -> list[TensorSpec]:
    """Static shapes for every model input: the model's own, overridden or completed by `input_shapes`."""
    inputs = graph_inputs(proto)
    given = dict(input_shapes or {})
    names = [i.name for i in inputs]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise InputError(f"input_shapes names {', '.join(map(repr, unknown))}, which {source} does not have; "
                         f"its inputs are {', '.join(map(repr, names))}")
    specs, dynamic = [], []
    for value in inputs:
        tensor_type = value.type.tensor_type
        # A negative dim_value is how some exporters (paddle2onnx) write a dynamic dimension.
        declared = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else (d.dim_param or "?")
                    for d in tensor_type.shape.dim]
        has_shape = tensor_type.HasField("shape")
        if value.name in given:
            shape = _check_given_shape(value.name, given[value.name], declared if has_shape else None)
        elif not has_shape or any(isinstance(d, str) for d in declared):
            dynamic.append(f"{value.name!r} {_format_dims(declared) if has_shape else '(no shape)'}")
            continue
        else:
            shape = tuple(declared)
        specs.append(TensorSpec(value.name, shape, _dtype_name(tensor_type.elem_type, value.name, source)))
    if dynamic:
        raise InputError(f"{source} has dynamic input dimensions: {'; '.join(dynamic)}. Fix them with "
                         "input_shapes={name: (1, 3, 224, 224)} (CLI: --input-shape name=1,3,224,224)")
    return specs


def _format_dims(dims) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def _check_given_shape(name, shape, declared) -> tuple:
    try:
        shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise InputError(f"input_shapes[{name!r}] must be a sequence of whole numbers, got {shape!r}") from None
    if any(d < 0 for d in shape):
        raise InputError(f"input_shapes[{name!r}] = {shape}: dimensions cannot be negative")
    if declared is not None:
        if len(declared) != len(shape):
            raise InputError(f"input_shapes[{name!r}] = {shape} has rank {len(shape)}, "
                             f"but the model declares {_format_dims(declared)} (rank {len(declared)})")
        clash = [i for i, (d, s) in enumerate(zip(declared, shape)) if isinstance(d, int) and d != s]
        if clash:
            raise InputError(f"input_shapes[{name!r}] = {shape} contradicts the model's fixed shape "
                             f"{_format_dims(declared)} at axis {clash[0]}")
    return shape


def freeze_inputs(proto: onnx.ModelProto, constants: dict, source: str) -> onnx.ModelProto:
    """Turn the named graph inputs into initializers holding the given arrays (e.g. a Reshape's shape
    or a Pad's pads fed as inputs): the compiler then sees them as the constants they are."""
    inputs = {i.name: i for i in graph_inputs(proto)}
    frozen = onnx.ModelProto()
    frozen.CopyFrom(proto)
    for name, value in constants.items():
        if name not in inputs:
            raise InputError(f"constant_inputs names {name!r}, which is not an input of {source}; "
                             f"its inputs are {', '.join(map(repr, inputs))}")
        array = np.asarray(value)
        tensor_type = inputs[name].type.tensor_type
        expected = _dtype_name(tensor_type.elem_type, name, source)
        if array.dtype.name != expected:
            raise InputError(f"constant_inputs[{name!r}]: dtype {array.dtype} given, {expected} expected")
        declared = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if tensor_type.HasField("shape") and (len(declared) != array.ndim or any(
                d is not None and d != s for d, s in zip(declared, array.shape))):
            raise InputError(f"constant_inputs[{name!r}]: shape {list(array.shape)} given, "
                             f"{_format_dims(d if d is not None else '?' for d in declared)} expected")
        frozen.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    kept = [i for i in frozen.graph.input if i.name not in constants]
    del frozen.graph.input[:]
    frozen.graph.input.extend(kept)
    return frozen


# Integer ops that exporters chain from Shape to a Reshape/Resize/Expand operand.
_SHAPE_MATH = {"Cast", "Slice", "Concat", "Gather", "Unsqueeze", "Squeeze", "Add", "Sub", "Mul", "Div", "Identity",
               "Constant", "ReduceProd", "Range", "Equal", "Where", "Max", "Min", "Neg", "Floor", "Ceil"}


def fold_static_shapes(proto: onnx.ModelProto, inputs: list[TensorSpec], rounds: int = 8) -> onnx.ModelProto:
    """`_fold_shapes_once` until nothing is left to fold: a folded Reshape shape lets shape inference see
    the shapes after it, which the next round folds."""
    for _ in range(rounds):
        folded = _fold_shapes_once(proto, inputs)
        if folded is proto:
            break
        proto = folded
    return proto


def _fold_shapes_once(proto: onnx.ModelProto, inputs: list[TensorSpec]) -> onnx.ModelProto:
    """Replace `Shape` of a statically shaped tensor, and the integer math on it, by constants.

    Exporters (paddle2onnx, torch) compute Reshape shapes as Shape -> Slice -> Cast -> Concat; TVM's
    importer only takes a Reshape shape it can see as a constant or a shape expression, and a Cast breaks
    that. With every input shape fixed, these are constants: fold them here. Anything unusual (a model
    that shape inference rejects, an op the reference evaluator refuses) is left for the importer to judge.
    """
    from onnx.reference import ReferenceEvaluator

    typed = onnx.ModelProto()
    typed.CopyFrom(proto)
    static = {s.name: s.shape for s in inputs}
    for value in typed.graph.input:
        if value.name in static:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for d in static[value.name]:
                dims.add().dim_value = d
    del typed.graph.value_info[:]  # shapes inferred before the inputs were fixed
    try:
        typed = onnx.shape_inference.infer_shapes(typed)
    except Exception:  # noqa: BLE001 (the checker and importer report what is wrong with the model)
        return proto
    shapes = {}
    for value in [*typed.graph.input, *typed.graph.value_info, *typed.graph.output]:
        t = value.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") and d.dim_value >= 0 for d in t.shape.dim):
            shapes[value.name] = [d.dim_value for d in t.shape.dim]
    opsets = {o.domain or "": o.version for o in proto.opset_import}
    known = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer
             if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and np.prod(t.dims) <= 64}
    folded = {}
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            continue
        try:
            if node.op_type == "Shape" and node.input[0] in shapes:
                attrs = {a.name: a.i for a in node.attribute}
                dims = shapes[node.input[0]]
                value = np.array(dims[attrs.get("start", 0): attrs.get("end", len(dims))], np.int64)
            elif node.op_type in _SHAPE_MATH and all(i in known for i in node.input if i):
                value = ReferenceEvaluator(node, opsets=opsets).run(None, {i: known[i] for i in node.input if i})[0]
                if value.dtype.kind not in "iub" or value.size > 64:
                    continue
            else:
                continue
        except Exception:  # noqa: BLE001 (a node the evaluator refuses stays for the importer)
            continue
        known[node.output[0]] = folded[node.output[0]] = np.asarray(value)
    if not folded:
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    kept = [n for n in out.graph.node if not (len(n.output) == 1 and n.output[0] in folded)]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    out.graph.initializer.extend(onnx.numpy_helper.from_array(v, name) for name, v in folded.items())
    return out


def import_onnx(model, input_shapes: dict | None = None, constant_inputs: dict | None = None) -> ImportedModel:
    """Read, check and import an ONNX model into a Relax IRModule with static input shapes."""
    from tvm.relax.frontend.onnx import from_onnx

    proto, source, digest = read_onnx(model)
    if constant_inputs:
        proto = freeze_inputs(proto, constant_inputs, source)
    inputs = resolve_input_specs(proto, input_shapes, source)
    proto = fold_static_shapes(proto, inputs)
    inputs = with_index_bounds(proto, inputs)
    # The importer re-runs the ONNX checker and warns on what read_onnx already accepted, and prints
    # to stdout on a failed node: the error below says it in one line instead.
    with (warnings.catch_warnings(), patched_onnx_converters() as converted,
          contextlib.redirect_stdout(io.StringIO())):
        warnings.simplefilter("ignore", UserWarning)
        try:
            mod = from_onnx(proto, shape_dict={s.name: list(s.shape) for s in inputs},
                            dtype_dict={s.name: s.dtype for s in inputs})
            outputs = _output_specs(mod, proto)
        except NodeConversionError as err:
            raise node_error(source, err.node, "imported", first_line(err.__cause__)) from err
        except Exception as err:  # the importer raises bare TVM/Python errors; name the model, the node if known
            pending = _node_being_imported(proto, converted)
            if pending is not None:
                raise node_error(source, pending, "imported", first_line(err)) from err
            raise ModelError(f"{source}: the ONNX importer failed (opset {default_opset(proto)}): "
                             f"{first_line(err)}") from err
    origins = trace_origins(mod["main"], converted)
    mod = tag_imported(mod, origins, [node for _, node in converted], proto)  # for the kernels' ONNX nodes
    return ImportedModel(mod, proto, inputs, outputs, source, digest, origins)


def _node_being_imported(proto: onnx.ModelProto, converted: list) -> OnnxNode | None:
    """The node the importer failed on outside its converter (e.g. checking the node's inputs): the first
    one not converted yet. Unknown with subgraphs (their nodes are converted too) or past the last node."""
    nodes = proto.graph.node
    if len(converted) >= len(nodes) or any(n.op_type in ("If", "Loop", "Scan") for n in nodes):
        return None
    node = nodes[len(converted)]
    return OnnxNode(node.name, node.op_type, default_opset(proto))


def _output_specs(mod, proto: onnx.ModelProto) -> list[TensorSpec]:
    """Output names from the ONNX graph; shapes and dtypes from the imported function's return type."""
    import tvm
    from tvm import relax

    ret = mod["main"].ret_ty
    infos = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    specs = []
    for output, info in zip(proto.graph.output, infos):
        dims = info.shape.values if getattr(info, "shape", None) is not None else []
        shape = tuple(int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in dims)
        specs.append(TensorSpec(output.name, shape, str(info.dtype)))
    return specs
