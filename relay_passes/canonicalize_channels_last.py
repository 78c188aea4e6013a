"""Channels-last islands of a CNN rewritten channels-first.

PyTorch CNNs that use nn.LayerNorm and nn.Linear per pixel (ConvNeXt's blocks and downsampling, LayerNorm2d
written as permutes) export them between two transposes: NCHW -> NHWC, the per-pixel layers along the last
axis, NHWC -> NCHW. Each pair cost two layout transforms around the blocked convs, and the Linear layers ran
as FCs on rows of pixels. Channels-first, the same layers are per-pixel ops along axis 1:

    layer_norm over the last axis        -> layer_norm over axis 1
    matmul by a constant W [C, D]        -> 1x1 conv2d by W^T [D, C, 1, 1] (the conv fusion rules and kernels)
    add / multiply by a constant [D]     -> the same by the constant [D, 1, 1]
    unary elementwise ops                -> unchanged
    reshapes that keep the last axis     -> dropped (they only regroup the pixels, in order)

An island is rewritten only where it starts at permute_dims(x, [0, 2, 3, 1]) of a static 4-D x, ends at
permute_dims(., [0, 3, 1, 2]), and each value inside it is read once, by the next op of the island.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import GenericConst

from relay_passes.analysis import op_name, static_shape, use_counts
from relay_passes.kernel_origins import with_span

TO_CHANNELS_LAST, TO_CHANNELS_FIRST = [0, 2, 3, 1], [0, 3, 1, 2]
# Ops of one tensor argument that act on each element alone (their other arguments are attributes or scalars).
UNARY_ELEMENTWISE = ("relax.nn.gelu", "relax.nn.gelu_tanh", "relax.nn.relu", "relax.nn.silu", "relax.sigmoid",
                     "relax.tanh", "relax.clip", "relax.nn.leakyrelu", "relax.nn.softplus", "relax.exp")

Step = Callable[[relax.Expr], relax.Expr]  # builds one island op channels-first from its channels-first input


def _axes(call: relax.Call) -> list[int]:
    return [int(a) for a in call.attrs.axes]


def _is_permute(call, axes: list[int]) -> bool:
    return op_name(call) == "relax.permute_dims" and call.attrs.axes is not None and _axes(call) == axes


def _channel_constant(const: GenericConst, channels: int) -> GenericConst | None:
    """A constant broadcast along the last axis only ([D], [1, .., D], or one value) as [D, 1, 1] (or kept
    whole when it is one value); None where it varies along a pixel axis."""
    values = const.value.numpy()
    if values.size == 1:
        return const
    if values.shape[-1] != channels or values.size != channels:
        return None
    return relax.const(values.reshape(channels, 1, 1))


def _step(call: relax.Call, data: relax.Expr) -> Step | None:
    """How to write `call` (whose island input is `data`) channels-first; None if it is not a per-pixel op
    along the last axis."""
    name = op_name(call)
    in_shape, out_shape = static_shape(data), static_shape(call)
    if in_shape is None or out_shape is None:
        return None
    if name == "relax.reshape":
        return (lambda x: x) if in_shape[-1] == out_shape[-1] else None
    if name in UNARY_ELEMENTWISE and call.args[0].same_as(data):
        return lambda x: relax.Call(call.op, [x, *call.args[1:]], call.attrs)
    if name == "relax.nn.layer_norm" and [a % len(in_shape) for a in _axes(call)] == [len(in_shape) - 1]:
        attrs = call.attrs
        return lambda x: relax.op.nn.layer_norm(x, call.args[1], call.args[2], axes=[1], epsilon=float(attrs.epsilon),
                                                center=bool(attrs.center), scale=bool(attrs.scale))
    if name == "relax.matmul" and call.args[0].same_as(data) and isinstance(call.args[1], GenericConst):
        weight = call.args[1].value.numpy()
        if weight.ndim != 2:
            return None
        kernel = relax.const(np.ascontiguousarray(weight.T).reshape(weight.shape[1], weight.shape[0], 1, 1))
        dtype = call.attrs.out_dtype
        return lambda x: relax.op.nn.conv2d(x, kernel, data_layout="NCHW", kernel_layout="OIHW",
                                            out_dtype=str(dtype) if dtype else None)
    if name in ("relax.add", "relax.multiply", "relax.subtract", "relax.divide"):
        other = call.args[1] if call.args[0].same_as(data) else call.args[0]
        if not isinstance(other, GenericConst) or in_shape != out_shape:
            return None
        const = _channel_constant(other, out_shape[-1])
        if const is None:
            return None
        if call.args[0].same_as(data):
            return lambda x: relax.Call(call.op, [x, const], call.attrs)
        return lambda x: relax.Call(call.op, [const, x], call.attrs)
    return None


def _same_pixels(start: list[int], end: list[int] | None) -> bool:
    """The island ends on the grid it started on: its reshapes only regrouped the pixels in order (one that
    re-tiles them, [N, 56, 56, C] -> [N, 28, 112, C], would change what channels-first means)."""
    return end is not None and len(end) == 4 and start[0] == end[0] and start[2:] == end[2:]


def _island_input(call: relax.Call) -> relax.Expr | None:
    """The argument of an island op that carries the island (its one non-constant tensor argument)."""
    tensors = [a for a in call.args if isinstance(a.ty, relax.TensorType) and not isinstance(a, GenericConst)]
    return tensors[0] if len(tensors) == 1 else None


@relax.expr_functor.mutator
class _ChannelsFirst(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, func: relax.Function):
        super().__init__(mod)
        self.value_of = relax.analysis.get_var2val(func)
        self.uses = use_counts(func)

    def visit_call_(self, call):
        island = self._trace(call.args[0]) if _is_permute(call, TO_CHANNELS_FIRST) else None
        if island is None or not _same_pixels(static_shape(island[0]), static_shape(call)):
            return super().visit_call_(call)
        start, steps = island
        value = self.visit_expr(start)  # the island's input as this function now names it
        for i, (step, span) in enumerate(steps):
            if i:
                value = self.builder_.emit(value)
            value = with_span(self.builder_.normalize(step(value)), span)  # the replaced op's ONNX node
        return value

    def _trace(self, tensor: relax.Expr) -> tuple[relax.Expr, list[tuple[Step, object]]] | None:
        """Walk back from the island's last value to permute_dims(x, [0, 2, 3, 1]): (x, the steps in order,
        each with the span of the op it replaces)."""
        steps = []
        while True:
            if not isinstance(tensor, relax.Var) or self.uses.get(tensor) != 1:
                return None
            call = self.value_of.get(tensor)
            if not isinstance(call, relax.Call):
                return None
            if _is_permute(call, TO_CHANNELS_LAST):
                start = call.args[0]
                shape = static_shape(start)
                if shape is None or len(shape) != 4 or not steps:
                    return None
                return start, steps[::-1]
            data = _island_input(call)
            step = _step(call, data) if data is not None else None
            if step is None:
                return None
            steps.append((step, call.span))
            tensor = data


def _apply(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    for gvar, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            rewritten = _ChannelsFirst(mod, func).visit_expr(func)
            mod[gvar] = relax.analysis.remove_all_unused(rewritten)
    return mod


ChannelsLastIslandsAsChannelsFirst = tvm.transform.module_pass(_apply, opt_level=0,
                                                               name="quantvm.ChannelsLastIslandsAsChannelsFirst")
