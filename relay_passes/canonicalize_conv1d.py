"""1-D convolution networks as 2-D ones of unit height, so that they run on the conv2d kernels.

TVM's conv1d has no blocked layout and no scheduled kernel here (a keyword spotter ran 50x slower than
onnxruntime). Each conv1d becomes conv2d on [N, C, 1, W]:

    conv1d(x, w)  ->  squeeze(conv2d(expand_dims(x, 2), w[:, :, None, :]), 2)

and the squeeze sinks through what follows while it can (elementwise ops, a constant of the 1-D shape
lifted to 2-D, max/avg pooling as 2-D pooling of height 1), until the next conv2d's expand_dims cancels it.
A chain of Conv1d, ReLU, MaxPool1d, GELU and residual adds is then one 2-D graph that the fold, fusion and
layout passes treat like any CNN. Where the squeeze stops (a reduction, a reshape), the model is 1-D again.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from relay_passes.analysis import op_name

_UNIT_AXIS = 2  # the height axis inserted into [N, C, W]
_ELEMENTWISE_UNARY = ("relax.nn.relu", "relax.nn.gelu", "relax.nn.gelu_tanh", "relax.nn.silu", "relax.sigmoid",
                      "relax.tanh", "relax.clip", "relax.nn.leakyrelu", "relax.nn.softplus", "relax.exp",
                      "relax.erf", "relax.abs", "relax.negative", "relax.sqrt", "relax.astype")
_ELEMENTWISE_BINARY = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum",
                       "relax.minimum", "relax.power")
_POOLS = {"relax.nn.max_pool1d": relax.op.nn.max_pool2d, "relax.nn.avg_pool1d": relax.op.nn.avg_pool2d}


def _pairs(values, before) -> tuple:
    """A 1-D attribute (w) as the 2-D one ((before, w)): strides, dilation, pool size."""
    return (before, int(values[0]))


@relax.expr_functor.mutator
class _LiftConv1d(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        name = op_name(call)
        if name == "relax.nn.conv1d":
            return self._conv(call)
        if name == "relax.expand_dims" and [int(a) for a in call.attrs.axis] == [_UNIT_AXIS]:
            height = self._height_of(call.args[0])
            return call if height is None else height
        if name in _ELEMENTWISE_UNARY:
            return self._sink(call, [call.args[0]], lambda lifted: relax.Call(call.op, lifted + list(call.args[1:]),
                                                                             call.attrs))
        if name in _ELEMENTWISE_BINARY:
            return self._binary(call)
        if name in _POOLS:
            return self._pool(call, _POOLS[name])
        return call

    def _height_of(self, expr) -> relax.Expr | None:
        """The [N, C, 1, W] value `expr` (a [N, C, W] value) is the squeeze of, if it is one."""
        value = self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
        if op_name(value) == "relax.squeeze" and value.attrs.axis is not None \
                and [int(a) for a in value.attrs.axis] == [_UNIT_AXIS] and value.args[0].ty.ndim == 4:
            return value.args[0]
        return None

    def _constant(self, expr) -> np.ndarray | None:
        """The value of a constant, or of a reshaped constant (how the importer writes a conv's bias)."""
        value = self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
        if isinstance(value, tvm.ir.expr.GenericConst):
            return value.value.numpy()
        if op_name(value) == "relax.reshape" and isinstance(value.args[0], tvm.ir.expr.GenericConst):
            shape = [int(d) for d in value.ty.shape]
            return value.args[0].value.numpy().reshape(shape)
        return None

    def _lift(self, expr) -> relax.Expr:
        height = self._height_of(expr)
        return relax.op.expand_dims(expr, _UNIT_AXIS) if height is None else height

    def _conv(self, call):
        attrs, weight = call.attrs, call.args[1]
        if (attrs.data_layout != "NCW" or attrs.kernel_layout != "OIW" or (attrs.out_layout or "NCW") != "NCW"
                or not isinstance(weight, tvm.ir.expr.GenericConst) or call.args[0].ty.ndim != 3):
            return call
        left, right = (int(p) for p in attrs.padding)
        conv = relax.op.nn.conv2d(self._lift(call.args[0]),
                                  relax.const(weight.value.numpy()[:, :, None, :]),
                                  strides=_pairs(attrs.strides, 1), padding=(0, left, 0, right),
                                  dilation=_pairs(attrs.dilation, 1), groups=int(attrs.groups),
                                  out_dtype=str(call.ty.dtype))
        return relax.op.squeeze(conv, [_UNIT_AXIS])

    def _sink(self, call, operands, rebuild):
        """call(squeeze(y), ...) -> squeeze(call'(y, ...)) when every operand lifts to 2-D."""
        heights = [self._height_of(o) for o in operands]
        lifted = [h if h is not None else _lifted_constant(self._constant(o)) for h, o in zip(heights, operands)]
        if any(x is None for x in lifted) or all(h is None for h in heights):
            return call
        return relax.op.squeeze(rebuild(lifted), [_UNIT_AXIS])

    def _binary(self, call):
        if any(getattr(a.ty, "ndim", -1) not in (0, 1, 2, 3) for a in call.args):
            return call
        return self._sink(call, list(call.args), lambda lifted: relax.Call(call.op, lifted, call.attrs))

    def _pool(self, call, pool2d):
        attrs = call.attrs
        if attrs.layout != "NCW" or (attrs.out_layout or "NCW") != "NCW":
            return call
        left, right = (int(p) for p in attrs.padding)
        extra = {"count_include_pad": bool(attrs.count_include_pad)} if pool2d is relax.op.nn.avg_pool2d else {}

        def rebuild(lifted):
            return pool2d(lifted[0], pool_size=_pairs(attrs.pool_size, 1), strides=_pairs(attrs.strides, 1),
                          padding=(0, left, 0, right), dilation=_pairs(attrs.dilation, 1),
                          ceil_mode=bool(attrs.ceil_mode), **extra)

        return self._sink(call, [call.args[0]], rebuild)


def _lifted_constant(value: np.ndarray | None) -> relax.Expr | None:
    """A constant broadcast against [N, C, W] as the same against [N, C, 1, W]; None if not a constant."""
    if value is None:
        return None
    if value.ndim == 0:
        return relax.const(value)
    value = value.reshape((1,) * (3 - value.ndim) + value.shape)
    return relax.const(np.expand_dims(value, _UNIT_AXIS))


@tvm.transform.module_pass(opt_level=0, name="quantvm.Conv1dAsConv2d")
def Conv1dAsConv2d(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 (a pass, named like TVM's)
    for gvar, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gvar] = relax.analysis.remove_all_unused(_LiftConv1d(mod).visit_expr(func))
    return relax.transform.Normalize()(mod)
