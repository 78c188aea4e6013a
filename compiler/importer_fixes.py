"""Adjustments to TVM 0.27's ONNX importer, applied only while quantvm imports a model.

Clip: the stock converter emits opaque `call_tir` kernels (via topi) that no dataflow pattern can see, so
Conv+ReLU6 or FC+BoundedReLU could never fuse. With constant bounds (every exporter's case) it becomes
`R.clip` / `R.maximum` / `R.minimum` instead; other cases keep the stock conversion.

Split: a Split with one output is the identity, but the stock converter emits `R.split(x, 1)`, which Relax
types as a tensor while it legalizes to a one-element tuple; the mismatch crashed the process later (a
segfault, found by fuzzing). It becomes its input.

ConstantOfShape: the stock converter broadcasts the 1-element `value` to the shape, which fails for an empty
shape (a scalar, as transformers 5 exports write); the value is reshaped to a scalar first.

Resize: opsets 11-12 require a `scales` input even when `sizes` is given (an empty tensor then), which the
stock converter took for a second size; opset 10's Resize has its scales as input 1, which it read as roi.

Errors: the stock importer lets a converter's bare TVM/Python error escape with no node name (it only prints
the op type to stdout); `NodeConversionError` carries the ONNX node and op type to the frontend's message.
Names: the importer keeps none; `patched_onnx_converters` records which expression each node became, for
`compiler.diagnose` to name the node behind a later failure.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from compiler.diagnose import OnnxNode
from compiler.importer_rnn import rnn_converters


def _constant_bound(expr):
    """The bound as a Python number, None where the input is absent or NaN (unbounded), or raise if not constant."""
    import tvm

    if expr is None:
        return None
    if not isinstance(expr, tvm.ir.expr.GenericConst) or expr.value.numpy().size != 1:
        raise LookupError
    value = expr.value.numpy().reshape(()).item()
    return None if isinstance(value, float) and math.isnan(value) else value


def _make_clip_converter():
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend

    class ClipWithConstantBounds(onnx_frontend.Clip):
        @classmethod
        def _impl_v13(cls, bb, inputs, attr, params):
            x = inputs[0]
            try:
                lo, hi = (_constant_bound(inputs[i] if len(inputs) > i else None) for i in (1, 2))
            except LookupError:
                return super()._impl_v13(bb, inputs, attr, params)
            return cls._clip(x, lo, hi)

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            lo, hi = attr.get("min"), attr.get("max")
            return cls._clip(inputs[0], lo, hi)

        @staticmethod
        def _clip(x, lo, hi):
            dtype = str(x.ty.dtype)
            if lo is not None and hi is not None:
                return relax.op.clip(x, _prim(lo, dtype), _prim(hi, dtype))
            if lo is not None:
                return relax.op.maximum(x, relax.const(np.array(lo, dtype)))
            if hi is not None:
                return relax.op.minimum(x, relax.const(np.array(hi, dtype)))
            return x

    return ClipWithConstantBounds


def _make_split_converter():
    from tvm.relax.frontend.onnx import onnx_frontend

    class SplitWithOneOutputAsIdentity(onnx_frontend.Split):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            return inputs[0] if _one_output(attr) else super()._impl_v1(bb, inputs, attr, params)

        @classmethod
        def _impl_v13(cls, bb, inputs, attr, params):
            return inputs[0] if _one_output(attr) else super()._impl_v13(bb, inputs, attr, params)

    return SplitWithOneOutputAsIdentity


def _make_constant_of_shape_converter():
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend

    class ConstantOfShapeWithScalarValue(onnx_frontend.ConstantOfShape):
        @classmethod
        def _impl_v9(cls, bb, inputs, attr, params):
            if not _is_empty_shape(onnx_frontend.get_constant(inputs[0], params)):
                return super()._impl_v9(bb, inputs, attr, params)
            value = onnx_frontend.get_numpy(attr["value"]) if "value" in attr else np.zeros((), np.float32)
            return relax.const(value.reshape(()), str(value.dtype))

    return ConstantOfShapeWithScalarValue


def _is_constant(expr) -> bool:
    import tvm

    return isinstance(expr, tvm.ir.GenericConst)


def _is_empty_shape(shape) -> bool:
    from tvm import relax

    if _is_constant(shape):
        return shape.value.numpy().size == 0
    return isinstance(shape, relax.ShapeExpr) and len(shape.values) == 0


def _make_resize_converter():
    from tvm.relax.frontend.onnx import onnx_frontend

    class ResizeWithEmptyScales(onnx_frontend.Resize):
        @classmethod
        def _impl_v10(cls, bb, inputs, attr, params):
            # Resize-10 has no roi input and no coordinate attributes: it scales like Upsample (asymmetric, floor)
            attr = {"coordinate_transformation_mode": b"asymmetric", "nearest_mode": b"floor", **attr}
            return cls._impl_v18(bb, [inputs[0], None, inputs[1]], attr, params)

        @classmethod
        def _impl_v11(cls, bb, inputs, attr, params):
            inputs = list(inputs)
            if len(inputs) > 3 and inputs[3] is not None and _is_empty_tensor(inputs[2], params):
                inputs[2] = None  # the required-but-empty scales beside sizes
            return super()._impl_v18(bb, inputs, attr, params)

        _impl_v18 = _impl_v11  # the stock converter's one version, which every opset would otherwise pick

    return ResizeWithEmptyScales


def _is_empty_tensor(expr, params) -> bool:
    from tvm.relax.frontend.onnx import onnx_frontend

    value = onnx_frontend.get_constant(expr, params) if expr is not None else None
    return _is_constant(value) and value.value.numpy().size == 0


def _one_output(attr) -> bool:
    return attr["tvm_custom"]["num_outputs"] == 1


def _prim(value, dtype):
    return float(value) if "float" in dtype else int(value)


class NodeConversionError(Exception):
    """Converting one ONNX node failed: `node` says which, `__cause__` why."""

    def __init__(self, node: OnnxNode):
        super().__init__(node.describe())
        self.node = node


@contextlib.contextmanager
def patched_onnx_converters():
    """Import with quantvm's converters; yields the list of (expression, OnnxNode) each node converted to."""
    from tvm.relax.frontend.onnx import onnx_frontend

    original = onnx_frontend._get_convert_map
    original_convert = onnx_frontend.ONNXGraphImporter._convert_operator
    replaced = {"Clip": _make_clip_converter(), "Split": _make_split_converter(),
                "ConstantOfShape": _make_constant_of_shape_converter(), "Resize": _make_resize_converter(),
                **rnn_converters()}  # LSTM and GRU, which the stock importer lacks
    converted: list = []

    def convert_map():
        return {**original(), **replaced}

    def convert_operator(self, op_name, inputs, attrs, opset):
        node = OnnxNode(attrs.get("tvm_custom", {}).get("name") or "", op_name, opset)
        try:
            expr = original_convert(self, op_name, inputs, attrs, opset)
        except Exception as err:  # noqa: BLE001 (any converter failure is this node's)
            raise NodeConversionError(node) from err
        converted.append((expr, node))
        return expr

    onnx_frontend._get_convert_map = convert_map
    onnx_frontend.ONNXGraphImporter._convert_operator = convert_operator
    try:
        yield converted
    finally:
        onnx_frontend._get_convert_map = original
        onnx_frontend.ONNXGraphImporter._convert_operator = original_convert
