"""An FC over a batch of row blocks as one FC over all the rows.

torch's MultiheadAttention exports its projections on sequence-first activations: x [S, 1, K] @ W [K, N],
a matmul whose batch loop runs S times over one row each. As x [S, K] @ W, the FC kernel tiles S rows
against each weight panel (ViT-B/16's QKV projection ran at 14 GMAC/s the first way). Reshaping a contiguous
tensor is free, and the bias, when there is one, stays next to the matmul for the FC fusion rules.

Rewritten: a matmul of a tensor of rank 3 or more with leading dims other than 1 by a constant 2-D weight
(static shapes), with its optional constant bias.
"""

from __future__ import annotations

import math

from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from relay_passes.analysis import static_shape
from relay_passes.rewrite_forms import Form, forms_pass

_DATA, _WEIGHT, _BIAS = wildcard(), is_const(), is_const()
_FC = is_op("relax.matmul")(_DATA, _WEIGHT)
_FC_BIAS = is_op("relax.add")(_FC, _BIAS)


def _as_rows(matches: dict) -> relax.Expr | None:
    data, weight = matches[_DATA], matches[_WEIGHT]
    shape, out_shape = static_shape(data), static_shape(matches[_FC])
    if shape is None or out_shape is None or len(shape) < 3 or math.prod(shape[:-2]) == 1 or weight.ty.ndim != 2:
        return None
    rows = relax.op.matmul(relax.op.reshape(data, (math.prod(shape[:-1]), shape[-1])), weight)
    if _BIAS in matches:
        bias = matches[_BIAS].value.numpy()
        if bias.ndim > 1 and math.prod(bias.shape[:-1]) != 1:
            return None  # a bias that varies along the rows
        rows = relax.op.add(rows, relax.const(bias.reshape(bias.shape[-1:])))
    return relax.op.reshape(rows, out_shape)


def _forms() -> list[Form]:
    return [Form("fc_bias_on_row_blocks", _FC_BIAS, _as_rows), Form("fc_on_row_blocks", _FC, _as_rows)]


FcRowsAsOneMatrix = forms_pass("quantvm.FcRowsAsOneMatrix", _forms)
