"""ConvTranspose as a convolution: the sub-pixel form, so that it runs on the blocked conv2d kernel.

A transposed convolution with stride s writes each output phase (row % s, column % s) from its own subset of
the kernel's taps. Each phase is therefore an ordinary correlation of the input with that subset of taps,
flipped, and all s*s phases together are one conv2d with s*s times the output channels and a kernel of
ceil(k / s) taps, followed by a depth-to-space that interleaves the phases and a crop for the padding:

    conv2d_transpose(x, w)  ->  crop(depth_to_space(conv2d(x, w_phases, padding=ceil(k/s) - 1)))

The output channels are ordered phase first, (row phase, column phase, channel), so that each channel block
of the conv's output belongs to one phase. Taps a phase lacks (k not a multiple of s) are zero. The conv
does exactly the multiply-adds the transposed convolution needs, plus those zeros.

Rewritten: 2-D, groups 1, dilation 1, NCHW data, a constant IOHW weight, static shapes. Anything else stays
a conv2d_transpose (TVM's generic kernel).
"""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from relay_passes.analysis import static_shape
from relay_passes.rewrite_forms import Form, forms_pass

_DATA, _WEIGHT = wildcard(), is_const()
_CONV_TRANSPOSE = is_op("relax.nn.conv2d_transpose")(_DATA, _WEIGHT)


def phase_weight(weight: np.ndarray, strides: tuple[int, int]) -> np.ndarray:
    """The conv2d weight [sh*sw*OC, IC, Mh, Mw] (OIHW) of the phases of an IOHW transposed-conv weight:
    phase (rh, rw)'s tap (jh, jw) is the transposed kernel's tap ((M-1-j)*s + r), or zero past its end."""
    in_channels, out_channels, kh, kw = weight.shape
    sh, sw = strides
    mh, mw = -(-kh // sh), -(-kw // sw)
    # Zero-pad the kernel to M*s taps, then split each spatial axis into (tap m, phase r): t = m*s + r.
    padded = np.zeros((in_channels, out_channels, mh * sh, mw * sw), weight.dtype)
    padded[:, :, :kh, :kw] = weight
    taps = padded.reshape(in_channels, out_channels, mh, sh, mw, sw)
    # -> (rh, rw, oc, ic, mh, mw), then flip the taps: a correlation reads x[q - m] at tap M-1-m.
    phases = taps.transpose(3, 5, 1, 0, 2, 4)[:, :, :, :, ::-1, ::-1]
    return np.ascontiguousarray(phases.reshape(sh * sw * out_channels, in_channels, mh, mw))


def _as_conv(matches: dict) -> relax.Expr | None:
    call = matches[_CONV_TRANSPOSE]
    attrs = call.attrs
    if (int(attrs.groups) != 1 or [int(d) for d in attrs.dilation] != [1, 1] or attrs.data_layout != "NCHW"
            or attrs.kernel_layout != "IOHW" or (attrs.out_layout or "NCHW") != "NCHW"):
        return None
    data, weight = matches[_DATA], matches[_WEIGHT].value.numpy()
    in_shape, out_shape = static_shape(data), static_shape(call)
    if in_shape is None or out_shape is None or weight.ndim != 4:
        return None
    (sh, sw), (pad_top, pad_left) = [int(s) for s in attrs.strides], [int(p) for p in attrs.padding[:2]]
    batch, _, height, width = in_shape
    out_channels, out_height, out_width = out_shape[1:]
    kh, kw = weight.shape[2:]
    mh, mw = -(-kh // sh), -(-kw // sw)
    qh, qw = height + mh - 1, width + mw - 1  # each phase's rows and columns
    if pad_top + out_height > qh * sh or pad_left + out_width > qw * sw:
        return None  # an output padding past what the phases cover (ONNX allows it only below the stride)
    dtype = str(call.ty.dtype)
    phases = relax.op.nn.conv2d(data, relax.const(phase_weight(weight, (sh, sw)).astype(weight.dtype)),
                                padding=(mh - 1, mw - 1, mh - 1, mw - 1), out_dtype=dtype)
    split = relax.op.reshape(phases, (batch, sh, sw, out_channels, qh, qw))
    interleaved = relax.op.permute_dims(split, (0, 3, 4, 1, 5, 2))  # (n, oc, qh, rh, qw, rw)
    full = relax.op.reshape(interleaved, (batch, out_channels, qh * sh, qw * sw))
    if (pad_top, pad_left, out_height, out_width) == (0, 0, qh * sh, qw * sw):
        return full
    return relax.op.strided_slice(full, axes=[2, 3], begin=[pad_top, pad_left],
                                  end=[pad_top + out_height, pad_left + out_width])


def _forms() -> list[Form]:
    return [Form("conv2d_transpose", _CONV_TRANSPOSE, _as_conv)]


ConvTransposeAsConv = forms_pass("quantvm.ConvTransposeAsConv", _forms)
