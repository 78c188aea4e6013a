"""Constant folding in numpy, before TVM's FoldConstant.

TVM's FoldConstant evaluates each constant subexpression by legalizing it, building it with LLVM and running
it: 15-50 ms an op. A network's BatchNorms decompose into 3-4 ops on constants each, and each conv weight
put in a blocked layout is one layout_transform of a constant: DenseNet-121 had 430 of each, 17 s of its
fp32 compile in the canonicalise phase and 20 s in the layout one. Here the common ones are computed in
numpy, the same IEEE float32 arithmetic; FoldConstant, run after, still folds whatever is left.

- elementwise arithmetic of constants (ELEMENTWISE), numpy broadcasting as Relax's;
- reshapes and transposes of a constant (a BatchNorm's [C] parameters expanded to [C, 1, 1]);
- layout_transform of a constant: every source index mapped by the index map (evaluated over numpy index
  grids) and scattered to its place; the places no source index reaches (padding) hold the pad value.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.ir.expr import GenericConst

from relay_passes.analysis import op_name, static_shape

ELEMENTWISE = {
    "relax.add": np.add, "relax.subtract": np.subtract, "relax.multiply": np.multiply,
    "relax.divide": np.divide, "relax.sqrt": np.sqrt, "relax.negative": np.negative,
    "relax.rsqrt": lambda x: np.reciprocal(np.sqrt(x)),
}
# Ops that only give the same values another shape: their result's static shape says all.
RESHAPES = frozenset({"relax.reshape", "relax.expand_dims", "relax.squeeze", "relax.flatten"})
FOLDED = frozenset(ELEMENTWISE) | RESHAPES | {"relax.permute_dims", "relax.layout_transform"}
FLOAT_DTYPES = ("float32", "float64")


def _index_expr(expr, env: dict):
    """A PrimExpr of an index map over numpy index grids; None for a form not covered."""
    if isinstance(expr, tirx.Var):
        return env.get(expr)
    if isinstance(expr, tirx.IntImm):
        return np.int64(expr.value)
    binary = {tirx.Add: np.add, tirx.Sub: np.subtract, tirx.Mul: np.multiply,
              tirx.FloorDiv: np.floor_divide, tirx.FloorMod: np.mod}
    for node, function in binary.items():
        if isinstance(expr, node):
            a, b = _index_expr(expr.a, env), _index_expr(expr.b, env)
            return None if a is None or b is None else function(a, b)
    return None


def _layout_transformed(call: relax.Call, data: np.ndarray) -> np.ndarray | None:
    index_map = call.attrs.index_map
    out_shape = [int(d) for d in index_map.map_shape([tirx.IntImm("int64", d) for d in data.shape])]
    grids = np.indices(data.shape, dtype=np.int64, sparse=True)
    env = dict(zip(index_map.initial_indices, grids))
    targets = [_index_expr(e, env) for e in index_map.final_indices]
    if any(t is None for t in targets):
        return None
    pad = call.attrs.pad_value
    out = np.full(out_shape, 0 if pad is None else pad.value, dtype=data.dtype)
    out[tuple(np.broadcast_to(t, data.shape) for t in targets)] = data
    return out


def _folded(call: relax.Call, args: list) -> np.ndarray | None:
    """The value of `call` on the constants `args`, or None where this module does not compute it."""
    name = op_name(call)
    if name in RESHAPES or name in ("relax.permute_dims", "relax.layout_transform"):
        args = args[:1]  # the data; the rest (a reshape's target shape) is in the attributes or the result type
    if not args or not all(isinstance(a, GenericConst) for a in args):
        return None
    values = [a.value.numpy() for a in args]
    out_dtype = str(getattr(call.ty, "dtype", ""))
    if name in ELEMENTWISE:
        if out_dtype not in FLOAT_DTYPES or any(str(v.dtype) != out_dtype for v in values):
            return None  # integer division and mixed dtypes: Relax's rules, left to FoldConstant
        with np.errstate(all="ignore"):
            return np.asarray(ELEMENTWISE[name](*values), dtype=out_dtype)
    if name in RESHAPES:
        shape = static_shape(call)
        return None if shape is None else values[0].reshape(shape)
    if name == "relax.permute_dims":
        axes = call.attrs.axes
        return np.transpose(values[0], None if axes is None else [int(a) for a in axes])
    if name == "relax.layout_transform":
        return _layout_transformed(call, values[0])
    return None


@relax.expr_functor.mutator
class _Folder(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if op_name(call) not in FOLDED:
            return call
        value = _folded(call, [self._constant(a) for a in call.args])
        return call if value is None else relax.const(np.ascontiguousarray(value), str(value.dtype))

    def _constant(self, arg):
        """`arg`, or the constant a variable is bound to (each op of a dataflow block is a binding)."""
        bound = self.builder_.lookup_binding(arg) if isinstance(arg, relax.Var) else None
        return bound if isinstance(bound, GenericConst) else arg


@tvm.transform.module_pass(opt_level=0, name="quantvm.FoldConstantsInNumpy")
def FoldConstantsInNumpy(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    out = tvm.IRModule(dict(mod.functions))
    for gvar, func in mod.functions.items():
        if isinstance(func, relax.Function):
            out[gvar] = _Folder(mod).visit_expr(func)
    return out


def fold_constants() -> tvm.transform.Pass:
    """Folding in numpy, then TVM's FoldConstant for what is left."""
    return tvm.transform.Sequential([FoldConstantsInNumpy, relax.transform.FoldConstant()])
