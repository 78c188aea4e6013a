"""Convolutions without the kernel taps that only ever read padding.

A dilated conv on a small feature map (DeepLabV3's atrous pyramid: 3x3 at dilation 24 and 36 on a 20x20 map)
reads nothing but zero padding through its outer taps: every output row y reads row y*s + k*d - pad of the
input, and for those taps that index is outside the input for every y. Dropping such taps (and the padding
they read) gives the same output exactly, with a smaller kernel: those two convs become 1x1 convs, 9 times
fewer multiply-adds.

Rewritten: NCHW conv2d with a constant OIHW weight and static shapes, any groups. The taps kept are the
contiguous run from the first live one to the last live one; the padding shrinks by the dropped taps' reach.

A tap can also read padding for some outputs only: at dilation 12 on a 20x20 map, the top tap of a 3x3 kernel
reads padding for the first 12 rows, the bottom one for the last 12, so 64% of the multiply-adds are by zero
(onnxruntime skipped them and ran that conv 2.5x faster). Such a conv becomes one conv per region of outputs
that share their live taps (the taps live for an output form a run), each on the slice of the input those
taps read, without padding; the regions are concatenated back. Done where it saves at least
`MIN_SAVED_WORK` of the multiply-adds and `MIN_SAVED_MACS_PER_REGION` for each conv it adds, in at most
`MAX_REGIONS` convs (a 3x3 conv on a 2x2 map reads padding through half its taps too, but four kernels,
slices and a concatenation cost more than a few million multiply-adds).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from relay_passes.analysis import static_shape
from relay_passes.rewrite_forms import Form, forms_pass

# A region split pays for its extra kernels and the concatenation only when it skips this much of the work.
MIN_SAVED_WORK = 0.25
# About 40 us of a 2-core AVX-512 host's FMAs: several kernel launches, and the fused bias and activation that
# move past the concatenation (ResNet-50's 3x3 convs on a 2x2 map at a 64-pixel input would split for 1.7M each).
MIN_SAVED_MACS_PER_REGION = 1 << 22
MAX_REGIONS = 25

_DATA, _WEIGHT = wildcard(), is_const()
_CONV = is_op("relax.nn.conv2d")(_DATA, _WEIGHT)


def live_taps(size: int, out_size: int, taps: int, stride: int, dilation: int, pad_before: int) -> range:
    """The taps along one axis that read at least one input element (not padding) for some output index."""
    runs = [band.taps for band in live_tap_bands(size, out_size, taps, stride, dilation, pad_before) if band.taps]
    return range(min(r.start for r in runs), max(r.stop for r in runs)) if runs else range(taps)


@dataclass(frozen=True)
class _Conv:
    """A matched NCHW conv with static shapes and a constant OIHW weight."""
    call: relax.Call
    data: relax.Expr
    weight: np.ndarray
    in_shape: tuple
    out_shape: tuple
    strides: list
    dilation: list
    padding: list  # top, left, bottom, right

    @staticmethod
    def match(matches: dict) -> _Conv | None:
        call = matches[_CONV]
        attrs = call.attrs
        if attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" or (attrs.out_layout or "NCHW") != "NCHW":
            return None
        in_shape, out_shape = static_shape(matches[_DATA]), static_shape(call)
        weight = matches[_WEIGHT].value.numpy()
        if in_shape is None or out_shape is None or weight.ndim != 4:
            return None
        return _Conv(call, matches[_DATA], weight, tuple(in_shape), tuple(out_shape),
                     [int(s) for s in attrs.strides], [int(d) for d in attrs.dilation],
                     [int(p) for p in attrs.padding])

    def conv(self, data: relax.Expr, weight: np.ndarray, padding, dilation) -> relax.Expr:
        return relax.op.nn.conv2d(data, relax.const(weight), strides=self.strides, padding=padding,
                                  dilation=dilation, groups=int(self.call.attrs.groups), data_layout="NCHW",
                                  kernel_layout="OIHW", out_dtype=str(self.call.ty.dtype))


def _trimmed(matches: dict) -> relax.Expr | None:
    conv = _Conv.match(matches)
    if conv is None:
        return None
    in_shape, out_shape, weight = conv.in_shape, conv.out_shape, conv.weight
    strides, dilation, padding = conv.strides, conv.dilation, conv.padding
    kept = [live_taps(in_shape[2 + a], out_shape[2 + a], weight.shape[2 + a], strides[a], dilation[a], padding[a])
            for a in (0, 1)]
    if all(len(k) == weight.shape[2 + a] for a, k in enumerate(kept)):
        return None
    before = [padding[a] - kept[a].start * dilation[a] for a in (0, 1)]
    after = [padding[2 + a] - (weight.shape[2 + a] - kept[a].stop) * dilation[a] for a in (0, 1)]
    if min(before + after) < 0:
        return None  # the kept taps would need the input cropped: leave it as it is
    trimmed = weight[:, :, kept[0].start:kept[0].stop, kept[1].start:kept[1].stop].copy()
    # one tap left along an axis: its dilation no longer means anything
    new_dilation = [d if len(k) > 1 else 1 for d, k in zip(dilation, kept)]
    return conv.conv(conv.data, trimmed, (before[0], before[1], after[0], after[1]), new_dilation)


@dataclass(frozen=True)
class _Band:
    """Consecutive outputs along one axis [start, stop) whose live taps are the same run `taps`."""
    start: int
    stop: int
    taps: range


def live_tap_bands(size: int, out_size: int, taps: int, stride: int, dilation: int, pad_before: int) -> list[_Band]:
    """The outputs along one axis grouped into bands of the same live taps (empty runs stay empty)."""
    bands: list[_Band] = []
    for y in range(out_size):
        live = [k for k in range(taps) if 0 <= y * stride + k * dilation - pad_before < size]
        run = range(live[0], live[-1] + 1) if live else range(0)
        if bands and bands[-1].taps == run:
            bands[-1] = _Band(bands[-1].start, y + 1, run)
        else:
            bands.append(_Band(y, y + 1, run))
    return bands


def _by_regions(matches: dict) -> relax.Expr | None:
    conv = _Conv.match(matches)
    if conv is None:
        return None
    bands = [live_tap_bands(conv.in_shape[2 + a], conv.out_shape[2 + a], conv.weight.shape[2 + a],
                            conv.strides[a], conv.dilation[a], conv.padding[a]) for a in (0, 1)]
    regions = len(bands[0]) * len(bands[1])
    if any(not band.taps for axis in bands for band in axis) or regions > MAX_REGIONS:
        return None  # an output that reads only padding is its bias alone: left as it is
    live = [sum((b.stop - b.start) * len(b.taps) for b in axis) for axis in bands]
    full = [conv.out_shape[2 + a] * conv.weight.shape[2 + a] for a in (0, 1)]
    macs_per_tap = conv.out_shape[0] * conv.weight.shape[0] * conv.weight.shape[1]  # batch x out x in per group
    saved = (full[0] * full[1] - live[0] * live[1]) * macs_per_tap
    if saved < MIN_SAVED_WORK * full[0] * full[1] * macs_per_tap or saved < MIN_SAVED_MACS_PER_REGION * (regions - 1):
        return None
    rows = [_joined([_region(conv, row, col) for col in bands[1]], axis=3) for row in bands[0]]
    return _joined(rows, axis=2)


def _joined(parts: list, axis: int) -> relax.Expr:
    """The parts concatenated along `axis`; a single part as it is (a concat of one would be a copy kernel)."""
    return relax.op.concat(parts, axis=axis) if len(parts) > 1 else parts[0]


def _region(conv: _Conv, row: _Band, col: _Band) -> relax.Expr:
    """The outputs of one row band x column band: their live taps on the input slice they read."""
    begin, end = [], []
    for a, band in enumerate((row, col)):
        first = band.start * conv.strides[a] + band.taps.start * conv.dilation[a] - conv.padding[a]
        last = (band.stop - 1) * conv.strides[a] + (band.taps.stop - 1) * conv.dilation[a] - conv.padding[a]
        begin.append(first)
        end.append(last + 1)
    data = relax.op.strided_slice(conv.data, axes=[2, 3], begin=begin, end=end)
    weight = conv.weight[:, :, row.taps.start:row.taps.stop, col.taps.start:col.taps.stop].copy()
    dilation = [d if len(band.taps) > 1 else 1 for d, band in zip(conv.dilation, (row, col))]
    return conv.conv(data, weight, (0, 0, 0, 0), dilation)


def _forms() -> list[Form]:
    # the dead taps first: a conv left with live taps everywhere is not split
    return [Form("conv2d_dead_taps", _CONV, _trimmed), Form("conv2d_live_tap_regions", _CONV, _by_regions)]


ConvWithoutDeadTaps = forms_pass("quantvm.ConvWithoutDeadTaps", _forms)
