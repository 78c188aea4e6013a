"""The INT8 options: one public, validated object that compile(), tune(), bench and the CLI all take.

Each field's metadata says how the command line spells it, so the CLI's INT8 flags are made from this
table (`add_cli_arguments` / `from_cli`) and the Python keywords are the field names (`from_keywords`):
an option is added here once and reaches every entry point.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable

from calib import BUILT_IN_MODES, CalibrationCollector, make_collector
from quantvm.errors import CalibrationError, QuantvmError
from targets.intrinsics import needs_bounded_pairs

# The default threshold search: measured on real pretrained models (README, "INT8 accuracy"), "mse" with
# the graph's own bounds and fast bias correction was the closest to fp32 and never worse than "naive".
DEFAULT_CALIB_MODE = "mse"
CALIB_MODES = (*BUILT_IN_MODES, "custom", "none")
BIAS_CORRECTIONS = ("fast", "full", None)
# ONNX op type -> the int8 op kinds it becomes (MatMul: with a constant weight, or of two activations)
OP_TYPES = {"Conv": ("conv2d",), "Gemm": ("dense",), "MatMul": ("dense", "matmul"), "AveragePool": ("avg_pool",),
            "GlobalAveragePool": ("avg_pool",)}


def _cli(flag: str, help: str, **argparse_options) -> dict:  # noqa: A002 (argparse's name)
    return {"cli": flag, "help": help, "argparse": argparse_options}


def _names(text: str) -> tuple:
    return tuple(part for part in text.split(",") if part)


def _switch(text: str):
    return {"auto": None, "on": True, "off": False}.get(text.lower(), text)


def _optional_text(text: str):
    return None if text.lower() in ("none", "off", "no") else text


@dataclasses.dataclass(frozen=True)
class QuantizationOptions:
    """How compile() turns a model into INT8. Validated when built: a bad value raises a QuantvmError
    naming the option."""

    calib_mode: str = dataclasses.field(default=DEFAULT_CALIB_MODE, metadata=_cli(
        "--calib-mode", "threshold search: mse (default: the quantization error's minimum on each tensor's "
        "histogram), naive (min/max), entropy (MXNet's KL), percentile, or none (ranges at run time)",
        choices=[m for m in CALIB_MODES if m != "custom"]))
    num_calib_batches: int | None = dataclasses.field(default=None, metadata=_cli(
        "--calib-batches", "use at most N batches of calibration data", type=int, metavar="N"))
    percentile: float = dataclasses.field(default=99.99, metadata=_cli(
        "--percentile", "for --calib-mode percentile (default 99.99)", type=float))
    quantized_dtype: str = dataclasses.field(default="auto", metadata=_cli(
        "--quantized-dtype", "int8 storage of activations (auto: u8 where non-negative)",
        choices=["auto", "int8", "uint8"]))
    exclude_layers: tuple = dataclasses.field(default=(), metadata=_cli(
        "--exclude-layers", "ONNX node names to keep in fp32", type=_names, metavar="NAME,..."))
    exclude_layers_match: tuple = dataclasses.field(default=(), metadata=_cli(
        "--exclude-layers-match", "keep in fp32 the layers whose name contains one", type=_names,
        metavar="TEXT,..."))
    exclude_operators: tuple = dataclasses.field(default=(), metadata=_cli(
        "--exclude-operators", "op types to keep in fp32 (Conv, Gemm, MatMul, AveragePool, GlobalAveragePool)",
        type=_names, metavar="OP,..."))
    bias_correction: str | None = dataclasses.field(default="fast", metadata=_cli(
        "--bias-correction", "fold the mean int8 error of each layer's output into its s32 bias: fast "
        "(default; each layer on fp32 inputs), full (each layer with the layers before it in int8), none",
        type=_optional_text, choices=["fast", "full", None], metavar="{fast,full,none}"))
    attention_int8: bool = dataclasses.field(default=False, metadata=_cli(
        "--attention-int8", "run matmuls of two activations (attention's Q.K^T and softmax.V) in int8 too; "
        "measured on MiniLM: no speed gained yet, 0.0003 of cosine lost", action="store_true"))
    max_drop: float | None = dataclasses.field(default=None, metadata=_cli(
        "--max-drop", "revert the most sensitive layers to fp32 until the metric drops at most this much "
        "(0.01: 1 point of top-1 agreement, or 0.01 of cosine)", type=float, metavar="D"))
    smooth_quant: bool | None = dataclasses.field(default=None, metadata=_cli(
        "--smooth-quant", "SmoothQuant dense layers (activation outliers moved into the weights, alpha searched "
        "per layer): auto (default: for inputs with a token axis, rank >= 3, as in transformers), on, off",
        type=_switch, choices=[None, True, False], metavar="{auto,on,off}"))
    per_token: bool = dataclasses.field(default=False, metadata=_cli(
        "--per-token", "dense inputs take one scale per token (row), computed at run time: most accurate on "
        "transformers, slower until its kernels are fused", action="store_true"))
    bounded_pairs: bool | None = dataclasses.field(default=None, metadata=_cli(
        "--bounded-pairs", "bound each pair of neighbouring input channels' s8 weights, |w0|+|w1| <= 128, so "
        "that a CPU without VNNI runs int8 convs and FCs on vpmaddubsw, exactly (1.4-1.7x faster there; the "
        "weights lose about 2.5 dB of SQNR): auto (default: on for a target without VNNI), on, off (full s8 "
        "weights, on the exact vpmaddwd kernels there)", type=_switch, choices=[None, True, False],
        metavar="{auto,on,off}"))
    metric: Callable | None = None  # (CompiledModel) -> float, higher is better; Python only
    collector: CalibrationCollector | None = None  # the collector of calib_mode "custom"; Python only

    def bounds_pairs(self, spec) -> bool:
        """Whether the weights are quantized with bounded pairs for `spec` (relay_passes.weight_pairs)."""
        return needs_bounded_pairs(spec) if self.bounded_pairs is None else bool(self.bounded_pairs)

    def __post_init__(self):
        for name in ("exclude_layers", "exclude_layers_match", "exclude_operators"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in (value or ())):
                raise QuantvmError(f"{name} must be a list of names, got {value!r}")
            object.__setattr__(self, name, tuple(value or ()))
        _check_choice("calib_mode", self.calib_mode, CALIB_MODES, CalibrationError)
        _check_choice("quantized_dtype", self.quantized_dtype, ("auto", "int8", "uint8"), CalibrationError)
        _check_choice("bias_correction", self.bias_correction, BIAS_CORRECTIONS)
        unknown = [o for o in self.exclude_operators if o not in OP_TYPES]
        if unknown:
            raise CalibrationError(f"exclude_operators: unknown op type(s) {unknown}; int8 op types are "
                                   f"{', '.join(OP_TYPES)}")
        if not (isinstance(self.percentile, (int, float)) and 0 < self.percentile <= 100):
            raise CalibrationError(f"percentile must be in (0, 100], got {self.percentile!r}")
        if self.num_calib_batches is not None and (not isinstance(self.num_calib_batches, int)
                                                   or self.num_calib_batches < 1):
            raise CalibrationError(f"num_calib_batches must be a whole number >= 1, got {self.num_calib_batches!r}")
        if self.max_drop is not None and not (isinstance(self.max_drop, (int, float))
                                              and math.isfinite(self.max_drop) and 0 <= self.max_drop < 1):
            raise QuantvmError(f"max_drop must be a number in [0, 1), got {self.max_drop!r}")
        if self.smooth_quant not in (None, True, False):
            raise QuantvmError(f"smooth_quant must be None (auto), True or False, got {self.smooth_quant!r}")
        if self.bounded_pairs not in (None, True, False):  # ("off" would read as True)
            raise QuantvmError(f"bounded_pairs must be None (auto), True or False, got {self.bounded_pairs!r}")
        if self.per_token not in (True, False):
            raise QuantvmError(f"per_token must be True or False, got {self.per_token!r}")
        if self.metric is not None and not callable(self.metric):
            raise QuantvmError(f"metric must be a callable (CompiledModel) -> float, got {type(self.metric).__name__}")
        if self.calib_mode == "custom" and not isinstance(self.collector, CalibrationCollector):
            raise CalibrationError("calib_mode='custom' needs collector=<a CalibrationCollector instance>")

    @classmethod
    def from_keywords(cls, base: QuantizationOptions | None = None, **keywords) -> QuantizationOptions:
        """`base` (or the defaults) with `keywords` replacing its fields; an unknown keyword is an error
        that lists the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(keywords) - known)
        if unknown:
            raise QuantvmError(f"unknown int8 option(s) {', '.join(unknown)}; the options are {', '.join(sorted(known))}")
        if base is not None and not isinstance(base, cls):
            raise QuantvmError(f"quantization must be a QuantizationOptions, got {type(base).__name__}")
        return dataclasses.replace(base or cls(), **keywords)

    @property
    def excluded_kinds(self) -> set[str]:
        return {kind for o in self.exclude_operators for kind in OP_TYPES[o]}

    def collector_for(self) -> CalibrationCollector:
        """The collector of `calib_mode` (not called for 'none', which measures nothing ahead of time)."""
        options = {}
        if self.calib_mode == "percentile":
            options["percentile"] = self.percentile
        if self.calib_mode in ("entropy", "mse"):
            options["quantized_dtype"] = self.quantized_dtype
        return make_collector(self.calib_mode, self.collector, **options)

    def to_json(self) -> dict:
        """The options as the compile report records them (callables and collectors by name)."""
        data = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = (getattr(value, "__qualname__", type(value).__name__)
                            if f.name in ("metric", "collector") and value is not None else
                            list(value) if isinstance(value, tuple) else value)
        return data


def _check_choice(name: str, value, choices, error=QuantvmError) -> None:
    if value not in choices:
        raise error(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def add_cli_arguments(group) -> None:
    """The INT8 flags of `quantvm compile/tune/bench/analyze`, one per option that has a command-line form."""
    defaults = QuantizationOptions()
    for f in dataclasses.fields(QuantizationOptions):
        if "cli" not in f.metadata:
            continue
        extra = dict(f.metadata["argparse"])
        if extra.get("action") != "store_true":
            extra.setdefault("default", getattr(defaults, f.name))
        group.add_argument(f.metadata["cli"], dest=f.name, help=f.metadata["help"], **extra)


def from_cli(args: argparse.Namespace) -> QuantizationOptions:
    """The options a parsed command line gives (the flags `add_cli_arguments` made)."""
    return QuantizationOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(QuantizationOptions)
                                  if "cli" in f.metadata})
