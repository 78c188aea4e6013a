"""Calibration data: whatever the user's loader yields, turned into checked batches of the model's shape.

A loader is any iterable of batches: dicts {input name: array}, a single array (single-input models), or
tuples/lists in input order; torch tensors work through np.asarray. Samples are on axis 0 and are re-chunked
to the compiled batch size, streaming: nothing but the current batch is held.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Iterator

import numpy as np

from calib import CalibrationError
from compiler.frontend import TensorSpec


def _as_array(value, where: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor that requires grad
        value = value.detach().cpu()
    try:
        return np.asarray(value)
    except Exception as err:  # noqa: BLE001 (anything np.asarray cannot take)
        raise CalibrationError(f"{where}: cannot be read as an array ({err})") from err


def _named(batch, specs: list[TensorSpec], index: int, label: str = "calibration") -> dict[str, np.ndarray]:
    names = [s.name for s in specs]
    if isinstance(batch, dict):
        unknown = sorted(set(batch) - set(names))
        missing = [n for n in names if n not in batch]
        if unknown or missing:
            raise CalibrationError(f"{label} batch {index}: inputs {sorted(batch)} do not match the model's "
                                   f"{names}" + (f" (missing {missing})" if missing else ""))
        return {n: _as_array(batch[n], f"{label} batch {index}, input {n!r}") for n in names}
    if isinstance(batch, (tuple, list)):
        if len(batch) < len(names):
            raise CalibrationError(f"{label} batch {index}: {len(batch)} arrays given, the model has "
                                   f"{len(names)} inputs ({', '.join(names)})")
        if len(batch) > len(names) and index == 0:  # a DataLoader's (images, labels): labels are not inputs
            warnings.warn(f"{label} batches hold {len(batch)} arrays for {len(names)} model input(s): "
                          "the trailing ones (labels?) are not used", stacklevel=4)
        batch = batch[:len(names)]
        return {n: _as_array(v, f"{label} batch {index}, input {n!r}") for n, v in zip(names, batch)}
    if len(names) != 1:
        raise CalibrationError(f"{label} batch {index}: a single array was given but the model has "
                               f"{len(names)} inputs ({', '.join(names)}); give dicts or tuples")
    return {names[0]: _as_array(batch, f"{label} batch {index}, input {names[0]!r}")}


def _check(arrays: dict, specs: list[TensorSpec], index: int, label: str = "calibration") -> None:
    for spec in specs:
        array = arrays[spec.name]
        where = f"{label} batch {index}, input {spec.name!r}"
        if array.ndim != len(spec.shape) or tuple(array.shape[1:]) != tuple(spec.shape[1:]):
            raise CalibrationError(f"{where}: shape {list(array.shape)} does not fit the model's "
                                   f"{list(spec.shape)} (samples go on axis 0)")
        if array.dtype != np.dtype(spec.dtype):
            if not (np.issubdtype(array.dtype, np.floating) and np.issubdtype(np.dtype(spec.dtype), np.floating)):
                raise CalibrationError(f"{where}: dtype {array.dtype} given, {spec.dtype} expected")
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise CalibrationError(f"{where} holds NaN or Inf")


def model_batches(loader, specs: list[TensorSpec], num_batches: int | None = None,
                  label: str = "calibration") -> Iterator[dict]:
    """Batches of exactly the compiled batch size, checked, at most `num_batches` of them; `label` names the
    data in errors ("calibration", "eval_data")."""
    if isinstance(loader, (np.ndarray, dict)) or not isinstance(loader, Iterable):
        loader = [loader]
    batch_size = specs[0].shape[0] if specs and specs[0].shape else 1
    pending: dict[str, list] = {s.name: [] for s in specs}
    held, given, produced = 0, 0, 0
    for index, batch in enumerate(loader):
        given += 1
        arrays = _named(batch, specs, index, label)
        _check(arrays, specs, index, label)
        sizes = {len(a) for a in arrays.values()}
        if len(sizes) != 1:
            raise CalibrationError(f"{label} batch {index}: inputs have different sample counts {sorted(sizes)}")
        for spec in specs:
            pending[spec.name].append(arrays[spec.name].astype(spec.dtype, copy=False))
        held += sizes.pop()
        while held >= batch_size:
            joined = {n: np.concatenate(parts) if len(parts) > 1 else parts[0] for n, parts in pending.items()}
            yield {n: np.ascontiguousarray(a[:batch_size]) for n, a in joined.items()}
            pending = {n: [a[batch_size:]] for n, a in joined.items()}
            held -= batch_size
            produced += 1
            if num_batches is not None and produced >= num_batches:
                return
    if given == 0:
        raise CalibrationError(f"the {label} loader yielded no batches")
    if produced == 0:
        raise CalibrationError(f"the {label} data has {held} sample(s), fewer than one batch of the compiled "
                               f"batch size {batch_size}")
    if held:
        warnings.warn(f"{label}: the last {held} sample(s) do not fill a batch of {batch_size} and were not used",
                      stacklevel=3)


class Progress:
    """A one-line progress counter on a terminal; silent otherwise."""

    def __init__(self, label: str, total: int | None):
        self.label, self.total, self.done = label, total, 0
        self.enabled = sys.stderr.isatty()

    def step(self) -> None:
        self.done += 1
        if self.enabled:
            of = f"/{self.total}" if self.total else ""
            print(f"\r{self.label}: batch {self.done}{of}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.done:
            print(file=sys.stderr)


class Replay:
    """Calibration data that can be read more than once (bias correction and the fallback read it again).

    A re-iterable loader (a list, a DataLoader) is read anew each time; a one-shot iterator (a generator) is
    kept in memory as it is first read, since it cannot be read again."""

    def __init__(self, loader, specs: list[TensorSpec], num_batches: int | None, label: str = "calibration"):
        self.specs, self.num_batches, self.label = specs, num_batches, label
        self.one_shot = isinstance(loader, Iterator)
        self.loader = loader
        self.kept: list[dict] | None = None

    def __iter__(self) -> Iterator[dict]:
        if self.kept is not None:
            yield from self.kept
            return
        kept = [] if self.one_shot else None
        for batch in model_batches(self.loader, self.specs, self.num_batches, self.label):
            if kept is not None:
                kept.append(batch)
            yield batch
        self.kept = kept
