"""Fold per-channel affine ops (BatchNorm in inference form, scale layers) into conv / FC weights and bias.

After `DecomposeOpsForInference`, a BatchNorm is `(y - mean) / sqrt(var + eps) * gamma + beta` with
constant operands. When `y` is a conv2d or a matmul with a constant weight, and each constant varies only
along the output-channel axis, the chain becomes one `conv2d(x, W') + b'` (or `matmul(x, W') + b'`):
multiplies and divides scale the weight, adds and subtracts merge into one bias. Nothing is folded through
a tensor that another op also reads: that op must keep seeing the unscaled value.
"""

from __future__ import annotations

import numpy as np
import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from relay_passes.analysis import SingleUse, channel_vector

_MUL, _DIV, _ADD, _SUB = (f"relax.{n}" for n in ("multiply", "divide", "add", "subtract"))


def _producer_pattern():
    conv = is_op("relax.nn.conv2d")(wildcard(), is_const())
    matmul = is_op("relax.matmul")(wildcard(), is_const())
    return conv | matmul


class _Folder:
    def __init__(self, func: relax.Function):
        self.single_use = SingleUse(func)

    # --- the per-channel vector of a constant, for a producer's output
    @staticmethod
    def float_channel_vector(producer, const) -> np.ndarray | None:
        if "float" not in str(producer.ty.dtype):
            return None
        return channel_vector(const.value.numpy(), producer)

    @staticmethod
    def scaled(producer, scale: np.ndarray):
        weight = producer.args[1].value.numpy()
        if producer.op.name == "relax.nn.conv2d":
            attrs = producer.attrs
            if attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW":
                return None
            weight = weight * scale.reshape(-1, 1, 1, 1)
        else:
            if weight.ndim != 2:
                return None
            weight = weight * scale.reshape(1, -1)
        return relax.Call(producer.op, [producer.args[0], relax.const(weight.astype(weight.dtype))],
                          producer.attrs, producer.ty_args, producer.span)  # (its ONNX node's tag)

    @staticmethod
    def bias(producer, vector: np.ndarray):
        shape = (1, -1, 1, 1) if producer.op.name == "relax.nn.conv2d" else (-1,)
        return relax.const(vector.reshape(shape))

    def rewrite(self, expr, m, names):
        """`op(P, c)` or `op(add(P, b), c)` -> `add(P', b')` (or `P'` when there is no bias)."""
        producer, outer_const = m[names["producer"]], m[names["const"]]
        op = expr.op.name
        c = self.float_channel_vector(producer, outer_const)
        if c is None or (op == _DIV and not np.all(c)):
            return expr
        inner = m.get(names["add"])
        if not self.single_use(producer) or (inner is not None and not self.single_use(inner)):
            return expr
        b = self.float_channel_vector(producer, m[names["bias"]]) if inner is not None else np.zeros_like(c)
        if b is None:
            return expr
        if op in (_MUL, _DIV):
            factor = c if op == _MUL else 1 / c
            new_producer, new_bias = self.scaled(producer, factor), b * factor
            if new_producer is None:
                return expr
        else:
            new_producer, new_bias = producer, b + c if op == _ADD else b - c
            if inner is None and op == _ADD:
                return expr  # already conv + bias
        return relax.op.add(new_producer, self.bias(producer, new_bias))


def _patterns():
    producer, const, bias = _producer_pattern(), is_const(), is_const()
    with_bias = is_op(_ADD)(producer, bias)
    patterns = []
    for op in (_MUL, _DIV, _ADD, _SUB):
        for inner in (producer, with_bias):
            patterns.append(is_op(op)(inner, const))
            if op in (_MUL, _ADD):
                patterns.append(is_op(op)(const, inner))
    names = {"producer": producer, "const": const, "bias": bias, "add": with_bias}
    return patterns, names


@tvm.transform.module_pass(opt_level=0, name="quantvm.FoldAffineIntoProducer")
def FoldAffineIntoProducer(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 (TVM pass naming)
    patterns, names = _patterns()
    for gvar, func in list(mod.functions.items()):
        if not isinstance(func, relax.Function):
            continue
        while True:  # each round folds one more op of every chain
            before = func
            for pattern in patterns:
                folder = _Folder(func)
                func = relax.dpl.rewrite_call(pattern, lambda e, m: folder.rewrite(e, m, names), func)
                func = relax.transform.CanonicalizeBindings()(tvm.IRModule({"main": func}))["main"]
                func = relax.analysis.remove_all_unused(func)
            if tvm_ffi.structural_equal(before, func):
                break
        mod[gvar] = func
    return mod
