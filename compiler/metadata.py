"""What an artifact says about itself: typed, JSON both ways, and importable without onnx or the compiler.

`ArtifactMetadata` is the JSON embedded in every exported `.so` (compiler/artifact.py writes and reads the
bytes); `load()` and the C API read it before any model code is loaded. Its JSON form is the artifact
format: `to_json()` writes exactly the keys earlier versions wrote, and `from_json()` reads what they wrote.
Keys this version does not know are kept in `extra` and written back, so nothing is lost on a round trip.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

FORMAT = "quantvm-artifact"
FORMAT_VERSION = 2  # 2: the metadata records DIGEST_KEY
DIGEST_KEY = "artifact_sha256"


@dataclass(frozen=True)
class IndexBound:
    """An integer input that a Gather reads as indices: its values must lie in [-extent, extent). The kernel
    does not check (an index out of range reads outside the table), so run() does, naming `node`."""

    extent: int
    node: str

    def to_json(self) -> dict:
        return {"extent": self.extent, "node": self.node}

    @classmethod
    def from_json(cls, data: dict) -> IndexBound:
        return cls(int(data["extent"]), str(data["node"]))


@dataclass(frozen=True)
class TensorSpec:
    """A named model input or output with a static shape (None where the size is not known)."""

    name: str
    shape: tuple
    dtype: str
    index_bound: IndexBound | None = None  # an input read as Gather indices (compiler.index_bounds)

    def to_json(self) -> dict:
        data = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.index_bound is not None:
            data["index_bound"] = self.index_bound.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict) -> TensorSpec:
        bound = data.get("index_bound")
        return cls(data["name"], tuple(data["shape"]), data["dtype"],
                   IndexBound.from_json(bound) if bound is not None else None)


@dataclass(frozen=True)
class TargetInfo:
    """The target an artifact was built for, and the CPU features (/proc/cpuinfo flags) its code needs."""

    name: str
    mcpu: str
    tvm: dict  # the TVM target as a dict (kind, mtriple, mcpu, mattr, num-cores)
    required_features: tuple[str, ...]
    num_threads: int | None  # the thread count its code was built for; None: all cores

    def to_json(self) -> dict:
        return {"name": self.name, "mcpu": self.mcpu, "tvm": dict(self.tvm),
                "required_features": list(self.required_features), "num_threads": self.num_threads}

    @classmethod
    def from_json(cls, data: dict) -> TargetInfo:
        return cls(data["name"], data["mcpu"], dict(data.get("tvm", {})), tuple(data["required_features"]),
                   data.get("num_threads"))


@dataclass(frozen=True)
class ModelInfo:
    """The ONNX model an artifact was compiled from."""

    source: str
    graph_name: str
    sha256: str
    opset: int | None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ModelInfo:
        return cls(data["source"], data.get("graph_name", ""), data["sha256"], data.get("opset"))


@dataclass(frozen=True)
class QuantizationSummary:
    """fp32, or int8 with its calibration mode and the ops of each kind left int8 / fp32."""

    mode: str  # "fp32" | "int8"
    calib_mode: str | None = None
    int8_ops: dict = field(default_factory=dict)  # op kind -> count
    fp32_ops: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        if self.mode == "fp32":
            return {"mode": "fp32"}
        return {"mode": self.mode, "calib_mode": self.calib_mode, "int8_ops": dict(self.int8_ops),
                "fp32_ops": dict(self.fp32_ops)}

    @classmethod
    def from_json(cls, data: dict) -> QuantizationSummary:
        return cls(data["mode"], data.get("calib_mode"), dict(data.get("int8_ops", {})),
                   dict(data.get("fp32_ops", {})))


@dataclass(frozen=True)
class FusionSummary:
    """The fusion rules a build applied, and how often each matched."""

    rules: tuple[str, ...]
    matches: dict  # rule -> count

    def to_json(self) -> dict:
        return {"rules": list(self.rules), "matches": dict(self.matches)}

    @classmethod
    def from_json(cls, data: dict) -> FusionSummary:
        return cls(tuple(data.get("rules", ())), dict(data.get("matches", {})))


@dataclass(frozen=True)
class ArtifactMetadata:
    """Everything an artifact records about itself (its `.quantvm_meta` section)."""

    quantvm_version: str
    tvm_version: str
    target: TargetInfo
    model: ModelInfo
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    quantization: QuantizationSummary
    fusion: FusionSummary
    kernels: dict | None = None  # kernel -> the ONNX nodes it came from (compiler.kernel_origins); None: unknown
    format_version: int = FORMAT_VERSION
    artifact_sha256: str | None = None  # set by export; None before
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept as they were

    @property
    def precision(self) -> str:
        return self.quantization.mode

    def with_digest(self, digest: str) -> ArtifactMetadata:
        return dataclasses.replace(self, artifact_sha256=digest)

    def to_json(self) -> dict:
        data = {
            **self.extra,
            "format": FORMAT,
            "format_version": self.format_version,
            "quantvm_version": self.quantvm_version,
            "tvm_version": self.tvm_version,
            "target": self.target.to_json(),
            "model": self.model.to_json(),
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "quantization": self.quantization.to_json(),
            "fusion": self.fusion.to_json(),
        }
        if self.kernels:
            data["kernels"] = self.kernels
        if self.artifact_sha256 is not None:
            data[DIGEST_KEY] = self.artifact_sha256
        return data

    @classmethod
    def from_json(cls, data: dict) -> ArtifactMetadata:
        """Read metadata as any quantvm wrote it (KeyError/TypeError/ValueError on a malformed one)."""
        known = {"format", "format_version", "quantvm_version", "tvm_version", "target", "model", "inputs",
                 "outputs", "quantization", "fusion", "kernels", DIGEST_KEY}
        return cls(
            quantvm_version=data.get("quantvm_version", "unknown"),
            tvm_version=data.get("tvm_version", "unknown"),
            target=TargetInfo.from_json(data["target"]),
            model=ModelInfo.from_json(data["model"]),
            inputs=tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
            quantization=QuantizationSummary.from_json(data.get("quantization", {"mode": "fp32"})),
            fusion=FusionSummary.from_json(data.get("fusion", {})),
            kernels=data.get("kernels"),
            format_version=data.get("format_version", 0),
            artifact_sha256=data.get(DIGEST_KEY),
            extra={k: v for k, v in data.items() if k not in known},
        )
