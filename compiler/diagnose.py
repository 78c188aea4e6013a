"""Turn a failure inside compile() into a one-line ModelError naming the ONNX node at fault.

The Relax ONNX importer keeps no node names (no spans; its variables are `lv`, `lv1`...). While importing,
quantvm records which expression each ONNX node converted to (`importer_fixes.patched_onnx_converters`);
`trace_origins` maps the bindings of the imported `main` back to those nodes. When a later phase
(layout, fusion, LegalizeOps, the build) fails, TVM's error names no node either: `compile_phase` then
lowers each op of the imported graph on its own and names the first one whose own lowering fails.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import onnx

from compiler.errors import ModelError, QuantvmError


@dataclass(frozen=True)
class OnnxNode:
    """An ONNX node as a message names it."""

    name: str
    op_type: str
    opset: int | None

    def describe(self) -> str:
        return f"node {self.name or '<unnamed>'!r} ({self.op_type}, opset {self.opset})"


def default_opset(proto: onnx.ModelProto) -> int | None:
    """The model's opset for the default ONNX domain, the one its standard ops follow."""
    return max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def node_error(source: str, node: OnnxNode, verb: str, reason: str) -> ModelError:
    """The one-line message: `model.onnx: node 'Conv_12' (ConvTranspose, opset 13) cannot be compiled: ...`."""
    return ModelError(f"{source}: {node.describe()} cannot be {verb}: {reason}")


def _bindings(func) -> list:
    return [binding for block in func.body.blocks for binding in block.bindings]


def trace_origins(func, converted: list[tuple[object, OnnxNode]]) -> dict:
    """Relax Var -> OnnxNode for the bindings of the imported `func`.

    `converted` pairs each node with the expression its converter returned; the importer binds that very
    object (matched by identity). A converter that emits several ops (Gemm: transpose, matmul, add) binds
    its inner ones as arguments of its result: they belong to the node that consumes them.
    """
    from tvm import relax

    by_expr = {expr: node for expr, node in converted}
    bindings = _bindings(func)
    origin = {b.var: by_expr[b.value] for b in bindings if b.value in by_expr}
    matched = set(origin)
    bound = {b.var for b in bindings}
    for binding in reversed(bindings):  # consumers first, so an inner op takes its first consumer's node
        node = origin.get(binding.var)
        if node is None:
            continue
        for var in relax.analysis.free_vars(binding.value):
            if var in bound and var not in matched:
                origin[var] = node
    return origin


def first_failing_node(func, origins: dict) -> tuple[OnnxNode, str] | None:
    """The first op of `func` (an imported graph) whose own lowering fails, with the reason."""
    import tvm

    for binding in _bindings(func):
        value, node = binding.value, origins.get(binding.var)
        if node is None or not (isinstance(value, tvm.relax.Call) and isinstance(value.op, tvm.ir.Op)):
            continue
        reason = lowering_failure(value)
        if reason is not None:
            return node, reason
    return None


def lowering_failure(call) -> str | None:
    """Why `call` cannot be lowered to a kernel on its own, or None if it can: build a function of just
    this op (its variable arguments become parameters) and legalize it."""
    from tvm import relax

    params: list = []

    def as_param(arg):
        if isinstance(arg, relax.Var):
            params.append(relax.Var(arg.name, arg.ty))
            return params[-1]
        if isinstance(arg, relax.Tuple):
            return relax.Tuple([as_param(field) for field in arg.fields])
        return arg

    try:
        alone = relax.Call(call.op, [as_param(a) for a in call.args], call.attrs, call.ty_args)
    except Exception:  # noqa: BLE001 (an argument this probe cannot copy: no verdict on the op)
        return None
    try:
        builder = relax.BlockBuilder()
        with builder.function("main", params):
            with builder.dataflow():
                out = builder.emit_output(alone)
            builder.emit_func_output(out)
        lowered = relax.transform.LegalizeOps()(builder.get())
    except Exception as err:  # noqa: BLE001 (any failure here is this op's)
        return first_line(err)
    if call.op.get_attr("FLegalize") is not None:
        left = [b.value for b in _bindings(lowered["main"])
                if isinstance(b.value, relax.Call) and b.value.op.same_as(call.op)]
        if left:  # a legalization that declined these attributes: the build would fail on it later
            return f"TVM has no kernel for {call.op.name} with these attributes"
    return None


def _culprit(imported) -> tuple[OnnxNode, str] | None:
    if imported is None or not imported.origins:
        return None
    try:
        return first_failing_node(imported.mod["main"], imported.origins)
    except Exception:  # noqa: BLE001 (a diagnosis that fails leaves the phase's own message)
        return None


@contextlib.contextmanager
def compile_phase(source: str, phase: str, imported=None):
    """One place per compile phase that turns TVM's bare errors (InternalError, ValueError, TypeError...)
    into a ModelError naming the ONNX node at fault where one is found in `imported` (the ImportedModel, when
    there is one), else the model and the phase; quantvm's own errors pass through as they are."""
    try:
        yield
    except QuantvmError:
        raise
    except Exception as err:  # noqa: BLE001 (anything else is TVM failing on this model)
        culprit = _culprit(imported)
        if culprit is not None:
            node, reason = culprit
            raise node_error(source, node, "compiled", f"{reason} (while {phase})") from err
        raise ModelError(f"{source}: {phase} failed: {first_line(err)}") from err
