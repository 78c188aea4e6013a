"""PyTorch in: a `torch.nn.Module` and example inputs become ONNX bytes, which compile() takes like any model.

torch is optional (`pip install "quantvm[torch]"`); it is imported only when a module is given. The export
fixes every dimension to the example's (no dynamic axes), so the compiled model's shapes are the example's.
Inputs are named after the parameters of the module's `forward`, so calibration batches can name them.
"""

from __future__ import annotations

import inspect
import io
import sys
import warnings

from compiler.errors import ModelError, QuantvmError

OPSET = 17  # the legacy exporter's newest well-trodden opset; every op quantvm compiles exists in it
INSTALL_HINT = 'install it with: pip install "quantvm[torch]"'


def is_torch_module(model) -> bool:
    """Whether `model` is a torch.nn.Module (never imports torch: a module can only exist if torch is loaded)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def require_torch():
    try:
        import torch
    except ImportError as err:
        raise QuantvmError(f"compiling a PyTorch module needs torch, which is not installed: {INSTALL_HINT}") from err
    return torch


def export_to_onnx(module, example_inputs, input_names=None) -> bytes:
    """`module` (in eval mode) exported to ONNX at the shapes of `example_inputs` (a tensor or a tuple)."""
    torch = require_torch()
    examples = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not examples or not all(isinstance(x, torch.Tensor) for x in examples):
        raise ModelError("example_inputs must be a torch.Tensor or a tuple of them, one per input of the "
                         f"module's forward; got {_describe(example_inputs)}")
    names = list(input_names) if input_names is not None else _forward_names(module, len(examples))
    if len(names) != len(examples):
        raise ModelError(f"input_names has {len(names)} name(s) for {len(examples)} example input(s)")
    was_training = module.training
    module.eval()
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notices, not the user's
            torch.onnx.export(module, tuple(examples), buffer, dynamo=False, opset_version=OPSET,
                              input_names=names, do_constant_folding=True)
    except Exception as err:  # torch's exporter raises many kinds; each means this module
        raise ModelError(f"cannot export the PyTorch module {type(module).__name__} to ONNX: "
                         f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}") from err
    finally:
        module.train(was_training)
    return buffer.getvalue()


def _forward_names(module, count: int) -> list[str]:
    """The names of the first `count` positional parameters of `module.forward` (input_0... where unknown)."""
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:count]]
    return names + [f"input_{i}" for i in range(len(names), count)]


def _describe(value) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {', '.join(type(v).__name__ for v in value) or 'nothing'}"
    return type(value).__name__
