"""The INT8 rewrite: conv2d and matmul-with-constant-weight become u8/s8 x s8 -> s32 ops.

For each quantized op, with its input's calibrated range (lo, hi):
- the input is quantized symmetrically with zero point 0: u8 over [0, hi] when lo >= 0 (ReLU outputs),
  s8 over [-m, m] otherwise (`quantized_dtype` can force s8). A zero point of 0 keeps conv zero-padding exact.
- the weight is s8, symmetric per output channel (scale max|W[c]| / 127);
- a per-channel constant bias right after the op is added in s32 with scale x_scale * w_scale[c]; where it
  would pass 2^30, that channel's weight scale is raised until it does not;
- the s32 result is turned back to fp32 by one per-channel multiply, which the fusion rules put in the
  same kernel as the bias, activation, residual add and, where the next op is int8, its quantize.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import tvm
from tvm import relax

from relay_passes.analysis import channel_vector, use_counts
from relay_passes.quantize_motion import MoveQuantizeUp

BIAS_LIMIT = 2**30
OPS = {"relax.nn.conv2d": "conv2d", "relax.matmul": "dense", "relax.nn.avg_pool2d": "avg_pool",
       "relax.nn.adaptive_avg_pool2d": "avg_pool", "relax.mean": "avg_pool"}
ONNX_TYPES = {"conv2d": ("Conv",), "dense": ("Gemm", "MatMul"),
              "avg_pool": ("AveragePool", "GlobalAveragePool", "ReduceMean")}


@dataclass(eq=False)
class QuantizableOp:
    """One conv2d / dense / average pooling of the graph that can run on int8 data, named after its ONNX
    node where known."""

    name: str
    kind: str  # conv2d | dense | avg_pool
    var: relax.Var  # the op's binding
    data: relax.Expr  # its input tensor
    weight: np.ndarray | None
    bias_var: relax.Var | None = None  # a per-channel bias add folded into the s32 accumulator
    bias: np.ndarray | None = None
    plan: dict = field(default_factory=dict)


def _is_float_tensor(expr) -> bool:
    return "float" in str(getattr(expr.ty, "dtype", ""))


def find_quantizable(mod: tvm.IRModule, proto: onnx.ModelProto | None = None) -> list[QuantizableOp]:
    """The int8 candidates of `main` in graph order: conv2d (NCHW/OIHW) and matmul with a constant 2-D
    weight, and average pooling (incl. global: a mean over H and W), all on float data."""
    func = mod["main"]
    bindings = [b for block in func.body.blocks for b in block.bindings]
    calls = [(b.var, b.value) for b in bindings
             if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op) and b.value.op.name in OPS]
    names = _onnx_names(calls, proto)
    uses = use_counts(func)
    ops = []
    for (var, call), name in zip(calls, names):
        kind = OPS[call.op.name]
        data = call.args[0]
        if kind == "avg_pool":
            if _is_float_tensor(data) and _is_spatial_average(call):
                ops.append(QuantizableOp(name, kind, var, data, None))
            continue
        weight = call.args[1]
        if not isinstance(weight, tvm.ir.expr.GenericConst) or not _is_float_tensor(data):
            continue
        if kind == "conv2d" and (call.attrs.data_layout != "NCHW" or call.attrs.kernel_layout != "OIHW"):
            continue
        if kind == "dense" and weight.value.numpy().ndim != 2:
            continue
        ops.append(QuantizableOp(name, kind, var, data, weight.value.numpy()))
    _attach_biases(bindings, ops, uses)
    return ops


def _is_spatial_average(call) -> bool:
    """avg_pool2d / adaptive_avg_pool2d in NCHW, or a mean over axes 2 and 3 of a 4-D tensor."""
    if call.op.name != "relax.mean":
        return call.attrs.layout == "NCHW"
    axes = call.attrs.axis
    rank = len(call.args[0].ty.shape.values)
    return rank == 4 and axes is not None and sorted(int(a) % 4 for a in axes) == [2, 3]


def _onnx_names(calls, proto) -> list[str]:
    """The ONNX importer keeps node order: the k-th conv2d is the k-th Conv node, the k-th matmul the k-th
    Gemm/MatMul. Where the counts disagree, fall back to positional names."""
    result = []
    counters = {kind: 0 for kind in ONNX_TYPES}
    nodes = {kind: [n for n in (proto.graph.node if proto is not None else []) if n.op_type in types]
             for kind, types in ONNX_TYPES.items()}
    totals = {kind: sum(1 for _, c in calls if OPS[c.op.name] == kind) for kind in counters}
    for _, call in calls:
        kind = OPS[call.op.name]
        k = counters[kind]
        counters[kind] += 1
        if len(nodes[kind]) == totals[kind]:
            node = nodes[kind][k]
            result.append(node.name or node.output[0])
        else:
            result.append(f"{kind}_{k}")
    return result


def _attach_biases(bindings, ops, uses) -> None:
    """A per-channel constant added right after a conv/dense (its only reader) joins the s32 accumulator."""
    by_var = {op.var: op for op in ops}
    values = {b.var: b.value for b in bindings}
    for b in bindings:
        value = b.value
        if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == "relax.add"):
            continue
        source, const = value.args
        if not isinstance(source, relax.Var) or source not in by_var or uses.get(source) != 1:
            continue
        if not isinstance(const, tvm.ir.expr.GenericConst):
            continue
        op = by_var[source]
        bias = channel_vector(const.value.numpy(), values[op.var])
        if bias is not None:
            op.bias_var, op.bias = b.var, bias.astype(np.float64)


def plan_input(lo: float, hi: float, quantized_dtype: str = "auto") -> dict | None:
    """How one input tensor is stored in int8: u8 over [0, hi] when lo >= 0, else s8 over [-m, m]."""
    unsigned = lo >= 0 and quantized_dtype in ("auto", "uint8")
    magnitude = hi if unsigned else max(abs(lo), abs(hi))
    if magnitude <= 0:
        return None
    return {"dtype": "uint8" if unsigned else "int8", "x_scale": magnitude / (255.0 if unsigned else 127.0),
            "range": (lo, hi)}


def plan_dynamic(op: QuantizableOp) -> dict:
    """No calibration (`calib_mode='none'`): s8 input with its scale max|x| / 127 computed at run time, as
    MXNet does; the bias stays an fp32 add since its s32 scale would depend on each batch."""
    w_scale = _weight_scales(op)
    return {"dtype": "int8", "x_scale": None, "w_scale": w_scale, "weight": _quantized_weight(op, w_scale),
            "bias": None, "range": None}


def plan_op(op: QuantizableOp, lo: float, hi: float, quantized_dtype: str = "auto") -> dict | None:
    """Scales, int8 weight and s32 bias for one op; None where the input's range is empty (stays fp32)."""
    stored = plan_input(lo, hi, quantized_dtype)
    if stored is None or op.kind == "avg_pool":
        return stored
    x_scale = stored["x_scale"]
    w_scale = _weight_scales(op)
    if op.bias is not None:  # keep |bias_s32| <= 2^30 by coarsening that channel's weight scale
        w_scale = np.maximum(w_scale, np.abs(op.bias) / (x_scale * BIAS_LIMIT))
    bias_q = None if op.bias is None else np.round(op.bias / (x_scale * w_scale)).astype(np.int32)
    return {**stored, "w_scale": w_scale, "weight": _quantized_weight(op, w_scale), "bias": bias_q}


def _channel_first(op: QuantizableOp) -> np.ndarray:
    """The weight with output channels on axis 0: (O, I, kh, kw) for conv2d, (N, K) for dense."""
    w = op.weight.astype(np.float64)
    return w if op.kind == "conv2d" else w.T


def _weight_scales(op: QuantizableOp) -> np.ndarray:
    w = _channel_first(op)
    w_max = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    return np.where(w_max > 0, w_max / 127.0, 1.0)


def _quantized_weight(op: QuantizableOp, w_scale: np.ndarray) -> np.ndarray:
    w = _channel_first(op)
    q = np.clip(np.round(w / w_scale.reshape((-1,) + (1,) * (w.ndim - 1))), -127, 127).astype(np.int8)
    return q if op.kind == "conv2d" else np.ascontiguousarray(q.T)


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, ops):
        super().__init__(mod)
        self.by_var = {op.var: op for op in ops}
        self.by_bias = {op.bias_var: op for op in ops if op.bias_var is not None}
        self.accumulators = {}

    def _bind(self, var, value):
        new = self.builder_.emit(value) if isinstance(var, relax.DataflowVar) else self.builder_.emit_output(value)
        self.set_var_remap(var, new)

    def visit_var_binding_(self, binding):
        op = self.by_var.get(binding.var)
        if op is not None:
            call = binding.value
            plan = op.plan
            data = self.visit_expr(op.data)
            x_scale = relax.const(np.float32(plan["x_scale"])) if plan["x_scale"] is not None else \
                self.builder_.emit(_run_time_scale(data))
            q = self.builder_.emit(relax.op.quantize(data, x_scale, relax.const(0, plan["dtype"]), axis=-1,
                                                     out_dtype=plan["dtype"]))
            if op.kind == "avg_pool":  # the pooling reads int8 and averages in fp32 inside its kernel
                dq = self.builder_.emit(relax.op.dequantize(q, x_scale, relax.const(0, plan["dtype"]), axis=-1,
                                                            out_dtype=str(data.ty.dtype)))
                self._bind(binding.var, relax.Call(call.op, [dq, *call.args[1:]], call.attrs, call.ty_args))
                return
            weight = relax.const(plan["weight"])
            if op.kind == "conv2d":
                a = call.attrs
                acc = relax.op.nn.conv2d(q, weight, strides=a.strides, padding=a.padding, dilation=a.dilation,
                                         groups=a.groups, out_dtype="int32")
            else:
                acc = relax.op.matmul(q, weight, out_dtype="int32")
            acc = self.builder_.emit(acc)
            if plan["bias"] is not None:
                shape = (1, -1, 1, 1) if op.kind == "conv2d" else (-1,)
                self.accumulators[op] = self.builder_.emit(relax.op.add(acc, relax.const(plan["bias"].reshape(shape))))
                return  # the op's own value had one user, the bias add, which takes the accumulator
            self._bind(binding.var, _dequantize(op, acc, x_scale))
            return
        op = self.by_bias.get(binding.var)
        if op is not None and op in self.accumulators:
            self._bind(binding.var, _dequantize(op, self.accumulators[op], None))
            return
        super().visit_var_binding_(binding)


def _run_time_scale(data):
    """max|x| / 127 of this very batch (never 0)."""
    peak = relax.op.max(relax.op.abs(data))
    return relax.op.divide(relax.op.maximum(peak, relax.const(np.float32(1e-12))), relax.const(np.float32(127.0)))


def _dequantize(op: QuantizableOp, accumulator, x_scale):
    plan = op.plan
    shape = (1, -1, 1, 1) if op.kind == "conv2d" else (-1,)
    if plan["x_scale"] is None:  # run-time scale: x_scale is a tensor of the graph
        scale = relax.op.multiply(x_scale, relax.const(plan["w_scale"].astype(np.float32).reshape(shape)))
    else:
        scale = relax.const((plan["x_scale"] * plan["w_scale"]).astype(np.float32).reshape(shape))
    return relax.op.multiply(relax.op.astype(accumulator, "float32"), scale)


def quantize_graph(mod: tvm.IRModule, ops: list[QuantizableOp]) -> tvm.IRModule:
    """Rewrite the ops that carry a plan (see plan_op) to int8; the rest stay fp32."""
    planned = [op for op in ops if op.plan]
    if not planned:
        return mod
    rewriter = _Rewriter(mod, planned)
    func = rewriter.visit_expr(mod["main"])
    out = tvm.IRModule(dict(mod.functions))
    out["main"] = relax.analysis.remove_all_unused(func)
    return MoveQuantizeUp(relax.transform.Normalize()(out))


def expose_inputs(mod: tvm.IRModule, ops: list[QuantizableOp]) -> tvm.IRModule:
    """`main` returning (each op's input tensor, then its own result): the graph calibration runs. The
    inputs come first so that, flattened, they sit at known places whatever the model's outputs are."""
    func = mod["main"]
    if len(func.body.blocks) != 1 or not isinstance(func.body.blocks[0], relax.DataflowBlock):
        raise ValueError("calibration needs a graph with one dataflow block")
    block = func.body.blocks[0]
    outputs = [relax.Var(f"calib_{i}", op.data.ty) for i, op in enumerate(ops)]
    bindings = list(block.bindings) + [relax.VarBinding(o, op.data) for o, op in zip(outputs, ops)]
    body = relax.SeqExpr([relax.DataflowBlock(bindings)], relax.Tuple([*outputs, func.body.body]))
    ret = relax.TupleType([*[op.data.ty for op in ops], func.ret_ty])
    out = tvm.IRModule(dict(mod.functions))
    out["main"] = relax.Function(func.params, body, ret, True, func.attrs)
    return relax.transform.Normalize()(out)

