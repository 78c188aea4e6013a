"""The INT8 rewrite: conv2d and matmul-with-constant-weight become u8/s8 x s8 -> s32 ops.

For each quantized op, with its input's calibrated range (lo, hi):
- the input is quantized symmetrically with zero point 0: u8 over [0, hi] when lo >= 0 (ReLU outputs),
  s8 over [-m, m] otherwise (`quantized_dtype` can force s8). A zero point of 0 keeps conv zero-padding exact.
  s8 data of a dense or an unpadded conv is stored as u8 + 128, the u8 x s8 form the dot instruction takes
  in one step; 128 * sum(w) comes off in the s32 bias, so the result is the s8 one exactly;
- the weight is s8, symmetric per output channel (scale max|W[c]| / 127); for a target without VNNI its
  input-channel pairs are bounded (relay_passes.weight_pairs), which can coarsen a channel's scale;
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
from relay_passes.kernel_origins import with_span
from relay_passes.quantize_motion import MoveQuantizeUp
from relay_passes.quantized_residuals import ResidualsFromQuantized
from relay_passes.weight_pairs import quantize_bounded
from targets.intrinsics import SIGN_FLIP  # s8 data stored as u8 with this zero point (_stores_signed_as_offset_unsigned)

BIAS_LIMIT = 2**30
STEM_CHANNELS = 4  # input channels of a stem conv (RGB, RGBA, grey): its padding is done apart
OPS = {"relax.nn.conv2d": "conv2d", "relax.matmul": "dense", "relax.nn.avg_pool2d": "avg_pool",
       "relax.nn.adaptive_avg_pool2d": "avg_pool", "relax.mean": "avg_pool"}
ONNX_TYPES = {"conv2d": ("Conv",), "dense": ("Gemm", "MatMul"),
              "avg_pool": ("AveragePool", "GlobalAveragePool", "ReduceMean")}


@dataclass(eq=False)
class QuantizableOp:
    """One conv2d / dense / matmul / average pooling of the graph that can run on int8 data, named after its
    ONNX node where known. A `matmul` multiplies two activations (attention's Q.K^T and softmax.V)."""

    name: str
    kind: str  # conv2d | dense | matmul | avg_pool
    var: relax.Var  # the op's binding
    data: relax.Expr  # its input tensor
    weight: np.ndarray | None
    other: relax.Expr | None = None  # a matmul's second activation
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
        if not _is_float_tensor(data):
            continue
        if kind == "dense" and not isinstance(weight, tvm.ir.expr.GenericConst):
            if _is_float_tensor(weight) and len(data.ty.shape.values) == len(weight.ty.shape.values) >= 3:
                ops.append(QuantizableOp(name, "matmul", var, data, None, other=weight))
            continue
        if not isinstance(weight, tvm.ir.expr.GenericConst):
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


def plan_dynamic(op: QuantizableOp, per_token: bool = False, smooth: np.ndarray | None = None,
                 bounded_pairs: bool = False) -> dict:
    """A range computed at run time: s8 input with its scale max|x| / 127 of the whole batch (as MXNet's
    `calib_mode='none'`) or, `per_token`, of each row of a dense input (one scale per token). The bias stays
    an fp32 add, since its s32 scale would change with every batch."""
    w = _channel_first(op, smooth)
    weight, w_scale = _quantized_weight(op, w, _weight_scales(w), bounded_pairs)
    return {"dtype": "int8", "x_scale": None, "w_scale": w_scale, "weight": weight, "bias": None, "range": None,
            "per_token": per_token, "smooth": smooth, "bounded_pairs": bounded_pairs}


def plan_op(op: QuantizableOp, lo: float, hi: float, quantized_dtype: str = "auto",
            other: tuple[float, float] | None = None, smooth: np.ndarray | None = None,
            bounded_pairs: bool = False) -> dict | None:
    """Scales, int8 weight and s32 bias for one op; None where the input's range is empty (stays fp32).
    A matmul's second input is stored by `other`'s range; a dense input smoothed (SmoothQuant) is divided
    by `smooth` per channel, its weight rows multiplied by it. `bounded_pairs`: the weight's input-channel
    pairs are bounded for `vpmaddubsw` (a target without VNNI: relay_passes.weight_pairs)."""
    stored = plan_input(lo, hi, quantized_dtype)
    if stored is None or op.kind == "avg_pool":
        return stored
    if op.kind == "matmul":
        second = plan_input(*other, quantized_dtype) if other is not None else None
        return None if second is None else {**stored, "y_dtype": second["dtype"], "y_scale": second["x_scale"],
                                            "bias": None}
    x_scale = stored["x_scale"]
    w = _channel_first(op, smooth)
    w_scale = _weight_scales(w)
    if op.bias is not None:  # keep |bias_s32| <= 2^30 by coarsening that channel's weight scale
        w_scale = np.maximum(w_scale, np.abs(op.bias) / (x_scale * BIAS_LIMIT))
    weight, bounded_scale = _quantized_weight(op, w, w_scale, bounded_pairs)
    bias_q = None if op.bias is None else np.round(op.bias / (x_scale * bounded_scale)).astype(np.int32)
    return {**stored, "w_scale": bounded_scale, "weight": weight, "bias": bias_q, "smooth": smooth,
            "bounded_pairs": bounded_pairs, "pair_growth": float(np.max(bounded_scale / w_scale))}


def _channel_first(op: QuantizableOp, smooth: np.ndarray | None = None) -> np.ndarray:
    """The weight with output channels on axis 0: (O, I, kh, kw) for conv2d, (N, K) for dense; a smoothed
    dense weight has its input channels multiplied by `smooth`."""
    w = op.weight.astype(np.float64)
    if op.kind == "conv2d":
        return w
    return (w * smooth[:, None]).T if smooth is not None else w.T


def _weight_scales(w: np.ndarray) -> np.ndarray:
    w_max = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    return np.where(w_max > 0, w_max / 127.0, 1.0)


def _quantized_weight(op: QuantizableOp, w: np.ndarray, w_scale: np.ndarray,
                      bounded_pairs: bool) -> tuple[np.ndarray, np.ndarray]:
    """(the s8 weight as the op stores it, the per-channel scale it has: `w_scale`, or coarser where bounding
    its pairs took that)."""
    if bounded_pairs:
        q, w_scale = quantize_bounded(w, w_scale)
    else:
        q = np.clip(np.round(w / w_scale.reshape((-1,) + (1,) * (w.ndim - 1))), -127, 127).astype(np.int8)
    return (q if op.kind == "conv2d" else np.ascontiguousarray(q.T)), w_scale


def plan_with_shift(op: QuantizableOp, shift: np.ndarray) -> None:
    """Fold a per-channel correction of the op's fp32 output (bias correction) into its s32 bias; an op
    without a bias gets one."""
    plan = op.plan
    bias = (op.bias if op.bias is not None else 0.0) + shift.astype(np.float64)
    w_scale = np.maximum(plan["w_scale"], np.abs(bias) / (plan["x_scale"] * BIAS_LIMIT))
    if not np.array_equal(w_scale, plan["w_scale"]):
        plan["weight"], w_scale = _quantized_weight(op, _channel_first(op, plan.get("smooth")), w_scale,
                                                    plan.get("bounded_pairs", False))
    plan["w_scale"] = w_scale
    plan["bias"] = np.round(bias / (plan["x_scale"] * w_scale)).astype(np.int32)


def output_channels(op: QuantizableOp) -> int:
    """How many output channels a bias correction can shift: a conv2d's or dense's with a calibrated input
    scale (an s32 bias to fold into); 0 for the rest."""
    if not op.plan or op.plan["x_scale"] is None or op.kind not in ("conv2d", "dense"):
        return 0
    return op.weight.shape[0] if op.kind == "conv2d" else op.weight.shape[1]


@dataclass
class _Simulation:
    """The run-time parameters of a simulation graph: per op, a 0/1 switch (int8 or fp32), and per output
    channel of the conv/dense ops, a shift added to their int8 output (a candidate bias correction)."""

    int8_mask: relax.Var
    bias_shift: relax.Var
    offsets: dict  # op -> first channel of its shift
    index: dict  # op -> its switch
    means: list = field(default_factory=list)  # (op, mean of fp32 output, mean of int8 output) per channel


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    """Rewrites the planned ops to int8. With a `_Simulation`, each op computes both its fp32 and its int8
    value and passes on one or the other by its switch, and records both values' channel means."""

    def __init__(self, mod, ops, simulation: _Simulation | None = None):
        super().__init__(mod)
        self.by_var = {op.var: op for op in ops}
        # the ops whose bias add joins the s32 accumulator (without a calibrated scale it stays an fp32 add)
        self.by_bias = {op.bias_var: op for op in ops if op.bias_var is not None and op.plan["bias"] is not None}
        self.simulation = simulation
        self.pending = {}  # op -> its int8 value, until the bias add it replaces

    def _bind(self, var, value, span=None):
        if span is not None:  # its arguments bound first: normalizing them would rebuild the call without it
            value = with_span(self.builder_.normalize(value), span)
        new = self.builder_.emit(value) if isinstance(var, relax.DataflowVar) else self.builder_.emit_output(value)
        self.set_var_remap(var, new)

    def visit_var_binding_(self, binding):
        op = self.by_var.get(binding.var)
        if op is not None:
            data = self.visit_expr(op.data)
            int8 = self._int8_value(op, binding.value, data)
            if op.bias_var in self.by_bias:  # the bias add that reads this op takes its place
                self.pending[op] = int8
                if self.simulation is not None:
                    super().visit_var_binding_(binding)  # the fp32 op, for the fp32 value
                return
            self._bind(binding.var, self._result(op, int8, binding.value), binding.value.span)
            return
        op = self.by_bias.get(binding.var)
        if op is not None and op in self.pending:
            self._bind(binding.var, self._result(op, self.pending.pop(op), binding.value), binding.value.span)
            return
        super().visit_var_binding_(binding)

    def _result(self, op, int8, fp32_value):
        """What the op passes on: its int8 value, or in a simulation the switched one."""
        sim = self.simulation
        if sim is None:
            return int8
        fp32 = self.builder_.emit(self.visit_expr(fp32_value))
        if op in sim.offsets:
            channels = output_channels(op)
            start = sim.offsets[op]
            shift = self.builder_.emit(relax.op.strided_slice(sim.bias_shift, axes=[0], begin=[start],
                                                              end=[start + channels]))
            int8 = self.builder_.emit(relax.op.add(int8, relax.op.reshape(shift, _channel_shape(op))))
            axes = [0, 2, 3] if op.kind == "conv2d" else list(range(len(fp32.ty.shape.values) - 1))
            sim.means.append((op, self.builder_.emit(relax.op.mean(fp32, axis=axes)),
                              self.builder_.emit(relax.op.mean(int8, axis=axes))))
        k = sim.index[op]
        switch = self.builder_.emit(relax.op.strided_slice(sim.int8_mask, axes=[0], begin=[k], end=[k + 1]))
        return relax.op.add(fp32, relax.op.multiply(switch, relax.op.subtract(int8, fp32)))

    def _int8_value(self, op, call, data):
        """The op on int8 data, back in fp32: quantize, int8 op (s32), s32 bias, dequantize."""
        plan = op.plan
        if plan.get("smooth") is not None:  # SmoothQuant: the input's channels divided, the weight's multiplied
            data = self.builder_.emit(relax.op.multiply(data, relax.const((1 / plan["smooth"]).astype(np.float32))))
        offset = _stores_signed_as_offset_unsigned(op, call)
        if plan.get("per_token"):
            q, x_scale = self._quantize_rows(data)
        else:
            x_scale = relax.const(np.float32(plan["x_scale"])) if plan["x_scale"] is not None else \
                self.builder_.emit(_run_time_scale(data))
            dtype, zero_point = ("uint8", SIGN_FLIP) if offset else (plan["dtype"], 0)
            q = self.builder_.emit(relax.op.quantize(data, x_scale, relax.const(zero_point, dtype), axis=-1,
                                                     out_dtype=dtype))
        if op.kind == "avg_pool":  # the pooling reads int8 and averages in fp32 inside its kernel
            dq = self.builder_.emit(relax.op.dequantize(q, x_scale, relax.const(0, plan["dtype"]), axis=-1,
                                                        out_dtype=str(data.ty.dtype)))
            return relax.Call(call.op, [dq, *call.args[1:]], call.attrs, call.ty_args, call.span)
        if op.kind == "matmul":
            y_scale = relax.const(np.float32(plan["y_scale"]))
            other = self.visit_expr(op.other)
            qy = self.builder_.emit(relax.op.quantize(other, y_scale, relax.const(0, plan["y_dtype"]), axis=-1,
                                                      out_dtype=plan["y_dtype"]))
            acc = self.builder_.emit(relax.op.matmul(q, qy, out_dtype="int32"))
            scale = relax.const(np.float32(plan["x_scale"] * plan["y_scale"]))
            return relax.op.multiply(relax.op.astype(acc, "float32"), scale)
        weight = relax.const(plan["weight"])
        if op.kind == "conv2d":
            a = call.attrs
            padding = [int(p) for p in a.padding]
            if offset and any(padding):  # a stem's padding, done before it: 128 is the u8 form of s8 zero
                top, left, bottom, right = padding
                q = self.builder_.emit(relax.op.nn.pad(q, [0, 0, 0, 0, top, bottom, left, right],
                                                       pad_value=float(SIGN_FLIP)))
                padding = [0, 0, 0, 0]
            acc = relax.op.nn.conv2d(q, weight, strides=a.strides, padding=padding, dilation=a.dilation,
                                     groups=a.groups, out_dtype="int32")
        else:
            acc = relax.op.matmul(q, weight, out_dtype="int32")
        acc = self.builder_.emit(acc)
        bias = plan["bias"]
        if offset:  # the + 128 of every input byte, times the weights: a constant per output channel
            axes = tuple(range(1, plan["weight"].ndim)) if op.kind == "conv2d" else 0
            offset_sum = SIGN_FLIP * plan["weight"].astype(np.int32).sum(axis=axes, dtype=np.int32)
            bias = (0 if bias is None else bias) - offset_sum
        if bias is not None:
            acc = self.builder_.emit(relax.op.add(acc, relax.const(bias.astype(np.int32).reshape(_channel_shape(op)))))
        return _dequantize(op, acc, x_scale)

    def _quantize_rows(self, data):
        """Per-token s8: each row (last axis) with its own scale max|row| / 127, computed at run time."""
        peak = relax.op.max(relax.op.abs(data), axis=[-1], keepdims=True)
        scale = self.builder_.emit(relax.op.divide(relax.op.maximum(peak, relax.const(np.float32(1e-12))),
                                                   relax.const(np.float32(127.0))))
        rounded = relax.op.round(relax.op.divide(data, scale))
        q = self.builder_.emit(relax.op.astype(relax.op.clip(rounded, -127, 127), "int8"))
        return q, scale


def _stores_signed_as_offset_unsigned(op: QuantizableOp, call: relax.Call) -> bool:
    """s8 data of a dense or an unpadded conv is stored as u8 + 128 (the same values: the zero point is 128).
    `vpdpbusd` multiplies u8 by s8, so s8 data costs it a second instruction per step (targets.intrinsics);
    here the + 128 comes off as a constant 128 * sum(w) per output channel, folded into the s32 bias, and the
    result is exact. A padded conv's padding would have to be 128, and the conv pads with 0: a stem (a conv
    on an image's few channels) is padded by a pad op of its own before it; any other padded conv keeps s8,
    as a pad op between blocked tensors would be a pass over its input (a stem's input is not blocked yet)."""
    if op.plan["dtype"] != "int8" or op.plan.get("per_token") or op.kind not in ("conv2d", "dense"):
        return False
    if op.kind == "dense" or not any(int(p) for p in call.attrs.padding):
        return True
    return int(call.attrs.groups) == 1 and op.weight.shape[1] <= STEM_CHANNELS


def _channel_shape(op: QuantizableOp) -> tuple:
    return (1, -1, 1, 1) if op.kind == "conv2d" else (-1,)


def _run_time_scale(data):
    """max|x| / 127 of this very batch (never 0)."""
    peak = relax.op.max(relax.op.abs(data))
    return relax.op.divide(relax.op.maximum(peak, relax.const(np.float32(1e-12))), relax.const(np.float32(127.0)))


def _dequantize(op: QuantizableOp, accumulator, x_scale):
    plan = op.plan
    shape = _channel_shape(op)
    if plan["x_scale"] is None:  # run-time scale: x_scale is a tensor of the graph (per row: (..., 1))
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
    return ResidualsFromQuantized(MoveQuantizeUp(relax.transform.Normalize()(out)))


def simulate_graph(mod: tvm.IRModule, ops: list[QuantizableOp]) -> tuple[tvm.IRModule, list[QuantizableOp]]:
    """The graph with every planned op computed both in fp32 and in int8, chosen at run time.

    `main` takes two parameters after the model's inputs: `int8_mask` (float32, one 0/1 per planned op, in
    `ops` order) and `bias_shift` (float32, the channels of every conv/dense op in order, added to its int8
    output). It returns (per corrected op: its fp32 output's channel means; then their int8 means; then
    the model's outputs). The second value returned lists the corrected ops, in that order. One build then
    answers every "what if these layers were int8, with these corrections" question."""
    planned = [op for op in ops if op.plan]
    corrected = [op for op in planned if output_channels(op)]
    offsets = dict(zip(corrected, np.cumsum([0] + [output_channels(op) for op in corrected[:-1]]).tolist()))
    total = sum(output_channels(op) for op in corrected)
    sim = _Simulation(relax.Var("int8_mask", relax.TensorType((len(planned),), "float32")),
                      relax.Var("bias_shift", relax.TensorType((max(total, 1),), "float32")),
                      offsets, {op: k for k, op in enumerate(planned)})
    rewritten = _Rewriter(mod, planned, sim).visit_expr(mod["main"])
    means = {op: (f, q) for op, f, q in sim.means}
    order = [op for op in corrected if op in means]
    means = [means[op][0] for op in order] + [means[op][1] for op in order]
    outputs = [relax.Var(f"mean_{i}", m.ty) for i, m in enumerate(means)]  # non-dataflow: they leave the block
    (block,) = rewritten.body.blocks
    bindings = list(block.bindings) + [relax.VarBinding(o, m) for o, m in zip(outputs, means)]
    body = relax.SeqExpr([relax.DataflowBlock(bindings)], relax.Tuple([*outputs, rewritten.body.body]))
    attrs = {**{k: v for k, v in rewritten.attrs.items()}, "num_input": len(rewritten.params) + 2}
    out = tvm.IRModule(dict(mod.functions))
    ret = relax.TupleType([*(m.ty for m in means), rewritten.ret_ty])
    out["main"] = relax.Function([*rewritten.params, sim.int8_mask, sim.bias_shift], body, ret, True,
                                 tvm.ir.DictAttrs(attrs))
    return relax.transform.Normalize()(out), order


def expose_inputs(mod: tvm.IRModule, ops: list[QuantizableOp]) -> tvm.IRModule:
    """`main` returning (each op's input tensor, then each matmul's second input, then its own result): the
    graph calibration runs. The inputs come first so that, flattened, they sit at known places whatever the
    model's outputs are."""
    func = mod["main"]
    if len(func.body.blocks) != 1 or not isinstance(func.body.blocks[0], relax.DataflowBlock):
        raise ValueError("calibration needs a graph with one dataflow block")
    block = func.body.blocks[0]
    tensors = [op.data for op in ops] + [op.other for op in ops if op.other is not None]
    outputs = [relax.Var(f"calib_{i}", t.ty) for i, t in enumerate(tensors)]
    bindings = list(block.bindings) + [relax.VarBinding(o, t) for o, t in zip(outputs, tensors)]
    body = relax.SeqExpr([relax.DataflowBlock(bindings)], relax.Tuple([*outputs, func.body.body]))
    ret = relax.TupleType([*[t.ty for t in tensors], func.ret_ty])
    out = tvm.IRModule(dict(mod.functions))
    out["main"] = relax.Function(func.params, body, ret, True, func.attrs)
    return relax.transform.Normalize()(out)

