"""Rewrite layer normalisation written out as primitives into `R.nn.layer_norm`.

    mean = ReduceMean(x, trailing axes);  d = x - mean
    var  = ReduceMean(d ^ 2)  (Pow(d, 2) or Mul(d, d)), same axes
    y    = d / Sqrt(var + eps)  [* gamma] [+ beta]

as exporters before opset 17 (and Paddle's) write it; `y` becomes layer_norm(x, gamma, beta, axes, eps),
with gamma = 1 and beta = 0 where they are absent. Both means must reduce the same trailing axes with
keepdims, the exponent must be 2, eps a scalar >= 0, and gamma/beta constants that vary only along the
normalised axes (they are broadcast to exactly that shape, as layer_norm wants). The two uses of `d` may be
one Sub or two Subs of the same x and mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import DFPattern, is_const, is_op, wildcard

from relay_passes.rewrite_forms import Form, close, either, forms_pass, scalar

_MUL, _ADD = "relax.multiply", "relax.add"


@dataclass(frozen=True)
class _Normalisation:
    """The parts of d / sqrt(mean(d^2) + eps), d = x - mean(x), as pattern nodes."""

    x: DFPattern
    mean: DFPattern
    variance: DFPattern
    exponent: DFPattern
    eps: DFPattern
    root: DFPattern

    @classmethod
    def build(cls) -> _Normalisation:
        x, exponent, eps = wildcard(), is_const(), is_const()
        mean = is_op("relax.mean")(x)
        centered, centered_again = is_op("relax.subtract")(x, mean), is_op("relax.subtract")(x, mean)
        square = is_op("relax.power")(centered, exponent) | is_op(_MUL)(centered, centered)
        variance = is_op("relax.mean")(square)
        std = is_op("relax.sqrt")(either(_ADD, variance, eps))
        return cls(x, mean, variance, exponent, eps, is_op("relax.divide")(centered_again, std))

    def axes_and_eps(self, matches) -> tuple[list[int], float] | None:
        """The normalised (trailing) axes and epsilon, or None where the match is not a layer norm."""
        x, mean, variance = matches[self.x], matches[self.mean], matches[self.variance]
        ndim = getattr(x.ty, "ndim", -1)
        if ndim < 1 or "float" not in str(x.ty.dtype):
            return None
        axes = _normalised_axes(mean, ndim)
        if axes is None or axes != _normalised_axes(variance, ndim) or axes != list(range(ndim - len(axes), ndim)):
            return None
        if self.exponent in matches and not close(scalar(matches[self.exponent]), 2.0):
            return None
        eps = scalar(matches[self.eps])
        if eps is None or eps < 0 or _static_dims(x, axes) is None:
            return None
        return axes, eps


def _normalised_axes(mean: relax.Call, ndim: int) -> list[int] | None:
    if not mean.attrs.keepdims or mean.attrs.axis is None:
        return None
    return sorted(int(a) % ndim for a in mean.attrs.axis)


def _static_dims(x: relax.Expr, axes: list[int]) -> tuple[int, ...] | None:
    shape = getattr(x.ty, "shape", None)
    values = getattr(shape, "values", None)
    if values is None or not all(isinstance(values[a], tvm.tirx.IntImm) for a in axes):
        return None
    return tuple(int(values[a]) for a in axes)


def _parameter(const, x: relax.Expr, axes: list[int], fill: float) -> relax.Expr | None:
    """gamma/beta broadcast to exactly x's normalised dims, or None when it varies along another axis (or is
    not a constant of x's dtype). Absent (`const` None): filled with `fill`."""
    dims = _static_dims(x, axes)
    dtype = str(x.ty.dtype)
    if const is None:
        return relax.const(np.full(dims, fill, dtype))
    array = const.value.numpy()
    if str(array.dtype) != dtype or array.ndim > x.ty.ndim:
        return None
    leading = array.shape[:max(array.ndim - len(axes), 0)]
    if any(d != 1 for d in leading):
        return None
    trailing = array.reshape(array.shape[len(leading):])
    try:
        return relax.const(np.ascontiguousarray(np.broadcast_to(trailing, dims)))
    except ValueError:  # not broadcastable to the normalised dims
        return None


def _form(name: str, scale: bool, shift: bool) -> Form:
    norm = _Normalisation.build()
    gamma, beta = is_const(), is_const()
    pattern = either(_MUL, norm.root, gamma) if scale else norm.root
    pattern = either(_ADD, pattern, beta) if shift else pattern

    def build(matches):
        found = norm.axes_and_eps(matches)
        if found is None:
            return None
        axes, eps = found
        x = matches[norm.x]
        weight = _parameter(matches[gamma] if scale else None, x, axes, 1.0)
        bias = _parameter(matches[beta] if shift else None, x, axes, 0.0)
        if weight is None or bias is None:
            return None
        return relax.op.nn.layer_norm(x, weight, bias, axes, eps)

    return Form(name, pattern, build)


def layer_norm_forms() -> list[Form]:
    # longest first: a bare normalisation rewritten first would leave gamma and beta outside
    return [_form("layer_norm", True, True), _form("layer_norm_scaled", True, False),
            _form("layer_norm_shifted", False, True), _form("layer_norm_bare", False, False)]


CanonicalizeLayerNorm = forms_pass("quantvm.CanonicalizeLayerNorm", layer_norm_forms)
