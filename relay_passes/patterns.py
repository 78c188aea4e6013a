"""The fusion rules, declared once: the fusion pass, the compile report and the tests all read RULES.

They follow MXNet 2.0's oneDNN fusions (Conv+BN+act+sum, FC+elementwise, BN+ReLU) over the Relax graph as
`prepare_graph` leaves it: BatchNorm after a conv or FC is already folded into its weights and bias, so a
conv "with BN" is `conv2d + add(per-channel constant)`. Activations are matched in the form the ONNX
importer gives them (some are several Relax ops, e.g. HardSwish is x * clip(x + 3, 0, 6) / 6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tvm.relax.dpl import DFPattern, is_const, is_op, wildcard


def _either(op: str, a: DFPattern, b: DFPattern) -> DFPattern:
    """A commutative binary op with its operands in either order."""
    return is_op(op)(a, b) | is_op(op)(b, a)


def _one_of(*patterns: DFPattern) -> DFPattern:
    result = patterns[0]
    for p in patterns[1:]:
        result = result | p
    return result


def _unary(name: str) -> Callable[[DFPattern], DFPattern]:
    return lambda x: is_op(name)(x)


def _clip_from_zero(x):  # ReLU6 / bounded ReLU: Clip(0, a), or Clip with only min=0 (a max)
    return _one_of(is_op("relax.clip")(x, wildcard(), wildcard()),
                   _either("relax.maximum", x, is_const()))


def _softrelu(x):  # the importer's softplus: max(x, 0) + log(1 + exp(-|x|))
    tail = is_op("relax.log")(_either("relax.add", is_const(), is_op("relax.exp")(is_op("relax.negative")(is_op("relax.abs")(x)))))
    return _one_of(is_op("relax.nn.softplus")(x), _either("relax.add", _either("relax.maximum", x, is_const()), tail))


def _hardsigmoid(x):  # clip(alpha * x + beta, 0, 1)
    return is_op("relax.clip")(_either("relax.add", _either("relax.multiply", x, is_const()), is_const()),
                               wildcard(), wildcard())


def _hardswish(x):  # x * HardSigmoid(x), relay_passes.canonicalize's form; also x * (clip(x + 3, 0, 6) / 6)
    gate = is_op("relax.divide")(is_op("relax.clip")(_either("relax.add", x, is_const()), wildcard(), wildcard()), is_const())
    return _either("relax.multiply", x, gate | _hardsigmoid(x))


def _silu(x):  # x * sigmoid(x)
    return _one_of(is_op("relax.nn.silu")(x), _either("relax.multiply", x, is_op("relax.sigmoid")(x)))


def _elu(x):  # relu(x) + (-alpha) * relu(1 - exp(x))
    negative_part = _either("relax.multiply", is_const(),
                            is_op("relax.nn.relu")(is_op("relax.subtract")(is_const(), is_op("relax.exp")(x))))
    return _either("relax.add", negative_part, is_op("relax.nn.relu")(x))


def _square(x):
    return _one_of(is_op("relax.multiply")(x, x), is_op("relax.power")(x, is_const()))


# activation name -> pattern builder over the activation's input. Order matters: an OR pattern takes its
# first alternative that matches, so an activation that contains another (SiLU contains Sigmoid, HardSwish
# contains HardSigmoid) comes first, or the group would stop inside it.
CONV_ACTIVATIONS: dict[str, Callable[[DFPattern], DFPattern]] = {
    "silu": _silu,
    "hardswish": _hardswish,
    "softrelu": _softrelu,
    "relu": _unary("relax.nn.relu"),
    "gelu": _unary("relax.nn.gelu"),
    "gelu_tanh": _unary("relax.nn.gelu_tanh"),
    "leaky_relu": _unary("relax.nn.leakyrelu"),
    "sigmoid": _unary("relax.sigmoid"),
    "tanh": _unary("relax.tanh"),
    "bounded_relu": _clip_from_zero,
    "hardsigmoid": _hardsigmoid,
}
FC_ACTIVATIONS: dict[str, Callable[[DFPattern], DFPattern]] = {
    # relay_passes.canonicalize leaves SiLU as one op and HardSwish / HardSigmoid in the form matched here
    "silu": _silu,  # contains sigmoid
    "hardswish": _hardswish,  # contains hardsigmoid
    "hardsigmoid": _hardsigmoid,  # contains clip
    "elu": _elu,  # contains exp and relu
    "softrelu": _softrelu,  # contains abs and exp
    **{k: CONV_ACTIVATIONS[k] for k in ("relu", "gelu", "gelu_tanh", "leaky_relu", "sigmoid", "tanh",
                                       "bounded_relu")},
    "square": _square,
    "sqrt": _unary("relax.sqrt"),
    "exp": _unary("relax.exp"),
    "abs": _unary("relax.abs"),
}


def _any_activation(table, x) -> DFPattern:
    return _one_of(*(build(x) for build in table.values()))


@dataclass(frozen=True)
class FusionRule:
    """One fusion: `build()` gives its pattern variants, each with named parts (`producer`, `bias`, `sum`,
    `act`), tried in order."""

    name: str
    description: str
    build: Callable[[], list[tuple[DFPattern, dict[str, DFPattern]]]]


def _op(kind: str):
    """The conv/FC call itself."""
    # A weight is a constant, or for an int8 FC a constant packed for the target's dot instruction
    # and unpacked inside the kernel (targets.layout.pack_dense_weights).
    weight = is_const() if kind == "conv" else is_const() | is_op("relax.layout_transform")(is_const())
    op = is_op("relax.nn.conv2d" if kind == "conv" else "relax.matmul")(wildcard(), weight)
    if kind == "fc":  # a packed weight padded to whole vectors: the FC's real columns sliced off its result
        op = op | is_op("relax.strided_slice")(op, varg_default_wildcard=True)
    return op


def _producer(kind: str):
    """The conv/FC and its optional bias, in fp32 or in the int8 form relay_passes.quantize writes:
    `multiply(astype(conv2d(q, W) [+ s32 bias], f32), scale)`. `op` is the conv/FC call either way."""
    op = _op(kind)
    accumulator = op | is_op("relax.add")(op, is_const())
    dequantized = is_op("relax.multiply")(is_op("relax.astype")(accumulator), is_const())
    bias = is_const()
    with_bias = is_op("relax.add")(op | dequantized, bias)
    return op, bias, with_bias, dequantized


def _with_quantize_tail(out):
    """Where the next op is int8, its input quantize ends this kernel (requantize in the epilogue)."""
    return is_op("relax.quantize")(out, is_const(), is_const()) | out


def _chain(kind: str, order: tuple[str, ...]):
    """Producer (+ optional bias) followed by the steps in `order`: 'sum' (add of another tensor), 'act'.

    With a sum, the variants put the chain on either side of the Add: where both operands are conv chains
    and one of them is also read elsewhere, the other one must still get its chance to fuse.
    """
    table = CONV_ACTIVATIONS if kind == "conv" else FC_ACTIVATIONS

    def build():
        return [variant(chain_first) for chain_first in ((True, False) if "sum" in order else (True,))]

    def variant(chain_first: bool):
        producer, bias, with_bias, dequantized = _producer(kind)
        # a lone fp32 conv/FC is no fusion; a lone int8 one already is (conv, bias, cast, scale)
        out = with_bias | dequantized if not order else with_bias | dequantized | producer
        parts = {"producer": producer, "bias": bias}
        for step in order:
            if step == "sum":
                # another tensor (a constant here is a bias, not a sum), or the int8 copy of one, dequantized
                # in this kernel (relay_passes.quantized_residuals)
                other = is_op("relax.dequantize")(~is_const(), is_const(), is_const()) | ~is_const()
                out = is_op("relax.add")(out, other) if chain_first else is_op("relax.add")(other, out)
                parts["sum"], parts["sum_operand"] = out, other
            else:
                out = _any_activation(table, out)
                parts["act"] = out
        out = _with_quantize_tail(out)
        parts["root"] = out
        return out, parts

    return build


def _requantized(kind: str):
    """An int8 conv/FC whose activation and next quantize relay_passes.requantize folded into its epilogue:
    `astype(clip(astype(round(astype(op, f32) * m [+ shift]), i32), lo, hi), u8/s8)`."""

    def build():
        op = _op(kind)
        scaled = is_op("relax.multiply")(is_op("relax.astype")(op), is_const())
        shifted = is_op("relax.add")(scaled, is_const()) | scaled
        rounded = is_op("relax.astype")(is_op("relax.round")(shifted))
        out = is_op("relax.astype")(is_op("relax.clip")(rounded, wildcard(), wildcard()))
        return [(out, {"producer": op, "root": out})]

    return build


def _bn_relu():
    """A BatchNorm that follows no conv/FC (ResNet v2 pre-activation): its inference form, a chain of
    per-channel constant subtract/divide/multiply/add, then ReLU."""
    x = wildcard()
    chain = None
    for _ in range(4):
        inner = x if chain is None else chain | x
        step = _one_of(*(is_op(f"relax.{op}")(inner, is_const()) for op in ("subtract", "divide", "multiply", "add")),
                       is_op("relax.multiply")(is_const(), inner), is_op("relax.add")(is_const(), inner))
        chain = step if chain is None else step | chain
    out = _with_quantize_tail(is_op("relax.nn.relu")(chain))
    return [(out, {"root": out, "bn_input": x})]


def _packed_fc():
    """A lone fp32 FC whose weight targets.layout packed: the unpacking must sit inside the FC's kernel (its
    reads index the packed constant), or constant folding would undo the packing."""
    out = is_op("relax.matmul")(wildcard(), is_op("relax.layout_transform")(is_const()))
    return [(out, {"root": out})]


def _int8_average_pool():
    """An average pooling that reads int8 data: dequantize, average, and the next quantize, one kernel."""
    data = is_op("relax.dequantize")(wildcard(), is_const(), is_const())
    pool = is_op("relax.nn.avg_pool2d")(data) | is_op("relax.nn.adaptive_avg_pool2d")(data) | is_op("relax.mean")(data)
    out = _with_quantize_tail(pool)
    return [(out, {"root": out})]


def _attention():
    """Scaled dot-product attention between activations: matmul(q, k^T) [* or / a constant] [+ a mask or bias]
    -> softmax over the keys -> matmul(., v). One kernel computes each block of rows' scores, their softmax and
    their context together, so the [.., queries, keys] scores never go through memory."""
    queries, keys_t, values = ~is_const(), ~is_const(), ~is_const()
    scores = is_op("relax.matmul")(queries, keys_t)
    scaled = _one_of(_either("relax.multiply", scores, is_const()), is_op("relax.divide")(scores, is_const()), scores)
    biased = _either("relax.add", scaled, wildcard()) | scaled
    probs = is_op("relax.nn.softmax")(biased)
    out = is_op("relax.matmul")(probs, values)
    return [(out, {"root": out, "scores": scores, "probs": probs})]


RULES: tuple[FusionRule, ...] = (
    FusionRule("conv_requantize", "Conv2D (+bias/BN) (+ReLU/bounded ReLU) + the next int8 op's quantize, "
               "as one multiply-add and clamp (relay_passes.requantize)", _requantized("conv")),
    FusionRule("fc_requantize", "FullyConnected (+bias) (+ReLU/bounded ReLU) + the next int8 op's quantize, "
               "as one multiply-add and clamp (relay_passes.requantize)", _requantized("fc")),
    FusionRule("conv_bn_sum_act", "Conv2D (+bias/BN) + elementwise Add + activation", _chain("conv", ("sum", "act"))),
    FusionRule("conv_bn_act_sum", "Conv2D (+bias/BN) + activation + elementwise Add", _chain("conv", ("act", "sum"))),
    FusionRule("conv_bn_sum", "Conv2D (+bias/BN) + elementwise Add", _chain("conv", ("sum",))),
    FusionRule("conv_bn_act", "Conv2D (+bias/BN) + activation", _chain("conv", ("act",))),
    FusionRule("conv_bn", "Conv2D + bias/BN", _chain("conv", ())),
    FusionRule("fc_act", "FullyConnected (+bias) + elementwise op", _chain("fc", ("act",))),
    FusionRule("fc_sum", "FullyConnected (+bias) + elementwise Add", _chain("fc", ("sum",))),
    FusionRule("fc_bias", "FullyConnected + bias", _chain("fc", ())),
    FusionRule("fc_packed", "FullyConnected reading its packed weight", _packed_fc),
    FusionRule("bn_relu", "BatchNorm + ReLU (BN not after a conv or FC)", _bn_relu),
    FusionRule("attention", "MatMul(Q, K^T) (+scale, +mask) + Softmax + MatMul(., V)", _attention),
    FusionRule("int8_avg_pool", "average pooling on int8 data (+ the next op's quantize)", _int8_average_pool),
)
RULE_NAMES = tuple(rule.name for rule in RULES)
# The rules that fuse relay_passes.requantize's folded form: the fold runs only where they are used.
REQUANTIZE_RULES = ("conv_requantize", "fc_requantize")
