"""A strided 1-D conv over a thin input as an unstrided conv over more channels (space-to-depth).

An audio front end reads raw samples: one channel, a long kernel, a large stride (a keyword spotter's first
layer: 1 channel, kernel 80, stride 16). One input channel fills neither a vector of channels nor the 4-channel
group of an int8 dot product: the int8 build padded the channel to 4 (4x the work) and transposed the whole
input to do it. Folding the stride into channels gives the same sums exactly:

    x'[n, c*s + r, 0, t] = x[n, c, 0, t*s + r]        w'[o, c*s + r, 0, k] = w[o, c, 0, k*s + r]

so conv(x, w, stride s, kernel K) = conv(x', w', stride 1, kernel K/s) with C*s channels (16 for the spotter).

Rewritten: NCHW conv2d of height 1 (Conv1dAsConv2d's form), a constant OIHW weight of height 1, one group,
no dilation, a stride s > 1 along the width that divides the kernel width, fewer input channels than
THIN_CHANNELS and static shapes. Width padding is applied (or the unread tail cropped) before the fold.
"""

from __future__ import annotations

from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from relay_passes.analysis import static_shape
from relay_passes.rewrite_forms import Form, forms_pass

# Inputs with fewer channels than this are folded: the int8 dot product's group (4), below any vector width
THIN_CHANNELS = 4
MAX_FOLDED_CHANNELS = 64  # channels after folding at most: beyond, the weight grows for little gain

_DATA, _WEIGHT = wildcard(), is_const()
_CONV = is_op("relax.nn.conv2d")(_DATA, _WEIGHT)


def fold_weight(weight, stride: int):
    """OIHW weight [O, C, 1, K] -> [O, C*s, 1, K/s]: w'[o, c*s + r, 0, k] = w[o, c, 0, k*s + r]."""
    out_channels, channels, _, taps = weight.shape
    folded = weight.reshape(out_channels, channels, 1, taps // stride, stride).transpose(0, 1, 4, 2, 3)
    return folded.reshape(out_channels, channels * stride, 1, taps // stride).copy()


def _folded(matches: dict) -> relax.Expr | None:
    call = matches[_CONV]
    attrs = call.attrs
    if (attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" or (attrs.out_layout or "NCHW") != "NCHW"
            or int(attrs.groups) != 1 or any(int(d) != 1 for d in attrs.dilation)):
        return None
    data = matches[_DATA]
    in_shape, out_shape = static_shape(data), static_shape(call)
    weight = matches[_WEIGHT].value.numpy()
    if in_shape is None or out_shape is None or weight.ndim != 4:
        return None
    batch, channels, height, width = in_shape
    stride_h, stride = (int(s) for s in attrs.strides)
    top, left, bottom, right = (int(p) for p in attrs.padding)
    taps = weight.shape[3]
    if (height != 1 or weight.shape[2] != 1 or stride_h != 1 or top or bottom or stride < 2 or taps % stride
            or channels >= THIN_CHANNELS or channels * stride > MAX_FOLDED_CHANNELS):
        return None
    steps = out_shape[3] + taps // stride - 1  # folded width the output reads
    span = steps * stride  # input samples (padding included) those cover
    extra = span - (left + width)  # > 0: padding to add on the right; < 0: an unread tail to crop
    if left or extra > 0:
        data = relax.op.nn.pad(data, [0, 0, 0, 0, 0, 0, left, max(extra, 0)])
    if extra < 0:
        data = relax.op.strided_slice(data, axes=[3], begin=[0], end=[span])
    # [N, C, 1, steps*s] -> [N, C, steps, s] -> [N, C, s, steps] -> [N, C*s, 1, steps]
    data = relax.op.reshape(data, [batch, channels, steps, stride])
    data = relax.op.permute_dims(data, [0, 1, 3, 2])
    data = relax.op.reshape(data, [batch, channels * stride, 1, steps])
    return relax.op.nn.conv2d(data, relax.const(fold_weight(weight, stride)), strides=(1, 1), padding=(0, 0, 0, 0),
                              dilation=(1, 1), groups=1, data_layout="NCHW", kernel_layout="OIHW",
                              out_dtype=str(call.ty.dtype))


def _forms() -> list[Form]:
    return [Form("conv2d_stride_as_channels", _CONV, _folded)]


ConvStrideAsChannels = forms_pass("quantvm.ConvStrideAsChannels", _forms)
