"""Channel counts no vector block divides (ShuffleNet's 58 and 116), padded to whole blocks, and channel
permutations (ShuffleNet's channel shuffle and split) carried as an index instead of moved data.

A value whose channels live padded or permuted inside a larger tensor is written

    take(padded, index, axis=1)

logical channel i being the padded tensor's channel index[i]; the padded tensor's other channels hold finite
values that no reader uses (its weights there are zero). That take sinks through what follows:

- a conv whose output channels fit no block computes them padded (zero weights and bias for the extra ones),
  and so does one whose blocks fit only one-block register tiles (one block more);
- elementwise ops, pooling and per-channel constants (scattered to the padded channels) apply to the padded
  tensor, and so do per-channel tensors (a squeeze-excite gate, gathered to the padded channels) and another
  padded tensor with its channels at the same places (a residual add); a channel shuffle (reshape,
  transpose, reshape) and a channel slice only change the index;
- a concat concatenates the padded tensors;
- a conv reads the padded tensor, its weights scattered to the index (a depthwise conv: its channels; a
  grouped conv, where the padding is whole groups at the end: zero groups).

A take a conv or a concat reads, whose padded tensor holds more than its own channels (one half of a
shuffle), is first gathered into a tensor of its own channels padded to a block: a real gather, which
runs blocked (targets.channel_gather). Where the take reaches an op none of these rules covers, it is an
ordinary gather into the logical channels.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax

from targets.register_tiles import tileable_blocks

_CHANNELS = 1
# A conv's output is padded only where that adds at most this fraction of its channels (58 -> 64, 116 ->
# 128, 546 -> 560), or where its output is one pixel (squeeze-excite's reduction convs: 4 -> 16 channels of
# nothing): a 4-channel head over a whole image padded to 16 would do 4x the work; it keeps its NCHW rule.
MAX_PADDING = 0.25
# Channels with only a half-vector block (1000: 8 lanes on AVX-512) are padded to whole vectors where that adds
# at most this share (1000 -> 1008, 232 -> 240): the conv's FMAs then run on full vectors, twice the work each
# (SqueezeNet fp32 4%, ShuffleNetV2 8% faster). Not on one pixel (a matvec is as fast on the narrower block).
NARROW_BLOCK_PADDING = 1 / 16
# Full-vector blocks whose count fits only one-block register tiles (targets.register_tiles.tileable_blocks)
# get one more block where that adds at most this share: SqueezeNet's 1000 classes on 8 lanes, 125 -> 126
# blocks (its 13x13 classifier conv ran at 0.74x onnxruntime's speed, one 8-channel block per tile).
TILE_PADDING = 1 / 8
# Where wide vectors run at full rate (targets.layout.wide_vectors_full_rate), a conv on a half-vector block
# (24, 40, 56 channels on AVX-512) that reads at least this many inputs per output (input channels x window)
# computes its outputs padded to whole vectors, up to WIDENING_PADDING more of them: a full vector does twice
# a half one's work per instruction, so 24 -> 32 channels costs two thirds of the time. Shallower convs are
# bound by memory more than by their multiply-adds, and their padded outputs cost their readers as much.
DEEP_REDUCTION = 512
WIDENING_PADDING = 1 / 3
# Unary ops the same on every element (their other arguments, if any, are attributes or scalars).
_ELEMENTWISE = frozenset("relax." + name for name in (  # noqa: SIM905 (the fusion table's form)
    "nn.relu nn.gelu nn.gelu_tanh nn.silu sigmoid tanh clip nn.leakyrelu nn.softplus astype negative abs "
    "exp sqrt erf").split())
_UNARY = _ELEMENTWISE | {"relax.nn.max_pool2d", "relax.nn.avg_pool2d"}  # the same on every channel
_QUANTIZE = frozenset(("relax.quantize", "relax.dequantize"))  # unary when their scale and zero point are scalars
# Binary ops and the constant a padded channel is given (so that it stays finite: never a division by 0).
_BINARY_FILL = {"relax.add": 0.0, "relax.subtract": 0.0, "relax.multiply": 1.0, "relax.divide": 1.0,
                "relax.maximum": 0.0, "relax.minimum": 0.0}


def op_name(expr) -> str | None:
    """The op of a call to a Relax op (targets does not import relay_passes, whose analysis has the same)."""
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return None


def static_shape(expr) -> list[int] | None:
    values = getattr(getattr(getattr(expr, "ty", None), "shape", None), "values", None)
    if values is None or not all(isinstance(d, tvm.tirx.IntImm) for d in values):
        return None
    return [int(d) for d in values]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _constant(expr) -> np.ndarray | None:
    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.GenericConst) else None


def padded_sources(expr, values: dict, padded_outputs: dict) -> list[relax.Expr]:
    """The original weights of the padded convs (`padded_outputs`: padded output -> its original weight) that
    `expr` is computed from, up to the nearest convs. Each value is read once: every path would multiply at
    each residual add (a transformer's simulated int8 graph never finished)."""
    found, seen, stack = [], set(), [expr]
    while stack:
        expr = stack.pop()
        if isinstance(expr, relax.Var):
            if expr in seen:
                continue
            seen.add(expr)
            if expr in padded_outputs:
                found.append(padded_outputs[expr])
                continue
            expr = values.get(expr)
            if expr is None or op_name(expr) == "relax.nn.conv2d":
                continue
        stack.extend(expr.fields if isinstance(expr, relax.Tuple) else getattr(expr, "args", []))
    return found


@relax.expr_functor.mutator
class _PadChannels(relax.PyExprMutator):
    def __init__(self, mod, lanes: int, blockable: Callable[[int], bool], unpadded_weights=(),
                 widen_deep: bool = False):
        super().__init__(mod)
        self.lanes, self._blockable = lanes, blockable
        self.widen_deep = widen_deep  # pad deep convs on half-vector blocks to whole vectors (DEEP_REDUCTION)
        self.unpadded_weights = unpadded_weights  # convs (by weight) whose output is not to be padded
        self.padded_outputs: dict[relax.Var, relax.Expr] = {}  # padded conv output -> its original weight
        self.gathers: list[relax.Var] = []  # the gathers of channels into a tensor of their own (_compact)
        self.tile_padded: dict[relax.Var, relax.Expr] = {}  # the padded outputs padded only for tiles
        self.widened: dict[relax.Var, relax.Expr] = {}  # the padded outputs of deep convs (DEEP_REDUCTION)

    def visit_call_(self, call):
        call = super().visit_call_(call)
        name = op_name(call)
        if name is None or call.ty is None or not isinstance(call.ty, relax.TensorType):
            return call
        if name == "relax.nn.conv2d":
            return self._conv(call)
        if name == "relax.concat":
            return self._concat(call)
        if name == "relax.strided_slice":
            return self._slice(call)
        if name == "relax.reshape":
            return self._shuffle(call)
        if name in _UNARY or _is_scalar_quantize(call):
            return self._unary(call)
        if name == "relax.mean":
            return self._mean(call)
        if name in _BINARY_FILL and len(call.args) == 2:
            return self._binary(call, _BINARY_FILL[name])
        return call

    def visit_tuple_getitem_(self, item):
        """A part of a channel split of a padded value: the index, split."""
        item = super().visit_tuple_getitem_(item)
        split = self.lookup_binding(item.tuple_value) if isinstance(item.tuple_value, relax.Var) else None
        if op_name(split) != "relax.split" or int(split.attrs.axis) != _CHANNELS:
            return item
        gathered = self._gathered(split.args[0])
        if gathered is None:
            return item
        padded, index = gathered
        sections = split.attrs.indices_or_sections
        if isinstance(sections, (int, tvm.tirx.IntImm)):
            parts = np.split(index, int(sections))
        else:
            parts = np.split(index, [int(i) for i in sections])
        return self._take(padded, parts[int(item.index)])

    # -- the take that stands for a padded or permuted value

    def _gathered(self, expr) -> tuple[relax.Expr, np.ndarray] | None:
        """(padded tensor, index) when `expr` is the take of channels of a padded tensor."""
        value = self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
        if op_name(value) != "relax.take" or int(value.attrs.axis) != _CHANNELS:
            return None
        index = _constant(value.args[1])
        if index is None or index.ndim != 1 or getattr(value.args[0].ty, "ndim", 0) != 4:
            return None
        return value.args[0], index.astype(np.int64)

    def _compact(self, padded, index, widened_ok: bool = False) -> tuple[relax.Expr, np.ndarray]:
        """The channels `index` picks, in a tensor of their own padded to whole blocks: `padded` itself when
        it holds nothing else, else a gather of them (the extra indices repeat the first channel: unread).
        `widened_ok`: a reader that takes a widened conv's output (DEEP_REDUCTION) on its whole vectors, as a
        conv does; a concat does not (its parts on half-vector blocks would mix block sizes)."""
        blocks = self._padded_count(len(index))
        whole = {blocks, self._tileable_count(blocks)} if blocks % self.lanes == 0 else {blocks}
        if widened_ok:
            whole.add(_round_up(len(index), self.lanes))
        if _channels(padded) in whole:  # padded for blocks or for tiles, nothing else in it
            return padded, index
        picked = np.concatenate([index, np.full(blocks - len(index), index[0])]).astype("int32")
        gathered = self.builder_.emit(relax.op.take(padded, relax.const(picked), axis=_CHANNELS, mode="clip"))
        self.gathers.append(gathered)
        return gathered, np.arange(len(index))

    def _padded_count(self, channels: int) -> int:
        """The channels a tensor of `channels` takes: as many where they have a full-vector block, or a
        narrower one and whole vectors would add more than NARROW_BLOCK_PADDING of them; else whole vectors."""
        whole = _round_up(channels, self.lanes)
        if channels % self.lanes == 0 or (
                self._blockable(channels) and whole > channels * (1 + NARROW_BLOCK_PADDING)):
            return channels
        return whole

    def _tileable_count(self, channels: int) -> int:
        """`channels` (whole blocks), or one block more where the blocks fit only one-block tiles."""
        blocks = channels // self.lanes
        tileable = tileable_blocks(blocks)
        return tileable * self.lanes if tileable - blocks <= blocks * TILE_PADDING else channels

    def _widens(self, weight: np.ndarray, pixels: int) -> bool:
        """A deep conv whose output channels have only a half-vector block, on a map, computed on whole
        vectors instead (DEEP_REDUCTION)."""
        out_channels, depth = weight.shape[0], int(np.prod(weight.shape[1:]))
        return (self.widen_deep and pixels > 1 and out_channels % self.lanes != 0
                and self._blockable(out_channels) and depth >= DEEP_REDUCTION
                and _round_up(out_channels, self.lanes) <= out_channels * (1 + WIDENING_PADDING))

    @staticmethod
    def _take(padded, index) -> relax.Expr:
        return relax.op.take(padded, relax.const(np.asarray(index, "int32")), axis=_CHANNELS, mode="clip")

    # -- ops that make or read padded channels

    def _conv(self, call):
        attrs = call.attrs
        weight = _constant(call.args[1])
        if (weight is None or attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW"
                or (attrs.out_layout or "NCHW") != "NCHW" or static_shape(call.args[0]) is None
                or static_shape(call) is None):
            return call
        groups, in_channels = int(attrs.groups), _channels(call.args[0])
        depthwise = groups == in_channels == weight.shape[0] and weight.shape[1] == 1
        if depthwise:
            return self._depthwise(call, weight)
        if groups != 1:
            return self._grouped(call, weight, groups)
        data, gathered = call.args[0], self._gathered(call.args[0])
        if gathered is not None:
            data, index = self._compact(*gathered, widened_ok=True)
            if not self._blockable(_channels(data)):
                return call
            scattered = np.zeros((weight.shape[0], _channels(data), *weight.shape[2:]), weight.dtype)
            np.add.at(scattered, (slice(None), index), weight)
            weight = scattered
        elif not (self._blockable(in_channels) or in_channels < self.lanes):
            return call
        out_channels = weight.shape[0]
        padded_out = self._padded_count(out_channels)
        height, width = static_shape(call)[2:]
        tile_only = padded_out == out_channels and out_channels % self.lanes == 0 and height * width > 1
        if tile_only:
            padded_out = self._tileable_count(out_channels)
        widened = padded_out == out_channels and self._widens(weight, height * width)
        if widened:
            padded_out = _round_up(out_channels, self.lanes)
        if (padded_out > out_channels * (1 + MAX_PADDING) and height * width > 1 and not widened) or any(
                call.args[1].same_as(w) for w in self.unpadded_weights):
            padded_out = out_channels
        if self._blockable(out_channels) and height * width == 1:  # a matvec: its narrower block is as fast
            padded_out = out_channels
        if gathered is None and padded_out == out_channels:
            return call
        weight = np.concatenate([weight, np.zeros((padded_out - out_channels, *weight.shape[1:]), weight.dtype)])
        conv = self._conv_like(call, data, weight, groups=1)
        if padded_out == out_channels:
            return conv
        padded = self.builder_.emit(conv)
        # A conv goes back to its own channels when its padding is stranded if those have a (narrower) block,
        # or if its map fills whole vectors: the NCHW rule vectorizes pixels, and SSDlite's 546-class heads on
        # 10x10 to 1x1 maps ran on 4-lane or scalar vectors at a fifth of onnxruntime's speed; padded and
        # blocked, one gather after them is cheap.
        if self._blockable(out_channels) or height * width % self.lanes == 0:
            self.padded_outputs[padded] = call.args[1]
        if tile_only:
            self.tile_padded[padded] = call.args[1]
        if widened:
            self.widened[padded] = call.args[1]
        return self._take(padded, np.arange(out_channels))

    def stranded(self, func: relax.Function) -> list[relax.Expr]:
        """The original weights of the padded convs whose channels an op no rule covers still reads back
        through a gather in `func` (the gathers between blocked tensors aside): there the padding bought an
        extra gather and no blocked reader."""
        values = relax.analysis.get_var2val(func)
        found = []
        for var, value in values.items():
            if (op_name(value) == "relax.take" and not any(var.same_as(g) for g in self.gathers)
                    and not _one_pixel(value)):  # a pooled vector's gather (a classifier's) costs nothing
                found += padded_sources(value.args[0], values, self.padded_outputs)
        # a conv padded only for its tiles is not worth a gather (ShuffleNet's 232-channel branches, a concat
        # away from their padding, gained three gathers and their layout transforms)
        # nor is a deep conv's widening: the gather of a 160x160 map back to its 24 channels for a concat cost
        # as much as the conv gained (PP-OCRv4's text detector)
        not_worth_a_gather = {**self.tile_padded, **self.widened}
        for gather in self.gathers:
            if gather in values:
                found += padded_sources(values[gather].args[0], values, not_worth_a_gather)
        return found

    def _grouped(self, call, weight, groups: int):
        """A grouped conv reading channels padded at their end by whole groups (RegNet's 8-channel groups
        after a conv padded from 55 blocks to 56): the extra groups get zero weights, and its output is
        padded the same way."""
        gathered = self._gathered(call.args[0])
        if gathered is None:
            return call
        data, index = gathered
        width = len(index) // groups
        # whole groups at the end, each a whole number of blocks (8-channel groups in 16-lane blocks have no
        # blocked kernel: the conv would fall back to NCHW)
        if (not np.array_equal(index, np.arange(len(index))) or _channels(data) % width
                or width % self.lanes):
            return call
        padded_groups = _channels(data) // width
        extra = (padded_groups - groups) * (weight.shape[0] // groups)
        weight_padded = np.concatenate([weight, np.zeros((extra, *weight.shape[1:]), weight.dtype)])
        conv = self._conv_like(call, data, weight_padded, groups=padded_groups)
        return self._take(self.builder_.emit(conv), np.arange(weight.shape[0]))

    def _depthwise(self, call, weight):
        gathered = self._gathered(call.args[0])
        if gathered is None:
            return call
        data, index = self._compact(*gathered, widened_ok=True)
        channels = _channels(data)
        if len(np.unique(index)) != len(index) or not self._blockable(channels):
            return call
        scattered = np.zeros((channels, *weight.shape[1:]), weight.dtype)
        scattered[index] = weight
        conv = self._conv_like(call, data, scattered, groups=channels)
        return self._take(self.builder_.emit(conv), index)

    @staticmethod
    def _conv_like(call, data, weight: np.ndarray, groups: int):
        attrs = call.attrs
        conv = relax.op.nn.conv2d(data, relax.const(weight), strides=attrs.strides, padding=attrs.padding,
                                  dilation=attrs.dilation, groups=groups, data_layout="NCHW",
                                  kernel_layout="OIHW", out_dtype=str(call.ty.dtype))
        return _on_args(call, conv.args, conv.attrs)

    def _concat(self, call):
        if int(call.attrs.axis) != _CHANNELS or not isinstance(call.args[0], relax.Tuple):
            return call
        parts, indices, offset = [], [], 0
        for field in call.args[0].fields:
            gathered = self._gathered(field)
            if gathered is not None:
                tensor, index = self._compact(*gathered)
            elif getattr(field.ty, "ndim", 0) == call.ty.ndim and self._blockable(_channels(field)):
                tensor, index = field, np.arange(_channels(field))
            else:
                return call
            parts.append(tensor)
            indices.append(index + offset)
            offset += _channels(tensor)
        if all(self._gathered(f) is None for f in call.args[0].fields) or not self._blockable(offset):
            return call
        joined = self.builder_.emit(relax.op.concat(parts, axis=_CHANNELS))
        return self._take(joined, np.concatenate(indices))

    def _slice(self, call):
        gathered = self._gathered(call.args[0])
        bounds = [_ints(arg) for arg in call.args[1:]]  # axes, begin, end, strides
        if gathered is None or None in bounds or bounds[0] != [_CHANNELS]:
            return call
        padded, index = gathered
        _, (begin,), (end,), strides = bounds
        picked = index[begin:end:strides[0] if strides else 1]
        if len(picked) != _channels(call):
            return call
        return self._take(padded, picked)

    def _shuffle(self, call):
        """reshape(permute_dims(reshape(x))) that only permutes x's channels (elementwise ops may sit before
        the last reshape: the int8 rewrite's quantize): the index, permuted."""
        elementwise, permute = [], self._bound(call.args[0])
        while op_name(permute) in _ELEMENTWISE or _is_scalar_quantize(permute):
            elementwise.append(permute)
            permute = self._bound(permute.args[0])
        split = self._bound(permute.args[0]) if op_name(permute) == "relax.permute_dims" else None
        if op_name(split) != "relax.reshape":
            return call
        source = split.args[0]
        shape = static_shape(source)
        if shape is None or len(shape) != 4 or static_shape(call) != shape:
            return call
        permutation = _channel_permutation(shape, static_shape(split), [int(a) for a in permute.attrs.axes])
        if permutation is None:
            return call
        gathered = self._gathered(source)
        padded, index = gathered if gathered is not None else (source, np.arange(shape[_CHANNELS]))
        for op in reversed(elementwise):
            padded = self.builder_.emit(_on_args(op, [padded, *op.args[1:]]))
        return self._take(padded, index[permutation])

    def _bound(self, expr):
        return self.lookup_binding(expr) if isinstance(expr, relax.Var) else None

    def _unary(self, call):
        gathered = self._gathered(call.args[0])
        if gathered is None or call.ty.ndim != call.args[0].ty.ndim:
            return call
        padded, index = gathered
        return self._take(self.builder_.emit(_on_args(call, [padded, *call.args[1:]])), index)

    def _mean(self, call):
        gathered = self._gathered(call.args[0])
        axes = [int(a) for a in call.attrs.axis] if call.attrs.axis is not None else []
        if gathered is None or not call.attrs.keepdims or not axes or _CHANNELS in axes or 0 in axes:
            return call
        return self._unary(call)

    def _binary(self, call, fill: float):
        if call.ty.ndim != 4:
            return call
        left, right = (self._gathered(a) for a in call.args)
        if left is not None and right is not None:
            # two padded tensors with their channels at the same places (a residual add of two padded convs)
            if not (_channels(left[0]) == _channels(right[0]) and np.array_equal(left[1], right[1])):
                return call
            return self._take(self.builder_.emit(_on_args(call, [left[0], right[0]])), left[1])
        gathered, position = (left, 0) if left is not None else (right, 1)
        if gathered is None:
            return call
        padded, index = gathered
        other, value = call.args[1 - position], _constant(call.args[1 - position])
        if value is not None:
            scattered = _scatter_channels(value, index, _channels(padded), fill)
            if scattered is None:
                return call
            other = relax.const(scattered)
        elif static_shape(other) == [1, len(index), 1, 1] and len(index) % self.lanes == 0:
            # a per-channel tensor (squeeze-excite's gate): gathered to the padded channels, one pixel
            other = self.builder_.emit(self._take(other, _inverse(index, _channels(padded))))
        else:
            return call
        args = [padded, other] if position == 0 else [other, padded]
        return self._take(self.builder_.emit(_on_args(call, args)), index)


def _on_args(call, args, attrs=None) -> relax.Call:
    """`call`'s op on other arguments (and attributes), keeping its span: the tag of its ONNX node
    (compiler.kernel_origins), by which the kernel it ends up in is named in reports and profiles."""
    return relax.Call(call.op, args, call.attrs if attrs is None else attrs, call.ty_args, call.span)


def _inverse(index: np.ndarray, channels: int) -> np.ndarray:
    """The logical channel each of `channels` padded channels holds (channel 0 where it holds none)."""
    inverse = np.zeros(channels, np.int64)
    inverse[index] = np.arange(len(index))
    return inverse


def _one_pixel(expr) -> bool:
    shape = static_shape(expr)
    return shape is not None and len(shape) == 4 and shape[2] * shape[3] == 1


def _channels(expr) -> int:
    return int(expr.ty.shape.values[_CHANNELS])


def _ints(expr) -> list[int] | None:
    """The integers of a tuple argument (strided_slice's axes, begin, end, strides)."""
    fields = getattr(expr, "fields", None)
    if fields is None or not all(hasattr(f, "value") for f in fields):
        return None
    return [int(f.value) for f in fields]


def _is_scalar_quantize(call) -> bool:
    return op_name(call) in _QUANTIZE and all(_is_scalar(a) for a in call.args[1:])


def _is_scalar(expr) -> bool:
    value = _constant(expr)
    return value is not None and value.size == 1


def _scatter_channels(value: np.ndarray, index: np.ndarray, channels: int, fill: float) -> np.ndarray | None:
    """A constant broadcast against [N, C, H, W] (a scalar, or one value per channel) against the padded
    tensor: its channel c at index[c], `fill` in the unread channels; None if it varies along other axes."""
    if value.ndim > 4:
        return None
    value = value.reshape((1,) * (4 - value.ndim) + value.shape)
    if value.shape[0] != 1 or value.shape[2:] != (1, 1) or value.shape[1] not in (1, len(index)):
        return None
    if value.shape[1] == 1:
        return value
    scattered = np.full((1, channels, 1, 1), fill, value.dtype)
    scattered[0, index] = value[0]
    return scattered


def _channel_permutation(shape: list[int], split_shape: list[int] | None, axes: list[int]) -> np.ndarray | None:
    """The channel order reshape(shape -> split_shape), permute_dims(axes), reshape back gives, when that is
    a permutation of the channels alone (ShuffleNet's channel shuffle); else None."""
    if split_shape is None or int(np.prod(split_shape)) != int(np.prod(shape)) or len(axes) != len(split_shape):
        return None
    positions = np.arange(int(np.prod(shape))).reshape(shape)
    moved = positions.reshape(split_shape).transpose(axes).reshape(shape)
    permutation = moved[0, :, 0, 0] // (shape[2] * shape[3]) % shape[1]
    if not np.array_equal(moved, positions[:, permutation]):
        return None
    return permutation


def pad_channels(mod: tvm.IRModule, lanes: int, blockable: Callable[[int], bool],
                 widen_deep: bool = False) -> tvm.IRModule:
    """Convs' channels padded to whole blocks of `lanes` where `blockable` (a channel count has a block)
    says they have none, and channel permutations carried as an index (see the module). `widen_deep`: deep
    convs on half-vector blocks too (DEEP_REDUCTION), where full vectors run at full rate."""
    for gvar, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gvar] = _pad_function(mod, func, lanes, blockable, widen_deep)
    return relax.transform.Normalize()(mod)


# Rounds of padding, each leaving unpadded the convs whose padding the previous one found stranded.
MAX_ROUNDS = 8


def _pad_function(mod, func: relax.Function, lanes: int, blockable, widen_deep: bool) -> relax.Function:
    """`func` padded, except the convs whose padded output would only be unpadded again for an op no rule
    covers (a 130-channel conv feeding an LSTM, SSDlite's 546-class heads feeding their reshape to boxes):
    those keep their own channels, as before."""
    unpadded: list[relax.Expr] = []
    for _ in range(MAX_ROUNDS):
        mutator = _PadChannels(mod, lanes, blockable, tuple(unpadded), widen_deep)
        padded = relax.analysis.remove_all_unused(mutator.visit_expr(func))
        stranded = mutator.stranded(padded)
        if not stranded:
            return padded
        unpadded += stranded
    return func
