"""Convolutions without the kernel taps that only ever read padding.

A dilated conv on a small feature map (DeepLabV3's atrous pyramid: 3x3 at dilation 24 and 36 on a 20x20 map)
reads nothing but zero padding through its outer taps: every output row y reads row y*s + k*d - pad of the
input, and for those taps that index is outside the input for every y. Dropping such taps (and the padding
they read) gives the same output exactly, with a smaller kernel: those two convs become 1x1 convs, 9 times
fewer multiply-adds.

Rewritten: NCHW conv2d with a constant OIHW weight and static shapes, any groups. The taps kept are the
contiguous run from the first live one to the last live one; the padding shrinks by the dropped taps' reach.
"""

from __future__ import annotations

from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from relay_passes.analysis import static_shape
from relay_passes.rewrite_forms import Form, forms_pass

_DATA, _WEIGHT = wildcard(), is_const()
_CONV = is_op("relax.nn.conv2d")(_DATA, _WEIGHT)


def live_taps(size: int, out_size: int, taps: int, stride: int, dilation: int, pad_before: int) -> range:
    """The taps along one axis that read at least one input element (not padding) for some output index."""
    live = [k for k in range(taps)
            if any(0 <= y * stride + k * dilation - pad_before < size for y in range(out_size))]
    return range(live[0], live[-1] + 1) if live else range(taps)


def _trimmed(matches: dict) -> relax.Expr | None:
    call = matches[_CONV]
    attrs = call.attrs
    if (attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" or (attrs.out_layout or "NCHW") != "NCHW"):
        return None
    in_shape, out_shape = static_shape(matches[_DATA]), static_shape(call)
    weight = matches[_WEIGHT].value.numpy()
    if in_shape is None or out_shape is None or weight.ndim != 4:
        return None
    strides, dilation = [int(s) for s in attrs.strides], [int(d) for d in attrs.dilation]
    padding = [int(p) for p in attrs.padding]  # top, left, bottom, right
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
    return relax.op.nn.conv2d(matches[_DATA], relax.const(trimmed), strides=strides,
                              padding=(before[0], before[1], after[0], after[1]), dilation=new_dilation,
                              groups=int(attrs.groups), data_layout="NCHW", kernel_layout="OIHW",
                              out_dtype=str(call.ty.dtype))


def _forms() -> list[Form]:
    return [Form("conv2d_dead_taps", _CONV, _trimmed)]


ConvWithoutDeadTaps = forms_pass("quantvm.ConvWithoutDeadTaps", _forms)
