"""Rewrite activations that exporters write as primitive chains into one canonical form each.

    SiLU / Swish   x * sigmoid(x), x * sigmoid(x * 1)                 -> R.nn.silu(x)
    HardSigmoid    clip(x + b, 0, h) / h (ReLU6(x + 3) / 6), * (1/h),
                   clip(x / d + b, 0, 1)                             -> clip(x * a + b, 0, 1)
    HardSwish      x * clip(x + 3, 0, 6) / 6, x * clip(..) * (1/6),
                   x * (clip(x + 3, 0, 6) / 6) (ONNX HardSwish)     -> x * clip(x * (1/6) + 0.5, 0, 1)
    Mish           x * tanh(log(1 + exp(x))), x * tanh(<ONNX Softplus>) -> x * tanh(R.nn.softplus(x))

ReLU6 may be written clip(y, 0, 6), min(max(y, 0), 6) or min(relu(y), 6).

Why these canonical forms: TVM 0.27 Relax has `nn.silu` (one op, one kernel) but no HardSigmoid,
HardSwish or Mish op. A Python-registered op would need its own struct-info, legalization and layout
rules and would be unknown to the int8 rewrite, the layout pass and TVM's own passes; instead each becomes
the one spelling the fusion table (relay_passes/patterns.py) matches, with no divisions: HardSigmoid is
ONNX's own definition, clip(alpha * x + beta, 0, 1) (what the importer writes for the HardSigmoid op),
HardSwish is x * HardSigmoid(x) with alpha = 1/6 and beta = 1/2 (torch's export), and Mish uses
`nn.softplus`, which also guards exp against overflow. A conv/FC epilogue or the elementwise fusion then
makes each one kernel: the ops are all elementwise, and LegalizeOps + FuseTIR inline them.

Every constant is checked (a ReLU6 bound of 6, a divisor equal to it, a sigmoid scale of 1, a softplus's
0 and 1), and x must be the same value everywhere the form reads it; otherwise the graph is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import relax
from tvm.relax.dpl import DFPattern, is_const, is_op, wildcard

from relay_passes.rewrite_forms import (Form, all_values, close, either, float_const, forms_pass, is_value,
                                      scalar)

_MUL, _ADD = "relax.multiply", "relax.add"


def hard_sigmoid(x: relax.Expr, alpha: float, beta: float) -> relax.Expr:
    """The canonical HardSigmoid: clip(x * alpha + beta, 0, 1)."""
    scaled = relax.op.multiply(x, float_const(alpha, x))
    return relax.op.clip(relax.op.add(scaled, float_const(beta, x)), 0.0, 1.0)


@dataclass(frozen=True)
class _ClipFromZero:
    """clip(y, 0, hi) in the spellings exporters give ReLU6."""

    pattern: DFPattern
    zeros: tuple[DFPattern, ...]
    highs: tuple[DFPattern, ...]

    @classmethod
    def of(cls, y: DFPattern) -> _ClipFromZero:
        clip_lo, clip_hi, max_zero, min_hi, relu_hi = wildcard(), wildcard(), is_const(), is_const(), is_const()
        pattern = (is_op("relax.clip")(y, clip_lo, clip_hi)
                   | either("relax.minimum", either("relax.maximum", y, max_zero), min_hi)
                   | either("relax.minimum", is_op("relax.nn.relu")(y), relu_hi))
        return cls(pattern, (clip_lo, max_zero), (clip_hi, min_hi, relu_hi))

    def upper(self, matches) -> float | None:
        """The upper bound where the lower one is 0 and the upper one a positive scalar, else None."""
        if not all(is_value(matches[z], 0.0) for z in self.zeros if z in matches):
            return None
        high = next(scalar(matches[h]) for h in self.highs if h in matches)
        return high if high is not None and high > 0 else None

    def is_relax_clip(self, matches) -> bool:
        return self.highs[0] in matches


def _divided_or_scaled(value: DFPattern):
    """value / d or value * m (either order): returns (pattern, d, m)."""
    divisor, multiplier = is_const(), is_const()
    return is_op("relax.divide")(value, divisor) | either(_MUL, value, multiplier), divisor, multiplier


def _divides_by(matches, divisor, multiplier, high: float) -> bool:
    """The matched divisor equals `high`, or the multiplier is 1/high."""
    return is_value(matches[divisor], high) if divisor in matches else is_value(matches[multiplier], 1 / high)


def _clip_of_shifted(x):
    """clip(x + b, 0, h): returns (clip, b)."""
    shift = is_const()
    return _ClipFromZero.of(either(_ADD, x, shift)), shift


def _hardswish_divided_outside() -> Form:
    """(x * clip(x + b, 0, h)) / h, or * (1/h): x * HardSigmoid(x) with alpha = 1/h, beta = b/h."""
    x = wildcard()
    clip, shift = _clip_of_shifted(x)
    pattern, divisor, multiplier = _divided_or_scaled(either(_MUL, x, clip.pattern))

    def build(matches):
        high = clip.upper(matches)
        if high is None or not _divides_by(matches, divisor, multiplier, high):
            return None
        beta = scalar(matches[shift])
        if beta is None:
            return None
        return relax.op.multiply(matches[x], hard_sigmoid(matches[x], 1 / high, beta / high))

    return Form("hardswish", pattern, build)


def _hardsigmoid_from_relu6() -> Form:
    """clip(x + b, 0, h) / h, or * (1/h): ReLU6(x + 3) / 6 is HardSigmoid(1/6, 1/2)."""
    x = wildcard()
    clip, shift = _clip_of_shifted(x)
    pattern, divisor, multiplier = _divided_or_scaled(clip.pattern)

    def build(matches):
        high, beta = clip.upper(matches), scalar(matches[shift])
        if high is None or beta is None or not _divides_by(matches, divisor, multiplier, high):
            return None
        return hard_sigmoid(matches[x], 1 / high, beta / high)

    return Form("hardsigmoid", pattern, build)


def _hardsigmoid_respelled() -> Form:
    """clip(x / d + b, 0, 1), or clip(x * a + b, 0, 1) with min/max for the clip."""
    x, alpha, divisor, shift = wildcard(), is_const(), is_const(), is_const()
    scaled = is_op("relax.divide")(x, divisor) | either(_MUL, x, alpha)
    clip = _ClipFromZero.of(either(_ADD, scaled, shift))

    def build(matches):
        if alpha in matches and clip.is_relax_clip(matches):
            return None  # already canonical
        slope = scalar(matches[alpha]) if alpha in matches else _reciprocal(scalar(matches[divisor]))
        beta = scalar(matches[shift])
        if slope is None or beta is None or not close(clip.upper(matches), 1.0):
            return None
        return hard_sigmoid(matches[x], slope, beta)

    return Form("hardsigmoid", clip.pattern, build)


def _reciprocal(value: float | None) -> float | None:
    return None if not value else 1 / value


def _silu() -> Form:
    """x * sigmoid(x), or x * sigmoid(x * 1) (Paddle's swish with beta = 1)."""
    x, one = wildcard(), is_const()
    gate = is_op("relax.sigmoid")(either(_MUL, x, one)) | is_op("relax.sigmoid")(x)
    pattern = either(_MUL, x, gate)

    def build(matches):
        if one in matches and not is_value(matches[one], 1.0):
            return None
        return relax.op.nn.silu(matches[x])

    return Form("silu", pattern, build)


def _mish() -> Form:
    """x * tanh(softplus(x)), softplus as log(1 + exp(x)) (ONNX Mish) or max(x, 0) + log(1 + exp(-|x|))
    (ONNX Softplus); `R.nn.softplus` there is already canonical."""
    x, one, zero, stable_one = wildcard(), is_const(), is_const(), is_const()
    naive = is_op("relax.log")(either(_ADD, is_op("relax.exp")(x), one))
    tail = is_op("relax.exp")(is_op("relax.negative")(is_op("relax.abs")(x)))
    stable = either(_ADD, either("relax.maximum", x, zero), is_op("relax.log")(either(_ADD, stable_one, tail)))
    pattern = either(_MUL, x, is_op("relax.tanh")(naive | stable))

    def build(matches):
        wanted = {p: v for p, v in ((one, 1.0), (zero, 0.0), (stable_one, 1.0)) if p in matches}
        if not all_values(matches, wanted):
            return None
        return relax.op.multiply(matches[x], relax.op.tanh(relax.op.nn.softplus(matches[x])))

    return Form("mish", pattern, build)


def activation_forms() -> list[Form]:
    # HardSwish before HardSigmoid: its divide-outside form contains no HardSigmoid to rewrite first,
    # and the other HardSwish spellings become x * HardSigmoid(x) when their gate is rewritten.
    return [_hardswish_divided_outside(), _hardsigmoid_from_relu6(), _hardsigmoid_respelled(), _silu(), _mish()]


CanonicalizeActivations = forms_pass("quantvm.CanonicalizeActivations", activation_forms)
