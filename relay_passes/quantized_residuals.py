"""Residual adds read the int8 copy of a tensor that the next int8 op quantizes anyway, where that leaves the
tensor no other fp32 reader:

    y = relu(x);  q = quantize(y, s);  conv(q, W) ...;  add(z, y)
 -> y = relu(x);  q = quantize(y, s);  conv(q, W) ...;  add(z, dequantize(q, s))

The kernel that computes y then stores only q, and the one that adds reads q: a quarter of the bytes each
way. A ResNet's blocks, each ending in a residual add whose result feeds the next block's conv and its skip,
moved their fp32 residuals through memory at batch 8 (ResNet-50 int8: its 56x56 blocks' convs took twice
the time of the same conv without the add; the model 53.7 -> 45.9 ms on a Zen 5). The skip then carries the
value rounded to the scale the next conv reads, as in onnxruntime's QDQ models (a QuantizeLinear /
DequantizeLinear pair on each Add input).
The fusion rules take the dequantize into the adding kernel (relay_passes.patterns: a sum's operand).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import GenericConst

from relay_passes.analysis import op_name, static_shape
from relay_passes.kernel_origins import with_span


def _is_residual_add(call, tensor) -> bool:
    """An add of `tensor` and another computed tensor of the same shape (not a bias)."""
    if op_name(call) != "relax.add" or not any(a.same_as(tensor) for a in call.args):
        return False
    other = call.args[1] if call.args[0].same_as(tensor) else call.args[0]
    shape = static_shape(tensor)
    return not isinstance(other, GenericConst) and shape is not None and static_shape(other) == shape


def _same_quantization(a: relax.Call, b: relax.Call) -> bool:
    return (str(a.attrs.out_dtype) == str(b.attrs.out_dtype) and int(a.attrs.axis) == int(b.attrs.axis)
            and all(isinstance(x, GenericConst) and isinstance(y, GenericConst)
                    and np.array_equal(x.value.numpy(), y.value.numpy()) for x, y in zip(a.args[1:], b.args[1:])))


def residual_rewrites(func: relax.Function) -> dict:
    """Each residual add's var -> (the tensor it reads, the binding of the quantize whose copy it reads
    instead)."""
    (block,) = func.body.blocks
    order = {binding.var: i for i, binding in enumerate(block.bindings)}
    bindings = {binding.var: binding for binding in block.bindings}
    rewrites = {}
    for tensor, users in relax.analysis.udchain(block).items():
        if not isinstance(tensor, relax.DataflowVar):  # a model output: stored in fp32 anyway
            continue
        uses = [bindings[user] for user in users if user in bindings]
        if len(uses) != len(users):
            continue
        quantizes = [b for b in uses if op_name(b.value) == "relax.quantize" and b.value.args[0].same_as(tensor)]
        adds = [b for b in uses if _is_residual_add(b.value, tensor)]
        if not quantizes or not adds or len(quantizes) + len(adds) != len(uses):
            continue  # another fp32 reader keeps the fp32 tensor: reading the int8 copy would save nothing
        first = min(quantizes, key=lambda b: order[b.var])
        if any(not _same_quantization(first.value, q.value) for q in quantizes) or any(
                order[add.var] < order[first.var] for add in adds):
            continue
        rewrites.update({add.var: (tensor, first) for add in adds})
    return rewrites


@relax.expr_functor.mutator
class _ReadQuantizedCopy(relax.PyExprMutator):
    def __init__(self, mod, rewrites: dict):
        super().__init__(mod)
        self.rewrites = rewrites

    def visit_var_binding_(self, binding):
        if binding.var not in self.rewrites:
            return super().visit_var_binding_(binding)
        tensor, copy = self.rewrites[binding.var]
        quantize = copy.value
        span = binding.value.span  # the Add's source tag, for both calls (relay_passes.kernel_origins)
        residual = self.builder_.emit(with_span(self.builder_.normalize(relax.op.dequantize(
            self.visit_expr(copy.var), quantize.args[1], quantize.args[2], axis=int(quantize.attrs.axis),
            out_dtype=str(tensor.ty.dtype))), span))
        args = [residual if a.same_as(tensor) else self.visit_expr(a) for a in binding.value.args]
        value = with_span(self.builder_.normalize(relax.op.add(*args)), span)
        # (the Add's variable name kept: relay_passes.kernel_origins carries tags across phases by name)
        name = binding.var.name
        new = self.builder_.emit(value, name) if isinstance(binding.var, relax.DataflowVar) else \
            self.builder_.emit_output(value, name)
        self.set_var_remap(binding.var, new)


@tvm.transform.module_pass(opt_level=0, name="quantvm.ResidualsFromQuantized")
def ResidualsFromQuantized(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    func = mod["main"]
    if len(func.body.blocks) != 1 or not isinstance(func.body.blocks[0], relax.DataflowBlock):
        return mod
    rewrites = residual_rewrites(func)
    if not rewrites:
        return mod
    rewritten = _ReadQuantizedCopy(mod, rewrites).visit_expr(func)
    out = tvm.IRModule(dict(mod.functions))
    out["main"] = relax.analysis.remove_all_unused(rewritten)
    return relax.transform.Normalize()(out)
