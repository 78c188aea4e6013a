"""After the pattern rules: fuse the chains of elementwise and injective ops that are left, into their
producer's kernel (a rule's group takes elementwise ops as its epilogue) or into one kernel of their own.

A group grows from its first binding (a rule's group or a fusible op) along the bindings that read it, and
stops where a value leaves the group: it closes only at a binding whose result is then the one value the
rest of the graph reads (so `x * clip(x + 3, 0, 6) / 6` closes at the last divide, `x` read twice inside).
Intermediate values are never read outside their group, so the group can run where its last op ran.

A producer (a rule's group, or a conv/matmul no rule took) takes only elementwise ops of its own output
shape: its schedule computes the epilogue on each register tile (targets.schedules). Injective ops (reshape,
transpose) join only kernels of their own.

One exception to the single value: where a producer's fp32 result is read both by a quantize (the next int8
op's input) and by something else (a residual add), the quantize becomes the kernel's second output. The
tile is then stored twice, fp32 and int8, instead of read back whole by a quantize kernel of its own.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from relay_passes.analysis import op_name, static_shape, use_counts

ELEMENTWISE_OPS = frozenset("relax." + name for name in (
    "add subtract multiply divide floor_divide power maximum minimum clip negative abs exp log sqrt rsqrt "
    "square sigmoid tanh erf round floor ceil trunc sign astype quantize dequantize "
    "nn.relu nn.gelu nn.gelu_tanh nn.silu nn.leakyrelu nn.softplus").split())
# (layout_transform is not among them: the blocked-layout conversions stay kernels of their own, which the
# compile report counts apart, targets.layout's business.)
INJECTIVE_OPS = frozenset("relax." + name for name in (
    "reshape permute_dims expand_dims squeeze flatten").split())
# Ops worth computing once per element of their own result: a kernel holding one does not take an op that
# would broadcast its values onto a larger tensor (that op would recompute them for every element).
COSTLY_OPS = frozenset("relax." + name for name in (
    "exp log sqrt rsqrt power sigmoid tanh erf nn.gelu nn.gelu_tanh nn.silu nn.softplus").split())
# A conv or matmul no rule took (no bias, or two activations as in attention) still takes an epilogue.
ANCHOR_OPS = frozenset({"relax.nn.conv2d", "relax.matmul"})
# The rank of a tensor in the blocked layout NCHW{c}: where a producer may store a quantized copy.
BLOCKED_RANK = 5
# How far past a group's last op to look for the binding where its values meet again.
LOOKAHEAD = 24


@dataclass
class ElementwiseReport:
    """Elementwise/injective fusion: `kernels` made of such ops alone and the `ops` inside them;
    `epilogue_ops`: ops hung on a producer's kernel (a rule's group, or a conv/matmul no rule took);
    `chains`: each fused op list (the producer first: a rule's name or the op) and how many times;
    `second_outputs`: the quantizes stored by their producer's kernel beside its fp32 result (their values)."""
    kernels: int = 0
    ops: int = 0
    epilogue_ops: int = 0
    chains: dict[str, int] = field(default_factory=dict)
    second_outputs: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"kernels": self.kernels, "ops": self.ops, "epilogue_ops": self.epilogue_ops,
                "chains": dict(sorted(self.chains.items())), "second_outputs": len(self.second_outputs)}


@dataclass
class _Group:
    members: list[int]  # binding indices, in order
    composite: str | None  # the rule whose group this grows, if any
    anchor_shape: tuple | None  # a rule's group or a conv/matmul: its output shape, the epilogue's
    second_output: int | None = None  # a quantize of the group's result, stored by the same kernel


def fuse_elementwise(mod: tvm.IRModule, composites: dict[str, str]) -> tuple[tvm.IRModule, ElementwiseReport]:
    """Fuse the elementwise/injective chains of `mod["main"]`. `composites`: {function name: rule name} of
    the rules' groups."""
    report = ElementwiseReport()
    main = mod["main"]
    uses = use_counts(main)
    builder = relax.BlockBuilder(mod)
    blocks = []
    chains = Counter()
    for block in main.body.blocks:
        if not isinstance(block, relax.DataflowBlock):
            blocks.append(block)
            continue
        bindings = list(block.bindings)
        groups = _find_groups(bindings, uses, composites)
        replaced = {}
        for group in groups:
            gvar, args, ops = _make_function(builder, mod, bindings, group)
            replaced[group.members[-1]] = _call_bindings(bindings, group, relax.Call(gvar, args))
            if group.second_output is not None:
                report.second_outputs.append(bindings[group.second_output].var.name)
            if group.anchor_shape is None:
                report.kernels += 1
                report.ops += len(ops)
            else:  # the first op (or the rule's group) is the producer
                report.epilogue_ops += len(ops) - (group.composite is None)
            chains["+".join(ops if group.composite is None else [group.composite, *ops])] += 1
        inside = {i for g in groups for i in g.members + [g.second_output]}
        kept = [c for i, b in enumerate(bindings) if i not in inside or i in replaced for c in replaced.get(i, [b])]
        blocks.append(relax.DataflowBlock(kept))
    report.chains = dict(chains)
    if not any(report.chains):
        return mod, report
    result = builder.get()
    result["main"] = relax.Function(main.params, relax.SeqExpr(blocks, main.body.body), main.ret_ty,
                                    main.is_pure, main.attrs)
    result = relax.transform.Normalize()(result)
    return relax.transform.DeadCodeElimination(["main"])(result), report


def _composite(value, composites) -> str | None:
    if isinstance(value, relax.Call) and isinstance(value.op, relax.GlobalVar):
        return composites.get(value.op.name_hint)
    return None


def _shape(var) -> tuple | None:
    shape = getattr(var.ty, "shape", None)
    return None if shape is None else tuple(str(d) for d in shape.values)


def _find_groups(bindings, uses, composites) -> list[_Group]:
    groups, taken = [], set()
    for i, binding in enumerate(bindings):
        if i in taken:
            continue
        rule, op = _composite(binding.value, composites), op_name(binding.value)
        if rule is None and op not in ELEMENTWISE_OPS | INJECTIVE_OPS | ANCHOR_OPS:
            continue
        anchored = rule is not None or op in ANCHOR_OPS
        group = _Group([i], rule, _shape(binding.var) if anchored else None)
        _grow(group, bindings, uses, taken)
        if anchored:
            group.second_output = _second_quantize(group, bindings, uses, taken)
        if len(group.members) > 1 or group.second_output is not None:
            groups.append(group)
            taken.update(group.members + [group.second_output])
    return groups


def _second_quantize(group: _Group, bindings, uses, taken) -> int | None:
    """The quantize (by constants) of the group's result where that result is also read elsewhere, or None."""
    result = bindings[group.members[-1]].var
    if uses.get(result, 0) < 2:
        return None  # its only reader, if fusible, has joined the group already
    if len(_shape(result) or ()) != BLOCKED_RANK:
        return None  # a conv left NCHW stores its tile over flattened pixels, which the copy's store cannot follow
    for j in range(group.members[-1] + 1, min(group.members[-1] + 1 + LOOKAHEAD, len(bindings))):
        value = bindings[j].value
        if (j not in taken and op_name(value) == "relax.quantize" and value.args[0].same_as(result)
                and not any(isinstance(a, relax.Var) for a in value.args[1:])
                and _shape(bindings[j].var) == _shape(result)):
            return j
    return None


def _call_bindings(bindings, group: _Group, call) -> list:
    """The bindings that replace the group in `main`: its call, bound to its last value's variable; with a
    second output, the call's pair and both variables bound to its fields (the readers keep their variables)."""
    result = bindings[group.members[-1]].var
    if group.second_output is None:
        return [relax.VarBinding(result, call)]
    quantized = bindings[group.second_output].var
    pair = relax.DataflowVar(f"{result.name}_pair", relax.TupleType([result.ty, quantized.ty]))
    return [relax.VarBinding(pair, call), relax.VarBinding(result, relax.TupleGetItem(pair, 0)),
            relax.VarBinding(quantized, relax.TupleGetItem(pair, 1))]


def _elements(var) -> int | None:
    shape = static_shape(var)
    return None if shape is None else int(np.prod(shape))


def _can_join(group: _Group, binding, costly_elements: int) -> bool:
    op = op_name(binding.value)
    if group.anchor_shape is None:
        size = _elements(binding.var)
        broadcasts_costly = costly_elements > 0 and (size is None or size > costly_elements)
        return op in ELEMENTWISE_OPS | INJECTIVE_OPS and not broadcasts_costly
    return op in ELEMENTWISE_OPS and _shape(binding.var) == group.anchor_shape


def _grow(group: _Group, bindings, uses, taken) -> None:
    """Add the bindings after the group that read it, up to the last point where the group's values meet
    again in one (only it is read outside); stop at a reader that cannot join."""
    pending = {bindings[group.members[0]].var: uses.get(bindings[group.members[0]].var, 2)}
    costly = _costly_elements(bindings[group.members[0]], 0)
    tentative = []
    last = group.members[0]
    for j in range(group.members[0] + 1, len(bindings)):
        if j - last > LOOKAHEAD:
            break
        binding = bindings[j]
        read = [v for v in relax.analysis.free_vars(binding.value) if v in pending]  # each var once
        if not read:
            continue
        if j in taken or not _can_join(group, binding, costly):
            break
        tentative.append(j)
        costly = _costly_elements(binding, costly)
        last = j
        for v in read:
            pending[v] -= 1
        pending[binding.var] = uses.get(binding.var, 2)
        open_values = [v for v, n in pending.items() if n > 0]
        if open_values == [binding.var]:  # everything before meets here: a valid group
            group.members.extend(tentative)
            tentative = []
            pending = {binding.var: pending[binding.var]}
        if isinstance(binding.var, relax.Var) and not isinstance(binding.var, relax.DataflowVar):
            break  # a function output: nothing fuses past it


def _costly_elements(binding, so_far: int) -> int:
    """The largest result of a costly op in a group, with `binding` added."""
    if op_name(binding.value) not in COSTLY_OPS:
        return so_far
    return max(so_far, _elements(binding.var) or 0)


def _make_function(builder, mod, bindings, group: _Group):
    """The group as one Relax function (Primitive, so FuseTIR makes one kernel of it); returns its global
    var, the arguments to call it with, and the op names fused (those after the rule's group, if any)."""
    params, args, env = [], [], {}

    def leaf(expr):
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([leaf(f) for f in expr.fields])
        if not isinstance(expr, (relax.Var, tvm.ir.expr.GenericConst)):
            return expr  # shapes, prim values: attributes of the op, not data
        if expr in env:
            return env[expr]
        # an outside value or a constant (constants are parameters: FuseTIR takes no tensor constants)
        param = relax.Var(f"p{len(params)}", expr.ty)
        params.append(param)
        args.append(expr)
        env[expr] = param
        return param

    ops = []
    inner = relax.BlockBuilder()
    with inner.function("fused", attrs={"Primitive": True}, private=True):
        with inner.dataflow():
            result = None
            for index in group.members:
                binding = bindings[index]
                call = binding.value
                if isinstance(call.op, relax.GlobalVar):
                    result = _inline(inner, mod[call.op], [leaf(a) for a in call.args])
                else:
                    ops.append(call.op.name.removeprefix("relax.").removeprefix("nn."))
                    result = inner.emit(relax.Call(call.op, [leaf(a) for a in call.args], call.attrs, call.ty_args))
                env[binding.var] = result
            if group.second_output is not None:
                quantize = bindings[group.second_output].value
                ops.append("quantize")
                result = relax.Tuple([result, inner.emit(relax.Call(
                    quantize.op, [leaf(a) for a in quantize.args], quantize.attrs, quantize.ty_args))])
            output = inner.emit_output(result)
        inner.emit_func_output(output, params)
    func = inner.get()["fused"]
    if group.composite is not None:
        func = func.with_attr("Composite", group.composite)
        name = f"{bindings[group.members[0]].value.op.name_hint}_{'_'.join(ops)}"
    else:
        name = "fused_" + "_".join(ops)
    return builder.add_func(func, name), args, ops


def _inline(builder, func: relax.Function, args):
    """Emit `func`'s body (one dataflow block, as FuseOpsByPattern writes it) with its params bound to `args`."""
    env = dict(zip(func.params, args))

    def remap(expr):
        if isinstance(expr, relax.Var):
            return env.get(expr, expr)
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([remap(f) for f in expr.fields])
        return expr

    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            env[binding.var] = builder.emit(relax.Call(value.op, [remap(a) for a in value.args], value.attrs,
                                                       value.ty_args))
    return remap(func.body.body)
