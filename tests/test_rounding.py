"""Round half to even as `llvm.rint` (targets.rounding): the numbers of numpy's round, and vector code on the
CPUs where LLVM scalarizes `llvm.nearbyint`, TVM's own lowering (AMD's Zen 4 and 5)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import compiler
from tests.fixtures import GraphBuilder, onnxruntime_outputs
from tests.test_kernels import assembly_by_kernel

# Intel and AMD AVX-512 CPUs, and AVX2: compiled and read, whatever this host is
TARGETS = ["llvm -mcpu=znver4", "llvm -mcpu=znver5", "cascadelake", "avx2"]
SCALAR_ROUNDING = re.compile(r"\b(vroundss|vrndscaless|vcvttss2si|vcvtss2si)\b")


def _depthwise_block(rng):
    """MobileNetV2's shape of block: 1x1 expansion, ReLU6, 3x3 depthwise, ReLU6, 1x1 projection."""
    g = GraphBuilder(rng)
    x = g.conv_bn("x", "expand", 16, 64, k=1, act="Relu6")
    x = g.conv_bn(x, "depthwise", 64, 64, k=3, groups=64, act="Relu6")
    x = g.conv_bn(x, "project", 64, 16, k=1, act=None)
    return g.model("depthwise_block", {"x": (1, 16, 28, 28)}, [x])


@pytest.mark.parametrize("target", TARGETS)
def test_int8_epilogues_round_in_vector_code(target, rng):
    """Every conv of an int8 MobileNet block requantizes in vector code: compiled with `llvm.nearbyint`, the
    depthwise conv's epilogue was 224 scalar rounds, converts and compares a tile on znver4 and znver5."""
    model = _depthwise_block(rng)
    calib = [rng.standard_normal((1, 16, 28, 28)).astype(np.float32) for _ in range(2)]
    built = compiler.compile(model, target=target, calib=calib, calib_mode="naive")
    kernels = {name: body for name, body in assembly_by_kernel(built.executable).items() if "conv2d" in name}
    assert len(kernels) == 3
    scalar = {name: len(SCALAR_ROUNDING.findall(body)) for name, body in kernels.items()}
    assert not any(scalar.values()), {name: count for name, count in scalar.items() if count}


def test_round_is_half_to_even_like_onnxruntime(rng):
    """ONNX Round (ties to even) through relax.round's legalization: ties both ways, negatives, large values."""
    g = GraphBuilder(rng)
    model = g.model("round", {"x": (4, 64)}, [g.op("Round", ["x"], "round")])
    ties = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 4.5], np.float32)
    x = (rng.standard_normal((4, 64)) * 100).astype(np.float32)
    x.flat[:len(ties)] = ties
    x.flat[len(ties):2 * len(ties)] = ties + 1000
    x.flat[-1] = 2.0 ** 23 + 1  # above 2^23 every float is an integer
    built = compiler.compile(model, target="native")
    got = built.run(x=x)[0]
    np.testing.assert_array_equal(got, onnxruntime_outputs(model, {"x": x})[0])
    np.testing.assert_array_equal(got, np.round(x))
