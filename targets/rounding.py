"""Rounding to the nearest integer, ties to even (numpy's round, ONNX's Round, every quantize), as `llvm.rint`.

TVM lowers `round` to `llvm.nearbyint`. On znver4 and znver5, LLVM turns a vector of those into one scalar
`vroundss` per lane, and the convert and clamp after it with them: the requantize epilogue of MobileNetV2's
int8 depthwise convs ran as 224 scalar rounds, converts and compares a tile (on Intel CPUs the same code stays
vector). `rint` is the same function in the default rounding mode, which nothing here changes, and LLVM keeps
it vector on every x86 CPU; followed by a convert to int32 it folds into one `vcvtps2dq`, the round gone.
"""

from __future__ import annotations

from tvm import relax, te, tirx


def round_half_even(value):
    """`value` (a float expression) rounded to the nearest integer, ties to even."""
    return tirx.call_llvm_pure_intrin(str(value.ty), "llvm.rint", value)


def legalize_round(default):
    """A LegalizeOps override for relax.round: floats as round_half_even, anything else to `default`."""

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        if not str(call.ty.dtype).startswith("float"):
            return default(bb, call)
        return bb.call_te(lambda x: te.compute(x.shape, lambda *i: round_half_even(x(*i)), name="round"),
                          call.args[0], primfunc_name_hint="round")

    return legalize
