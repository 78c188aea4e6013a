"""Adjustments to TVM 0.27's ONNX importer, applied only while quantvm imports a model.

Clip: the stock converter emits opaque `call_tir` kernels (via topi) that no dataflow pattern can see, so
Conv+ReLU6 or FC+BoundedReLU could never fuse. With constant bounds (every exporter's case) it becomes
`R.clip` / `R.maximum` / `R.minimum` instead; other cases keep the stock conversion.

Split: a Split with one output is the identity, but the stock converter emits `R.split(x, 1)`, which Relax
types as a tensor while it legalizes to a one-element tuple; the mismatch crashed the process later (a
segfault, found by fuzzing). It becomes its input.

Errors: the stock importer lets a converter's bare TVM/Python error escape with no node name (it only prints
the op type to stdout); `NodeConversionError` carries the ONNX node and op type to the frontend's message.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np


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


def _one_output(attr) -> bool:
    return attr["tvm_custom"]["num_outputs"] == 1


def _prim(value, dtype):
    return float(value) if "float" in dtype else int(value)


class NodeConversionError(Exception):
    """Converting one ONNX node failed: `op_type` and `node` (its name) say which, `__cause__` why."""

    def __init__(self, op_type: str, node: str):
        super().__init__(f"{op_type} node {node!r}")
        self.op_type, self.node = op_type, node


@contextlib.contextmanager
def patched_onnx_converters():
    from tvm.relax.frontend.onnx import onnx_frontend

    original = onnx_frontend._get_convert_map
    original_convert = onnx_frontend.ONNXGraphImporter._convert_operator
    replaced = {"Clip": _make_clip_converter(), "Split": _make_split_converter()}

    def convert_map():
        return {**original(), **replaced}

    def convert_operator(self, op_name, inputs, attrs, opset):
        try:
            return original_convert(self, op_name, inputs, attrs, opset)
        except Exception as err:  # noqa: BLE001 (any converter failure is this node's)
            raise NodeConversionError(op_name, attrs.get("tvm_custom", {}).get("name") or "<unnamed>") from err

    onnx_frontend._get_convert_map = convert_map
    onnx_frontend.ONNXGraphImporter._convert_operator = convert_operator
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original
        onnx_frontend.ONNXGraphImporter._convert_operator = original_convert
