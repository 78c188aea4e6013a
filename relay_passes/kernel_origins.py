"""Which source ops each kernel came from: spans, followed from the imported graph to the kernel calls.

The importer's caller tags each call of the imported `main` with a span whose source name says where it
came from (`tag_sources`; the compiler uses "onnx:<node index>"). TVM's mutators keep the span of a call they
rebuild with new arguments, so the tags survive most passes; a pass that makes a new call (BatchNorm folded
into a conv, an int8 rewrite, ConvertLayout's blocked ops) leaves it untagged. Those that keep the binding's
variable name get the tag back from the graph before the phase (`carried_tags`), the rest use `with_span`.
LegalizeOps drops every span, so the `kernels` phase takes
the tags of each binding of `main` just before it (`binding_sources`, a fused group's from the ops inside its
function) and finds them again on the binding that calls the kernel after it (`kernel_sources`): the binding
keeps its variable through LegalizeOps and FuseTIR.

All of it is best effort: a binding whose tags are lost just has none.
"""

from __future__ import annotations

from collections import Counter

import tvm
import tvm_ffi
from tvm import relax
from tvm.ir.expr import GenericConst


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


def _tag(expr) -> str | None:
    span = expr.span if isinstance(expr, relax.Call) else None
    return span.source_name.name if span is not None and span.source_name is not None else None


def carried_tags(before: tvm.IRModule, after: tvm.IRModule) -> tvm.IRModule:
    """`after`, a graph phase's result, with the tags of `before` put back on the calls of main that lost
    them: a binding whose variable name is bound once in each graph, to a call of the same op, takes the old
    call's tag. (A phase's new bindings may reuse a name: a name bound twice is left alone.)"""
    old_bindings, new_bindings = bindings_of(before["main"]), bindings_of(after["main"])
    old_names = Counter(b.var.name for b in old_bindings)
    new_names = Counter(b.var.name for b in new_bindings)
    old = {b.var.name: b.value for b in old_bindings if old_names[b.var.name] == 1 and _tag(b.value)}
    sources = {}
    for binding in new_bindings:
        value, was = binding.value, old.get(binding.var.name)
        if (was is not None and new_names[binding.var.name] == 1 and isinstance(value, relax.Call)
                and _tag(value) is None and value.op.same_as(was.op)):
            sources[binding.var] = _tag(was)
    if not sources:
        return after
    result = after.clone()
    result.update_func(result.get_global_var("main"), tag_sources(after["main"], sources))
    return result


def bindings_of(func) -> list:
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
    for binding in bindings_of(main):
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


def group_sources(before: tvm.IRModule, after: tvm.IRModule) -> dict:
    """Var -> source tags of the bindings of `after`'s main (fused) that call a group's function: the tags of
    the ops of `before` (unfused) the group took. FuseOpsByPattern makes new variables and shares one function
    among the groups of the same form, so each group is followed through its function by data flow: its
    arguments are values of `before` (or earlier groups' results, known by then), and each op inside is the
    op of `before` with the same op and the same inputs. An op not found there leaves the rest unknown."""
    tags = binding_sources(before)
    ops_by_inputs: dict = {}
    for binding in bindings_of(before["main"]):
        value = binding.value
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
            ops_by_inputs.setdefault(_op_key(value.op, value.args), []).append((binding.var, value.attrs))
    known: dict = {}  # a value of `after` -> the value of `before` it is
    result = {}
    for binding in bindings_of(after["main"]):
        value = binding.value
        if isinstance(value, relax.TupleGetItem) and isinstance(known.get(value.tuple_value), tuple):
            known[binding.var] = known[value.tuple_value][value.index]
        if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.GlobalVar)
                and isinstance(after[value.op], relax.Function)):
            continue
        found: list = []
        inputs = [known.get(a, a) for a in value.args]
        known[binding.var] = _follow(after, after[value.op], inputs, ops_by_inputs, tags, found)
        result[binding.var] = found
    return result


def _op_key(op, args) -> tuple:
    """An op and its inputs: values by identity, a tuple (a concat's) by its fields, literals (a reshape's
    shape) by structure. `args` may hold what `_follow` found for them (a tuple as a Python tuple)."""
    def key(a):
        if isinstance(a, (relax.Tuple, tuple)):
            return tuple(key(f) for f in (a.fields if isinstance(a, relax.Tuple) else a))
        return a if a is None or isinstance(a, (relax.Var, GenericConst)) else tvm_ffi.structural_hash(a)

    return (op, *(key(a) for a in args))


def _follow(mod, func: relax.Function, inputs: list, ops_by_inputs: dict, tags: dict, found: list):
    """What `func` returns, called on `inputs` (values of the graph before fusion), as a value of that graph
    (a tuple for a tuple), None where unknown; the tags of the ops it is made of are added to `found`."""
    env = dict(zip(func.params, inputs))

    def of(expr):
        if isinstance(expr, relax.Tuple):
            return tuple(of(f) for f in expr.fields)
        return env.get(expr, expr) if isinstance(expr, relax.Var) else expr

    for binding in bindings_of(func):
        value = binding.value
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.GlobalVar):
            env[binding.var] = _follow(mod, mod[value.op], [of(a) for a in value.args], ops_by_inputs, tags, found)
        elif isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
            args = [of(a) for a in value.args]  # (an unknown one, None, matches nothing)
            same = [var for var, attrs in ops_by_inputs.get(_op_key(value.op, args), ())
                    if tvm_ffi.structural_equal(attrs, value.attrs)]  # (two reshapes of one value)
            if same:
                env[binding.var] = same[0]
                found.extend(t for t in tags.get(same[0], ()) if t not in found)
        elif isinstance(value, relax.TupleGetItem) and isinstance(of(value.tuple_value), tuple):
            env[binding.var] = of(value.tuple_value)[value.index]
        else:
            env[binding.var] = of(value) if isinstance(value, (relax.Var, relax.Tuple)) else None
    body = func.body.body if isinstance(func.body, relax.SeqExpr) else func.body
    return of(body)


def kernel_sources(mod: tvm.IRModule, before: dict) -> list[tuple[str, list]]:
    """The kernel calls of `main` after LegalizeOps and FuseTIR, in order: (kernel name, source names), the
    names `before` (binding_sources of the graph before) gives the binding's variable, [] where it has none."""
    calls = []
    for binding in bindings_of(mod["main"]):
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
