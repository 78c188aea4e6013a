"""Which source ops each kernel came from: spans, followed from the imported graph to the kernel calls.

The importer's caller tags each call of the imported `main` with a span whose source name says where it
came from (`tag_sources`; the compiler uses "onnx:<node index>"). TVM's mutators keep the span of a call they
rebuild with new arguments, so the tags survive most passes; a pass that makes a new call (BatchNorm folded
into a conv, an int8 rewrite) leaves it untagged. LegalizeOps drops every span, so the `kernels` phase takes
the tags of each binding of `main` just before it (`binding_sources`, a fused group's from the ops inside its
function) and finds them again on the binding that calls the kernel after it (`kernel_sources`): the binding
keeps its variable through LegalizeOps and FuseTIR.

All of it is best effort: a binding whose tags are lost just has none.
"""

from __future__ import annotations

import tvm
from tvm import relax


def tag_sources(func: relax.Function, sources: dict) -> relax.Function:
    """`func` with the call bound to each variable in `sources` (Var -> source name) carrying that name as its
    span. The variables are kept, so maps keyed by them stay valid."""
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class Tagger(PyExprMutator):
        def visit_var_binding_(self, binding):
            value = self.visit_expr(binding.value)
            source = sources.get(binding.var)
            if source is not None and isinstance(value, relax.Call):
                span = tvm.ir.Span(tvm.ir.SourceName(source), 0, 0, 0, 0)
                value = self.builder_.normalize(relax.Call(value.op, value.args, value.attrs, value.ty_args, span))
            self.builder_.emit_normalized(relax.VarBinding(binding.var, value))

    return Tagger().visit_expr(func)


def _bindings(func) -> list:
    return [b for block in func.body.blocks for b in block.bindings] if isinstance(func.body, relax.SeqExpr) else []


def binding_sources(mod: tvm.IRModule) -> dict:
    """Var -> the source names (in order, no repeats) of the tagged calls in each binding of `main`, and of
    the ops inside the function it calls where that function is called once (a fused group's function
    serves every match of the same shape: functions are deduplicated, its tags are those of one of them)."""
    main = mod["main"]
    call_sites: dict = {}

    def count(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.GlobalVar):
            call_sites[expr.op] = call_sites.get(expr.op, 0) + 1

    relax.analysis.post_order_visit(main.body, count)
    result = {}
    for binding in _bindings(main):
        found: list = []

        def visit(expr, found=found):
            if not isinstance(expr, relax.Call):
                return
            span = expr.span
            if span is not None and span.source_name is not None and span.source_name.name not in found:
                found.append(span.source_name.name)
            if isinstance(expr.op, tvm.ir.GlobalVar) and call_sites.get(expr.op, 0) == 1:
                callee = mod[expr.op]
                if isinstance(callee, relax.Function):
                    relax.analysis.post_order_visit(callee.body, visit)

        relax.analysis.post_order_visit(binding.value, visit)
        result[binding.var] = found
    return result


def _op_calls(mod: tvm.IRModule, func) -> int:
    """The op calls in a group's function (and the functions it calls)."""
    count = 0

    def visit(expr):
        nonlocal count
        if isinstance(expr, relax.Call):
            if isinstance(expr.op, tvm.ir.Op):
                count += 1
            elif isinstance(expr.op, tvm.ir.GlobalVar) and isinstance(mod[expr.op], relax.Function):
                relax.analysis.post_order_visit(mod[expr.op].body, visit)

    relax.analysis.post_order_visit(func.body, visit)
    return count


def group_sources(before: tvm.IRModule, after: tvm.IRModule) -> dict:
    """Var -> source tags of the bindings of `after`'s main (fused) that call a group's function: the tags of
    the ops of `before` (unfused) the group took. FuseOpsByPattern makes new variables, so the groups are
    matched by order: the ops of `before` whose variable is gone, in order, are cut into the groups' ops
    (as many as each group's function holds), in the order the groups are called. Where the counts do not
    add up, no group gets tags."""
    tags = binding_sources(before)
    # a group's outputs bound to the fields of its call (relay_passes.fuse_elementwise) are its ops' results
    kept = {b.var for b in _bindings(after["main"]) if not isinstance(b.value, relax.TupleGetItem)}
    gone = [b.var for b in _bindings(before["main"]) if b.var not in kept and isinstance(b.value, relax.Call)
            and isinstance(b.value.op, tvm.ir.Op)]
    groups = [(b.var, _op_calls(after, after[b.value.op])) for b in _bindings(after["main"])
              if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.GlobalVar)
              and isinstance(after[b.value.op], relax.Function)]
    if sum(n for _, n in groups) != len(gone):
        return {}
    result, at = {}, 0
    for var, n in groups:
        found: list = []
        for old in gone[at:at + n]:
            found.extend(t for t in tags.get(old, ()) if t not in found)
        result[var] = found
        at += n
    return result


def kernel_sources(mod: tvm.IRModule, before: dict) -> list[tuple[str, list]]:
    """The kernel calls of `main` after LegalizeOps and FuseTIR, in order: (kernel name, source names), the
    names `before` (binding_sources of the graph before) gives the binding's variable, [] where it has none."""
    calls = []
    for binding in _bindings(mod["main"]):
        value = binding.value
        if (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)
                and value.op.name == "relax.call_tir"):
            calls.append((value.args[0].name_hint, list(before.get(binding.var, ()))))
    return calls


def with_span(expr, span):
    """`expr` (a call a pass makes in place of another) carrying `span`, the replaced call's source tag."""
    if span is None or not isinstance(expr, relax.Call) or expr.span is not None:
        return expr
    return relax.Call(expr.op, expr.args, expr.attrs, expr.ty_args, span)
