"""Constant folding in numpy, before TVM's FoldConstant.

TVM's FoldConstant evaluates each constant subexpression by legalizing it, building it with LLVM and running
it: 15-50 ms an op. A network's BatchNorms decompose into 3-4 ops on constants each, and each conv weight put
in a blocked layout is one layout_transform of a constant: DenseNet-121 had 430 of each, 17 s of its fp32
compile in the canonicalise phase and 20 s in the layout one. Swin-T's exporter left 600 ops of shape and
index arithmetic on constants (its attention mask), 29 s. Here the common ones are computed in numpy, the
same IEEE arithmetic; FoldConstant, run after, still folds whatever is left.

- elementwise arithmetic, comparisons, selects and casts of constants (ELEMENTWISE), numpy broadcasting as
  Relax's;
- reshapes, broadcasts, transposes and strided slices of a constant;
- take (indices in bounds) and scatter_nd (update, add) on constants; shape_of a tensor of static shape;
- layout_transform of a constant: every source index mapped by the index map (evaluated over numpy index
  grids) and scattered to its place; the places no source index reaches (padding) hold the pad value.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.ir.expr import GenericConst

from relay_passes.analysis import op_name, static_shape

# op -> numpy; their arguments share one dtype. Integer add/subtract/multiply wrap in numpy as in TVM's code.
ELEMENTWISE = {
    "relax.add": np.add, "relax.subtract": np.subtract, "relax.multiply": np.multiply,
    "relax.divide": np.divide, "relax.sqrt": np.sqrt, "relax.negative": np.negative,
    "relax.rsqrt": lambda x: np.reciprocal(np.sqrt(x)),
    "relax.less": np.less, "relax.greater": np.greater, "relax.less_equal": np.less_equal,
    "relax.greater_equal": np.greater_equal, "relax.equal": np.equal, "relax.not_equal": np.not_equal,
    "relax.where": np.where, "relax.logical_not": np.logical_not,
}
ARITHMETIC = frozenset({"relax.add", "relax.subtract", "relax.multiply", "relax.negative"})
FLOAT_ONLY = frozenset({"relax.divide", "relax.sqrt", "relax.rsqrt"})  # integer division rounds as Relax says
# Ops that only give the same values another shape: their result's static shape says all.
RESHAPES = frozenset({"relax.reshape", "relax.expand_dims", "relax.squeeze", "relax.flatten"})
FLOAT_DTYPES = ("float32", "float64")
INDEX_ARITHMETIC = {tirx.Add: np.add, tirx.Sub: np.subtract, tirx.Mul: np.multiply,
                    tirx.FloorDiv: np.floor_divide, tirx.FloorMod: np.mod}


def _index_expr(expr, env: dict):
    """A PrimExpr of an index map over numpy index grids; None for a form not covered."""
    if isinstance(expr, tirx.Var):
        return env.get(expr)
    if isinstance(expr, tirx.IntImm):
        return np.int64(expr.value)
    for node, function in INDEX_ARITHMETIC.items():
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


def _integers(fields) -> list[int] | None:
    values = [getattr(f, "value", None) for f in fields]
    return None if any(not isinstance(v, int) for v in values) else values


def _strided_slice(call: relax.Call, data: np.ndarray) -> np.ndarray | None:
    """Python's slice semantics per axis (negative bounds from the end, clamped), as TOPI's."""
    bounds = [_integers(a.fields) if isinstance(a, relax.Tuple) else None for a in call.args[1:]]
    if any(b is None for b in bounds):
        return None
    axes, begin, end = bounds[:3]
    strides = bounds[3] if len(bounds) > 3 else [1] * len(axes)
    index = [slice(None)] * data.ndim
    for axis, b, e, step in zip(axes, begin, end, strides):
        index[axis] = slice(b, e, step)
    return data[tuple(index)]


def _take(call: relax.Call, data: np.ndarray, indices: np.ndarray) -> np.ndarray | None:
    """Indices within bounds only: one past the end is an error at run time, not a value."""
    axis = None if call.attrs.axis is None else int(call.attrs.axis)
    extent = data.size if axis is None else data.shape[axis]
    if indices.size and (indices.min() < 0 or indices.max() >= extent):
        return None
    return np.take(data, indices, axis=axis)


def _scatter_nd(call: relax.Call, data: np.ndarray, indices: np.ndarray, updates: np.ndarray) -> np.ndarray | None:
    reduction = str(call.attrs.reduction)
    if reduction not in ("update", "add"):
        return None
    out = data.copy()
    where = tuple(np.moveaxis(indices, -1, 0))
    if reduction == "update":
        out[where] = updates
    else:
        np.add.at(out, where, updates)
    return out


def _elementwise(call: relax.Call, *values: np.ndarray) -> np.ndarray | None:
    name, out_dtype = op_name(call), str(call.ty.dtype)
    dtypes = {str(v.dtype) for v in (values[1:] if name == "relax.where" else values)}
    if (len(dtypes) != 1 or (name in FLOAT_ONLY and out_dtype not in FLOAT_DTYPES)
            or (name in ARITHMETIC and dtypes == {"bool"})):
        return None  # mixed dtypes, integer division, boolean sums: Relax's own rules, left to FoldConstant
    with np.errstate(all="ignore"):
        return np.asarray(ELEMENTWISE[name](*values), dtype=out_dtype)


def _reshaped(call: relax.Call, data: np.ndarray) -> np.ndarray | None:
    shape = static_shape(call)
    return None if shape is None else data.reshape(shape)


def _broadcast(call: relax.Call, data: np.ndarray) -> np.ndarray | None:
    shape = static_shape(call)
    return None if shape is None else np.broadcast_to(data, shape)


def _transposed(call: relax.Call, data: np.ndarray) -> np.ndarray:
    axes = call.attrs.axes
    return np.transpose(data, None if axes is None else [int(a) for a in axes])


# op -> (how many leading arguments are the constant data, its value from (call, *arrays)); the arguments
# after those (a reshape's target shape, a slice's bounds) are read from the call itself.
TENSOR_FOLDS = {
    **{name: (None, _elementwise) for name in ELEMENTWISE},
    **{name: (1, _reshaped) for name in RESHAPES},
    "relax.broadcast_to": (1, _broadcast),
    "relax.permute_dims": (1, _transposed),
    "relax.astype": (1, lambda call, data: data.astype(str(call.ty.dtype))),
    "relax.layout_transform": (1, _layout_transformed),
    "relax.strided_slice": (1, _strided_slice),
    "relax.take": (2, _take),
    "relax.scatter_nd": (3, _scatter_nd),
}


def _shape_of(call: relax.Call, _args) -> relax.ShapeExpr | None:
    """shape_of any tensor whose shape is static."""
    shape = static_shape(call.args[0])
    return None if shape is None else relax.ShapeExpr(shape)


def _shape_to_tensor(_call: relax.Call, args) -> np.ndarray | None:
    dims = _integers(args[0].values) if isinstance(args[0], relax.ShapeExpr) else None
    return None if dims is None else np.array(dims, dtype="int64")


SHAPE_FOLDS = {"relax.shape_of": _shape_of, "relax.shape_to_tensor": _shape_to_tensor}


def _folded(call: relax.Call, args: list):
    """The value of `call` on the constants `args` (an array, or a shape for shape_of), or None where this
    module does not compute it."""
    name = op_name(call)
    if name in SHAPE_FOLDS:
        return SHAPE_FOLDS[name](call, args)
    count, fold = TENSOR_FOLDS[name]
    data = args if count is None else args[:count]
    if not data or not all(isinstance(a, GenericConst) for a in data):
        return None
    return fold(call, *(a.value.numpy() for a in data))


@relax.expr_functor.mutator
class _Folder(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if op_name(call) not in TENSOR_FOLDS and op_name(call) not in SHAPE_FOLDS:
            return call
        value = _folded(call, [self._constant(a) for a in call.args])
        if value is None or isinstance(value, relax.ShapeExpr):
            return call if value is None else value
        return relax.const(np.array(value, order="C"), str(value.dtype))  # (np.array keeps a 0-d value 0-d)

    def _constant(self, arg):
        """`arg`, or the constant (or shape) a variable is bound to (each op of a dataflow block is a binding)."""
        bound = self.builder_.lookup_binding(arg) if isinstance(arg, relax.Var) else None
        return bound if isinstance(bound, (GenericConst, relax.ShapeExpr)) else arg


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
