"""The compile report: what compile() did to a model, typed, built in one place, JSON both ways.

`CompiledModel.report` is a `CompileReport`; `quantvm compile --report` writes its `to_json()`, the JSON
format earlier versions wrote (same keys), and `from_json()` reads it back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class ScheduleSummary:
    """Per kernel, the rule that scheduled it; the kernels no rule could schedule, with why; the kernels a
    tuning database scheduled."""

    applied: dict = field(default_factory=dict)  # kernel -> rule
    unscheduled: dict = field(default_factory=dict)  # kernel -> reason
    tuned: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {"applied": dict(self.applied), "unscheduled": dict(self.unscheduled), "tuned": list(self.tuned)}

    @classmethod
    def from_json(cls, data: dict) -> ScheduleSummary:
        return cls(dict(data.get("applied", {})), dict(data.get("unscheduled", {})), list(data.get("tuned", [])))


@dataclass
class QuantizationReport:
    """The int8 rewrite: the options, each quantized layer's row (worst first), the ops left fp32 and why,
    and, where they ran, the output error on a calibration batch, bias correction and the accuracy fallback."""

    calib_mode: str
    options: dict
    layers: list  # per layer: {name, dtype, threshold, sqnr_db, ...}
    int8_ops: dict  # op kind -> count
    fp32_ops: dict
    fp32_layers: dict  # layer -> why it stays fp32
    output_error: dict | None = None  # {sqnr_db, cosine} of the int8 output against fp32's
    bias_correction: dict | None = None
    fallback: dict | None = None  # the accuracy fallback's steps (max_drop)

    _OPTIONAL = ("output_error", "bias_correction", "fallback")

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        return {k: v for k, v in data.items() if not (k in self._OPTIONAL and v is None)}

    @classmethod
    def from_json(cls, data: dict) -> QuantizationReport:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class CompileReport:
    """What one compile did: fusion, layouts, kernels and their schedules, and the int8 rewrite if any."""

    rules: tuple  # the fusion rules asked for
    fusion: dict = field(default_factory=dict)  # rule -> matches
    unfused_ops: dict = field(default_factory=dict)  # op type -> count outside any fused group
    rejected: list = field(default_factory=list)  # {rule, at, reason}: matches a rule's check refused
    elementwise: dict = field(default_factory=dict)  # the elementwise chains fused after the rules
    kernels: int = 0  # compute kernels the VM calls
    layout_transforms: int = 0  # blocked-layout conversions among them
    schedules: ScheduleSummary = field(default_factory=ScheduleSummary)
    layout: dict | None = None  # the channel block and the ops left NCHW, with why
    quantization: QuantizationReport | None = None  # None: fp32
    calibration_seconds: float | None = None
    tuning: dict | None = None  # the tuning database's kernels, where one was given

    @property
    def precision(self) -> str:
        return "int8" if self.quantization else "fp32"

    @classmethod
    def from_build(cls, build, quantization: QuantizationReport | None = None,
                   calibration_seconds: float | None = None) -> CompileReport:
        """The report of `build` (a relay_passes.GraphBuild through its phases)."""
        fusion = build.fusion
        schedules = build.schedules
        return cls(
            rules=tuple(build.rules),
            fusion=dict(fusion.fusion) if fusion else {},
            unfused_ops=dict(fusion.unfused_ops) if fusion else {},
            rejected=list(fusion.rejected) if fusion else [],
            elementwise=fusion.elementwise.to_json() if fusion else {},
            kernels=build.kernels.get("kernels", 0),
            layout_transforms=build.kernels.get("layout_transforms", 0),
            schedules=ScheduleSummary(dict(schedules.applied), dict(schedules.failed), list(schedules.tuned)),
            layout=build.layout.to_json() if build.layout is not None else None,
            quantization=quantization,
            calibration_seconds=calibration_seconds,
        )

    def to_json(self) -> dict:
        data = {"rules": list(self.rules), "fusion": dict(self.fusion), "unfused_ops": dict(self.unfused_ops),
                "rejected": list(self.rejected), "elementwise": dict(self.elementwise), "kernels": self.kernels,
                "layout_transforms": self.layout_transforms, "schedules": self.schedules.to_json()}
        optional = {"layout": self.layout, "calibration_seconds": self.calibration_seconds, "tuning": self.tuning,
                    "quantization": self.quantization.to_json() if self.quantization else None}
        return {**data, **{k: v for k, v in optional.items() if v is not None}}

    @classmethod
    def from_json(cls, data: dict) -> CompileReport:
        quantization = data.get("quantization")
        return cls(
            rules=tuple(data.get("rules", ())),
            fusion=dict(data.get("fusion", {})),
            unfused_ops=dict(data.get("unfused_ops", {})),
            rejected=list(data.get("rejected", [])),
            elementwise=dict(data.get("elementwise", {})),
            kernels=data.get("kernels", 0),
            layout_transforms=data.get("layout_transforms", 0),
            schedules=ScheduleSummary.from_json(data.get("schedules", {})),
            layout=data.get("layout"),
            quantization=QuantizationReport.from_json(quantization) if quantization else None,
            calibration_seconds=data.get("calibration_seconds"),
            tuning=data.get("tuning"),
        )
