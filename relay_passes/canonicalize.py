"""Canonicalise the decomposed forms exporters write into one op (or one canonical form) each, before
constant folding into producers and before fusion, so that fusion and kernels see one activation:

    GELU (erf and tanh math)              relay_passes/canonicalize_gelu.py
    HardSwish, HardSigmoid, SiLU, Mish    relay_passes/canonicalize_activations.py
    LayerNorm (ReduceMean/Sub/Pow/...)    relay_passes/canonicalize_layer_norm.py
    ConvTranspose -> conv2d + interleave  relay_passes/canonicalize_conv_transpose.py (runs on conv kernels)
    Conv1d networks -> 2-D of height 1    relay_passes/canonicalize_conv1d.py (likewise)
    Conv taps that read only padding      relay_passes/canonicalize_conv_taps.py (dropped; after the two
                                          above: it sees the convs they wrote)
    Strided 1-D conv on 1-3 channels      relay_passes/canonicalize_conv_stride.py (the stride folded into
                                          channels: space-to-depth; after the taps are trimmed)
    Channels-last islands (permute,       relay_passes/canonicalize_channels_last.py (before the FC
    LayerNorm/Linear, permute back)       rewrite below, which would reshape their Linear layers)
    FC on [S, 1, K] -> FC on [S, K]       relay_passes/canonicalize_fc_rows.py

Each is a list of `rewrite_forms.Form`s: a dpl pattern and a builder that checks every constant.
"""

from __future__ import annotations

import tvm

from relay_passes.canonicalize_activations import CanonicalizeActivations
from relay_passes.canonicalize_channels_last import ChannelsLastIslandsAsChannelsFirst
from relay_passes.canonicalize_conv1d import Conv1dAsConv2d
from relay_passes.canonicalize_conv_stride import ConvStrideAsChannels
from relay_passes.canonicalize_conv_taps import ConvWithoutDeadTaps
from relay_passes.canonicalize_conv_transpose import ConvTransposeAsConv
from relay_passes.canonicalize_fc_rows import FcRowsAsOneMatrix
from relay_passes.canonicalize_gelu import CanonicalizeGelu
from relay_passes.canonicalize_layer_norm import CanonicalizeLayerNorm

__all__ = ["Canonicalize", "CanonicalizeActivations", "CanonicalizeGelu", "CanonicalizeLayerNorm",
           "ChannelsLastIslandsAsChannelsFirst", "Conv1dAsConv2d", "ConvStrideAsChannels", "ConvTransposeAsConv",
           "ConvWithoutDeadTaps", "FcRowsAsOneMatrix"]

# Every rewrite of decomposed forms into single ops, in the order prepare_graph runs them.
Canonicalize = tvm.transform.Sequential([CanonicalizeGelu, CanonicalizeActivations, CanonicalizeLayerNorm,
                                         ConvTransposeAsConv, Conv1dAsConv2d, ConvWithoutDeadTaps,
                                         ConvStrideAsChannels, ChannelsLastIslandsAsChannelsFirst,
                                         FcRowsAsOneMatrix],
                                        name="quantvm.Canonicalize")
