"""Apply the fusion rules of `patterns.RULES` with FuseOpsByPattern, and say what was and was not fused.

Each match becomes one Relax function (attribute `Composite` = the rule name) that lowers to one kernel.
A match is refused, and the refusal recorded, when fusing would hide a value another op reads, when the
bias is not per channel, when the summed tensor would be broadcast, or when a clip does not start at 0.
Then, when any rule is given, the chains of elementwise and injective ops left over are fused into their
producer's group or into kernels of their own (relay_passes.fuse_elementwise, `report.elementwise`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax
from tvm.relax.backend.utils import has_leaking_intermediate_variables
from tvm.relax.transform import FusionPattern, PatternCheckContext

from relay_passes.analysis import channel_vector
from relay_passes.fuse_elementwise import ElementwiseReport, fuse_elementwise
from relay_passes.patterns import RULE_NAMES, RULES


@dataclass
class FusionReport:
    fusion: dict[str, int] = field(default_factory=dict)  # rule name -> matches
    unfused_ops: dict[str, int] = field(default_factory=dict)  # op type -> count outside any fused group
    rejected: list[dict] = field(default_factory=list)  # {rule, at, reason}
    elementwise: ElementwiseReport = field(default_factory=ElementwiseReport)  # the chains fused after the rules

    def to_json(self) -> dict:
        return {"fusion": dict(self.fusion), "unfused_ops": dict(self.unfused_ops), "rejected": list(self.rejected),
                "elementwise": self.elementwise.to_json()}


def select_rules(fuse) -> tuple[str, ...]:
    """`fuse`: True (all rules), False/None (none), or an iterable of rule names."""
    if fuse is True:
        return RULE_NAMES
    if not fuse:
        return ()
    names = (fuse,) if isinstance(fuse, str) else tuple(fuse)
    unknown = [n for n in names if n not in RULE_NAMES]
    if unknown:
        raise ValueError(f"unknown fusion rule(s) {', '.join(unknown)}; rules are {', '.join(RULE_NAMES)}")
    return tuple(n for n in RULE_NAMES if n in names)


def _shape(expr) -> tuple | None:
    shape = getattr(expr.ty, "shape", None)
    if shape is None:
        return None
    return tuple(int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in shape.values)


def _bias_is_per_channel(producer, bias) -> bool:
    return channel_vector(bias.value.numpy(), producer) is not None


def _clip_from_zero(act) -> bool:
    """A clip or maximum ending the group must be a ReLU6 / bounded ReLU (or HardSigmoid): lower bound 0."""
    if act.op.name == "relax.clip":
        return float(act.args[1].value) == 0.0
    if act.op.name == "relax.maximum":
        const = next(a for a in act.args if hasattr(a, "value") and hasattr(a.value, "numpy"))
        return bool(np.all(const.value.numpy() == 0))
    return True


ATTENTION_QUERY_MULTIPLE = 16  # the fused kernel runs query rows across vector lanes: whole vectors on every target


def _attention_misfit(scores, probs, context) -> str | None:
    """Why an attention match cannot be one kernel (targets.attention), or None."""
    shape = _shape(scores)
    if str(scores.ty.dtype) != "float32":
        return f"the scores are {scores.ty.dtype}, not float32"
    if shape is None or None in shape or len(shape) < 3:
        return "the scores are not a static batch of matrices"
    operands = (scores.args[0], scores.args[1], context.args[1])
    if any(_shape(x) is None or _shape(x)[:-2] != shape[:-2] for x in operands):
        return "Q, K and V do not have the scores' batch shape (one of them is broadcast)"
    if int(probs.attrs.axis) % len(shape) != len(shape) - 1:
        return "the softmax is not over the keys (the last axis)"
    if shape[-2] % ATTENTION_QUERY_MULTIPLE:
        return (f"{shape[-2]} queries, not a multiple of {ATTENTION_QUERY_MULTIPLE}: the scores, softmax and "
                "context stay kernels of their own")
    return None


def _check(rule_name: str, rejected: list):
    def reject(ctx, reason) -> bool:
        var = ctx.value_to_bound_var.get(ctx.matched_expr)
        rejected.append({"rule": rule_name, "at": var.name if var is not None else "?", "reason": reason})
        return False

    def check(ctx: PatternCheckContext) -> bool:
        parts = ctx.annotated_expr
        if has_leaking_intermediate_variables(ctx):
            if ctx.matched_expr.op.name == "relax.quantize":
                return reject(ctx, "the quantize for the next int8 op stays a kernel of its own: the fp32 "
                                   "value it reads is also used elsewhere")
            return reject(ctx, "an intermediate value is also read outside the group")
        producer = parts.get("producer")
        if "bias" in parts and not _bias_is_per_channel(producer, parts["bias"]):
            return reject(ctx, f"bias of shape {list(parts['bias'].value.numpy().shape)} is not per channel")
        if "sum_operand" in parts and _shape(parts["sum_operand"]) != _shape(parts["sum"]):
            return reject(ctx, f"the summed tensor {list(_shape(parts['sum_operand']) or [])} would be broadcast "
                               f"onto {list(_shape(parts['sum']) or [])}")
        if "probs" in parts and (reason := _attention_misfit(parts["scores"], parts["probs"], parts["root"])):
            return reject(ctx, reason)
        if "act" in parts and not _clip_from_zero(parts["act"]):
            return reject(ctx, "clip does not start at 0 (not a bounded ReLU)")
        return True

    return check


def fuse(mod: tvm.IRModule, rules=RULE_NAMES) -> tuple[tvm.IRModule, FusionReport]:
    """Fuse `mod` with the named rules; return it with the report (matches, unfused ops, refusals)."""
    report = FusionReport()
    patterns = []
    for rule in RULES:
        if rule.name in rules:
            for pattern, parts in rule.build():
                patterns.append(FusionPattern(rule.name, pattern, parts, _check(rule.name, report.rejected)))
    if patterns:
        mod = relax.transform.FuseOpsByPattern(patterns, bind_constants=False)(mod)
    # A refusal at a value that some other match then fused (an inner op of a longer activation, say)
    # explains nothing: keep those about values no rule fused (an elementwise chain may still take them).
    standalone = {var.name for var, value in relax.analysis.get_var2val(mod["main"]).items()
                  if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)}
    refusals = [r for r in report.rejected if r["at"] in standalone]
    report.rejected = [dict(t) for t in dict.fromkeys(tuple(r.items()) for r in refusals)]
    if rules:
        mod, report.elementwise = fuse_elementwise(mod, _composites(mod))
        stored = set(report.elementwise.second_outputs)  # quantizes their producer's kernel now stores
        report.rejected = [r for r in report.rejected if r["at"] not in stored]
    report.fusion = {name: 0 for name in rules}
    composite = _composites(mod)
    unfused = Counter()

    def visit(expr):
        if not isinstance(expr, relax.Call):
            return
        if isinstance(expr.op, relax.GlobalVar) and expr.op.name_hint in composite:
            report.fusion[composite[expr.op.name_hint]] += 1
        elif isinstance(expr.op, tvm.ir.Op) and expr.op.name != "relax.layout_transform":
            unfused[op_type(expr)] += 1  # (layout conversions are edges, not ops of the model)

    relax.analysis.post_order_visit(mod["main"].body, visit)
    report.unfused_ops = dict(sorted(unfused.items()))
    return mod, report


def _composites(mod) -> dict[str, str]:
    """{function name: rule name} of the rules' groups in `mod`."""
    return {gv.name_hint: str(func.attrs["Composite"]) for gv, func in mod.functions.items()
            if isinstance(func, relax.Function) and func.attrs and "Composite" in func.attrs}


def op_type(call: relax.Call) -> str:
    """A readable op type: `conv2d`, `relu`, or `call_tir:<kernel>` for importer-made kernels."""
    name = call.op.name.removeprefix("relax.").removeprefix("nn.")
    if name == "call_tir":
        return f"call_tir:{call.args[0].name_hint if hasattr(call.args[0], 'name_hint') else call.args[0]}"
    return name
