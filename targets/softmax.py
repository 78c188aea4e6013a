"""Softmax over the last axis with one division per row.

TOPI's softmax divides every element by its row's sum: a vector division per 16 elements, which LLVM may not
turn into a multiply without fast-math (vdivps is several times slower than vmulps: it was a third of an
attention softmax's time). Here the norm is exp * (1 / sum): the reciprocal is loop-invariant in the row, so
LLVM computes it once. The blocks keep TOPI's names, so the row rule (targets.transformer) schedules it.
"""

from __future__ import annotations

from tvm import relax, te, tirx

from targets.dense import legalize_default


def softmax_last_axis(x):
    *rows, width = x.shape
    k = te.reduce_axis((0, width), name="k")
    maxelem = te.compute(rows, lambda *i: te.max(x[(*i, k)], axis=k), name="T_softmax_maxelem")
    exp = te.compute(x.shape, lambda *i: te.exp(x[i] - maxelem[i[:-1]]), name="T_softmax_exp")
    k2 = te.reduce_axis((0, width), name="k")
    expsum = te.compute(rows, lambda *i: te.sum(exp[(*i, k2)], axis=k2), name="T_softmax_expsum")
    one = tirx.const(1.0, x.dtype)
    return te.compute(x.shape, lambda *i: exp[i] * (one / expsum[i[:-1]]), name="T_softmax_norm")


def legalize_softmax():
    """A LegalizeOps override for relax.nn.softmax: float32 over the last axis here, the rest TOPI's."""
    default = legalize_default("relax.nn.softmax")

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        data = call.args[0]
        ndim = data.ty.ndim
        if str(data.ty.dtype) != "float32" or ndim < 1 or int(call.attrs.axis) % ndim != ndim - 1:
            return default(bb, call)
        return bb.call_te(softmax_last_axis, data, primfunc_name_hint="softmax")

    return legalize
