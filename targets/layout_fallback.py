"""Per-op fallback of the blocked layout: where TVM's ConvertLayout fails on one op, that op alone stays NCHW.

ConvertLayout rewrites the graph in one forward pass and raises on the first op whose layout rule cannot
handle its input's layout (conv2d_transpose reading a blocked tensor, a reshape to another rank...). During a
conversion every op's layout rule (FRelaxInferLayout) is wrapped: the wrapper remembers which call it is
converting, so the call at fault is known when the pass raises, and it answers "no layout decision" for the
pinned calls, which makes ConvertLayout transform their inputs back to NCHW (its default policy). Each
failure pins its call and the conversion is retried, so the rest of the graph stays blocked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import tvm
from tvm import relax

from targets.layout_rules import INFER_LAYOUT, override_layout_rules

# ConvertLayout's failures: TVM's InternalError is a RuntimeError; shape inference raises ValueError/TypeError.
CONVERSION_ERRORS = (RuntimeError, ValueError, TypeError)


@dataclass(frozen=True)
class LayoutFallback:
    """One op left in NCHW (its inputs transformed back from the blocked layout) and why."""
    at: str  # the Relax value it computes ("graph": the whole graph stayed NCHW)
    op: str  # its Relax op, e.g. relax.nn.conv2d_transpose
    reason: str
    shape: tuple[int, ...] = ()  # the value's shape (Relax value names repeat in a graph)

    @classmethod
    def of(cls, var: relax.Var, op: str, reason: str) -> LayoutFallback:
        shape = getattr(var.ty, "shape", None)
        dims = tuple(int(d) for d in shape.values) if isinstance(shape, relax.ShapeExpr) else ()
        return cls(var.name, op, reason, dims)

    def to_json(self) -> dict:
        return {**asdict(self), "shape": list(self.shape)}


def error_reason(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[-1] if text else type(err).__name__


def op_names(mod: tvm.IRModule) -> set[str]:
    """The Relax ops called anywhere in `mod`'s Relax functions."""
    names = set()

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            names.add(expr.op.name)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return names


def bound_calls(mod: tvm.IRModule) -> list[tuple[relax.Call, relax.Var]]:
    """(call, the value it is bound to) for every call bound in `mod`'s Relax functions."""
    found = []
    for func in mod.functions.values():
        if isinstance(func, relax.Function) and isinstance(func.body, relax.SeqExpr):
            for block in func.body.blocks:
                found += [(b.value, b.var) for b in block.bindings if isinstance(b.value, relax.Call)]
    return found


class _LayoutRuleTracer:
    """While active, every layout rule of the ops in `names` records its call, and pinned calls get none."""

    def __init__(self, names: set[str], pinned: list[relax.Call]):
        self.pinned = pinned
        self.current: relax.Call | None = None
        rules = {name: tvm.ir.Op.get(name).get_attr(INFER_LAYOUT) for name in sorted(names)}
        self._overrides = override_layout_rules(
            {name: self._traced(rule) for name, rule in rules.items() if rule is not None})

    def _traced(self, rule):
        def traced(call, desired_layouts, var_layout_map):
            self.current = call
            if any(call.same_as(p) for p in self.pinned):
                return None  # ConvertLayout's default policy: inputs and output in the initial layout
            return rule(call, desired_layouts, var_layout_map)

        return traced

    def __enter__(self):
        self._overrides.__enter__()
        return self

    def __exit__(self, *exc):
        return self._overrides.__exit__(*exc)


def convert_pinning_failures(mod: tvm.IRModule, convert, max_pins: int = 64):
    """`convert(mod)` (a ConvertLayout run), retried with each op it fails on pinned to NCHW.

    Returns (converted module, [LayoutFallback]); raises the last conversion error when a failure cannot
    be put on one op (the same call fails again once pinned, or more than `max_pins` do)."""
    bound = bound_calls(mod)
    pinned: list[relax.Call] = []
    fallbacks: list[LayoutFallback] = []
    while True:
        tracer = _LayoutRuleTracer(op_names(mod), pinned)
        try:
            with tracer:
                return convert(mod), fallbacks
        except CONVERSION_ERRORS as err:
            culprit = tracer.current
            if culprit is None or any(culprit.same_as(p) for p in pinned) or len(pinned) >= max_pins:
                raise
            pinned.append(culprit)
            var = next((v for call, v in bound if call.same_as(culprit)), None)
            reason = error_reason(err)
            fallbacks.append(LayoutFallback.of(var, culprit.op.name, reason) if var is not None
                             else LayoutFallback("?", culprit.op.name, reason))


def plain_layout_readers(mod: tvm.IRModule) -> list[LayoutFallback]:
    """The ops of a converted `main` that read a blocked tensor transformed back to NCHW: where the
    blocked layout stops (graph outputs aside). Transforms of constants are folded away and not counted."""
    func = mod["main"]
    bindings = [b for block in func.body.blocks for b in block.bindings]
    unblocked = {b.var for b in bindings if _is_unblocking(b.value)}
    found = []
    for b in bindings:
        if not (isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op)) or _is_unblocking(b.value):
            continue
        if any(isinstance(arg, relax.Var) and arg in unblocked for arg in b.value.args):
            found.append(LayoutFallback.of(b.var, b.value.op.name, _no_blocked_reason(b.value)))
    return found


def _is_unblocking(value) -> bool:
    """A layout_transform of a computed value from a higher rank (NCHW{c}) to a lower one (NCHW)."""
    return (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)
            and value.op.name == "relax.layout_transform" and isinstance(value.args[0], relax.Var)
            and len(value.args[0].ty.shape.values) > len(value.ty.shape.values))


def _no_blocked_reason(call: relax.Call) -> str:
    if call.op.name == "relax.nn.conv2d":
        return "no blocked kernel for these channel counts or groups"
    return f"no blocked-layout kernel or layout rule for {call.op.name}"
