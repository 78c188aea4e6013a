"""The LegalizeOps overrides of a target: ops whose kernels quantvm computes itself, by op name."""

from __future__ import annotations

from targets.conv2d import legalize_conv2d
from targets.dense import legalize_default, legalize_matmul
from targets.quantize_kernel import legalize_quantize
from targets.resize import legalize_resize2d
from targets.rounding import legalize_round
from targets.softmax import legalize_softmax


def legalize_overrides(tile_lanes: int) -> dict:
    """{op name: legalize function} for relax.transform.LegalizeOps, for a target of `tile_lanes` lanes."""
    return {"relax.nn.conv2d": legalize_conv2d(legalize_default("relax.nn.conv2d"), tile_lanes),
            "relax.matmul": legalize_matmul(legalize_default("relax.matmul"), tile_lanes),
            "relax.nn.softmax": legalize_softmax(),
            "relax.quantize": legalize_quantize(legalize_default("relax.quantize")),
            "relax.image.resize2d": legalize_resize2d(),
            "relax.round": legalize_round(legalize_default("relax.round"))}
