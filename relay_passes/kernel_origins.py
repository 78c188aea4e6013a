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
    """Var -> the source names (in order, no repeats) of the tagged calls in each binding of `main`, looking
    into the functions it calls (a fused group's)."""
    result = {}
    for binding in _bindings(mod["main"]):
        found: list = []

        def visit(expr, found=found):
            if not isinstance(expr, relax.Call):
                return
            span = expr.span
            if span is not None and span.source_name is not None:
                name = span.source_name.name
                if name not in found:
                    found.append(name)
            if isinstance(expr.op, tvm.ir.GlobalVar) and expr.op in mod.get_global_vars():
                callee = mod[expr.op]
                if isinstance(callee, relax.Function):
                    relax.analysis.post_order_visit(callee.body, visit)

        relax.analysis.post_order_visit(binding.value, visit)
        result[binding.var] = found
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
