"""Calibration data: whatever the user's loader yields, turned into checked batches of the compiled shapes.

A loader is any iterable of batches: dicts {input name: array}, a single array (single-input models), or
tuples/lists in input order; torch tensors work through np.asarray. It is read as a stream: nothing but the
current batch and a partial chunk of samples is held. The same rules apply to `eval_data` (errors then say
"eval_data batch N").

How a batch meets the compiled input shapes:

1. A batch whose every input has exactly its compiled shape is used as it is, whatever axis 0 means there
   (a recurrent state [2, 1, 128], a sequence-first [T, 1, C] tensor, a mask).
2. Otherwise the inputs whose shape differs from the compiled one carry samples on axis 0 and are cut into
   chunks of the compiled size of that axis (the batch size). Each may differ from its compiled shape on
   axis 0 only; all must have the same compiled axis 0 and the same number of samples.
3. The other inputs, given at exactly their compiled shape, are held as they are for every chunk of that
   batch: that is how a state or a mask whose axis 0 is not a batch goes with a batch of many samples.
   Such an input whose compiled axis 0 equals the batch size is refused as ambiguous (it may be one batch
   of samples given too few): give it with as many samples as the others, or give every input at its
   compiled shape.

Samples left over after the last whole chunk join the next batch only when no input is held (every input
carries samples, as in an image loader); a batch with held inputs is cut on its own and its leftover samples
are dropped, since the next batch may hold other values there. Unused samples are reported in a warning.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np

from calib import CalibrationError
from compiler.metadata import TensorSpec
from compiler.runtime import indices_out_of_range


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


def _check_values(arrays: dict, specs: list[TensorSpec], index: int, label: str) -> None:
    for spec in specs:
        array = arrays[spec.name]
        where = f"{label} batch {index}, input {spec.name!r}"
        if array.dtype != np.dtype(spec.dtype):
            if not (np.issubdtype(array.dtype, np.floating) and np.issubdtype(np.dtype(spec.dtype), np.floating)):
                raise CalibrationError(f"{where}: dtype {array.dtype} given, {spec.dtype} expected")
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise CalibrationError(f"{where} holds NaN or Inf")
        problem = indices_out_of_range(spec.name, spec.index_bound, array)
        if problem:
            raise CalibrationError(f"{label} batch {index}, {problem}")


@dataclass(frozen=True)
class Chunking:
    """How a batch that is not at the compiled shapes is cut (see the module): `carriers` hold `samples`
    samples on axis 0, cut into chunks of `batch_size`; `held` inputs go whole with every chunk."""

    carriers: tuple[str, ...]
    held: tuple[str, ...]
    batch_size: int
    samples: int


def _names(specs: Iterable[TensorSpec]) -> str:
    return ", ".join(repr(s.name) for s in specs)


def _misfit(spec: TensorSpec, given: tuple, where: str) -> CalibrationError:
    """An input whose shape differs from the compiled one beyond axis 0, so it can be neither used nor cut."""
    fix = f"give it at the compiled shape {list(spec.shape)}"
    if spec.shape:
        fix += f" (or, if its axis 0 holds samples, as [N{''.join(f', {d}' for d in spec.shape[1:])}])"
    return CalibrationError(f"{where}: shape {list(given)} does not fit the compiled shape {list(spec.shape)}; {fix}")


def _chunking(arrays: dict, specs: list[TensorSpec], index: int, label: str) -> Chunking | None:
    """None when every input is at its compiled shape; otherwise the carriers and held inputs, checked."""
    carriers = [s for s in specs if tuple(arrays[s.name].shape) != tuple(s.shape)]
    if not carriers:
        return None
    for spec in carriers:
        given = arrays[spec.name].shape
        if len(given) != len(spec.shape) or not spec.shape or tuple(given[1:]) != tuple(spec.shape[1:]):
            raise _misfit(spec, given, f"{label} batch {index}, input {spec.name!r}")
    by_size: dict[int, list[TensorSpec]] = {}
    for spec in carriers:
        by_size.setdefault(spec.shape[0], []).append(spec)
    batch_size = max(by_size, key=lambda size: len(by_size[size]))  # ties: the first carrier's
    if len(by_size) > 1:
        others = [s for s in carriers if s.shape[0] != batch_size]
        raise CalibrationError(
            f"{label} batch {index}: inputs {_names(carriers)} differ from their compiled shapes on axis 0, but "
            f"their compiled axis 0 sizes differ ({', '.join(f'{s.name!r}: {s.shape[0]}' for s in carriers)}), "
            "so they cannot all carry samples; "
            + "; ".join(f"give input {s.name!r} at its compiled shape {list(s.shape)} in every batch" for s in others)
            + " (an axis 0 that is not a batch is never re-chunked), or give every input at its compiled shape")
    counts = {s.name: len(arrays[s.name]) for s in carriers}
    if len(set(counts.values())) > 1:
        raise CalibrationError(
            f"{label} batch {index}: inputs carrying samples on axis 0 have different sample counts "
            f"({', '.join(f'{n!r}: {c}' for n, c in counts.items())}); give them the same number of samples")
    samples = next(iter(counts.values()))
    held = [s for s in specs if s not in carriers]
    for spec in held:
        if spec.shape and spec.shape[0] == batch_size:
            carry = "carries" if len(carriers) == 1 else "carry"
            raise CalibrationError(
                f"{label} batch {index}: input {spec.name!r} is given at its compiled shape {list(spec.shape)} "
                f"while {_names(carriers)} {carry} {samples} samples on axis 0, and its axis 0 is also the batch "
                f"size {batch_size}, so whether it holds samples is ambiguous: give input {spec.name!r} with "
                f"{samples} samples on axis 0 too, or give every input at its compiled shape in every batch")
    return Chunking(tuple(s.name for s in carriers), tuple(s.name for s in held), batch_size, samples)


def _cut(arrays: dict, chunking: Chunking) -> tuple[list[dict], dict]:
    """Whole chunks of the batch, and the carriers' samples left over after them."""
    size, whole = chunking.batch_size, chunking.samples - chunking.samples % chunking.batch_size
    chunks = [{n: a[start:start + size] if n in chunking.carriers else a for n, a in arrays.items()}
              for start in range(0, whole, size)]
    return chunks, {n: arrays[n][whole:] for n in chunking.carriers}


def model_batches(loader, specs: list[TensorSpec], num_batches: int | None = None,
                  label: str = "calibration") -> Iterator[dict]:
    """Batches at exactly the compiled shapes, checked and cut as the module says, at most `num_batches` of
    them; `label` names the data in errors ("calibration", "eval_data")."""
    if isinstance(loader, (np.ndarray, dict)) or not isinstance(loader, Iterable):
        loader = [loader]
    leftover: dict[str, np.ndarray] = {}  # samples of batches where every input carries samples
    given = produced = dropped = 0
    batch_size = None
    for index, batch in enumerate(loader):
        given += 1
        arrays = _named(batch, specs, index, label)
        _check_values(arrays, specs, index, label)
        arrays = {s.name: arrays[s.name].astype(s.dtype, copy=False) for s in specs}
        chunking = _chunking(arrays, specs, index, label)
        if chunking is None:
            chunks = [arrays]
        else:
            batch_size = chunking.batch_size
            if not chunking.held and leftover:
                arrays = {n: np.concatenate([leftover[n], a]) for n, a in arrays.items()}
                chunking = replace(chunking, samples=len(arrays[specs[0].name]))
            chunks, rest = _cut(arrays, chunking)
            if chunking.held:
                dropped += chunking.samples % batch_size
            else:
                leftover = rest
        for chunk in chunks:
            yield {n: np.ascontiguousarray(a) for n, a in chunk.items()}
            produced += 1
            if num_batches is not None and produced >= num_batches:
                return
    unused = dropped + (len(next(iter(leftover.values()))) if leftover else 0)
    if given == 0:
        raise CalibrationError(f"the {label} loader yielded no batches")
    if produced == 0:
        raise CalibrationError(f"the {label} data has {unused} sample(s), fewer than one batch of the compiled "
                               f"batch size {batch_size}")
    if unused:
        warnings.warn(f"{label}: {unused} sample(s) do not fill a batch of {batch_size} and were not used",
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
