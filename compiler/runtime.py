"""Running compiled models: host checks, input checks, the Relax VM, and `load()` for exported artifacts.

Nothing here needs the compiler: a `.so` from `export()` loads with the TVM runtime alone, and this module
imports neither onnx nor the compiler's passes (tests/test_light_loader.py holds it to that).
"""

from __future__ import annotations

import operator
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compiler.artifact import read_metadata
from compiler.errors import HostMismatchError, InputError, QuantvmError
from compiler.metadata import ArtifactMetadata, IndexBound, TensorSpec
from compiler.vm_io import InputStager, output_arrays
from quantvm.quiet import tvm_noise_silenced
from targets.host import host_model_name, missing_features


def check_host_can_run(metadata: ArtifactMetadata, what: str) -> None:
    """Refuse, before any of its code is loaded, an artifact that needs CPU features this host lacks."""
    target = metadata.target
    missing = missing_features(target.required_features)
    if missing:
        raise HostMismatchError(
            f"{what} was built for target {target.name!r} (mcpu {target.mcpu}) and needs CPU features "
            f"this host lacks: {', '.join(missing)} (host: {host_model_name()}). "
            "Compile for target 'native' to run here.")


def host_cores() -> int:
    """The CPUs of this host: what "all cores" means for thread counts."""
    return os.cpu_count() or 1


def check_thread_count(value, what: str) -> int:
    """`value` (an int, or the text of an environment variable) as a thread count >= 1; `what` names it."""
    try:
        count = int(value.strip()) if isinstance(value, str) else operator.index(value)
    except (TypeError, ValueError):
        count = None
    if isinstance(value, bool) or count is None or count < 1:
        raise QuantvmError(f"{what} must be a whole number of threads >= 1, got {value!r}")
    return count


def resolve_num_threads(num_threads=None, compiled=None) -> int:
    """The threads a run uses: `num_threads`, else $TVM_NUM_THREADS, else `compiled` (the count recorded at
    compile time), else all cores; never more than this host's cores (TVM's pool is sized to them)."""
    cores = host_cores()
    env = os.environ.get("TVM_NUM_THREADS", "").strip()
    if num_threads is not None or env:
        what = "num_threads" if num_threads is not None else "TVM_NUM_THREADS"
        count = check_thread_count(num_threads if num_threads is not None else env, what)
        if count > cores:
            warnings.warn(f"{what}={count} is more than this host's {cores} cores; using {cores}", stacklevel=3)
        return min(count, cores)
    if compiled is not None:
        return min(check_thread_count(compiled, "the compiled model's num_threads"), cores)
    return cores


_SHARE_ALL_CORES = -3  # TVM's ThreadGroup::kSpecifyThreadShareAllCore
_pool = threading.local()  # TVM keeps one thread pool per calling thread: what this thread's was set to


def use_threads(count: int) -> None:
    """Make the calling thread's TVM pool run parallel kernels on `count` threads (cheap when already so).

    TVM sizes a thread's pool once, when it starts (from TVM_NUM_THREADS, else half the logical CPUs), and
    afterwards can only lower the count below that size. Handing runtime.config_threadpool the list of CPUs
    starts the pool (if it has not started) with one worker per CPU, so any count up to the cores can be
    picked later, run after run. Its "share all cores" mode lets the workers and the caller run on any CPU,
    where TVM's default pins the calling thread to its first core(s), which also confines every thread the
    caller starts afterwards (onnxruntime's pool, in `quantvm bench`).
    """
    if getattr(_pool, "count", None) == count:
        return
    import tvm

    cpus = [str(cpu) for cpu in range(host_cores())]
    tvm.get_global_func("runtime.config_threadpool")(_SHARE_ALL_CORES, count, cpus)
    _pool.count = count
    used = tvm.get_global_func("runtime.NumThreads")()
    if used < count:
        warnings.warn(f"TVM's thread pool of this thread was started with {used} thread(s) before quantvm "
                      f"configured it and cannot grow: running on {used}, not {count}. Load or compile the "
                      "model before running other TVM code in this thread, or run it from a new thread",
                      stacklevel=3)


_vm_creation = threading.Lock()  # TVM does not say VMs may be made concurrently; rare, so one at a time


class Predictor:
    """Runs one compiled model on numpy inputs, checked by name, shape and dtype before anything runs.

    Thread-safe: any number of threads may call `run` at once. A Relax VM keeps its registers and frames in
    itself, so threads sharing one corrupt each other (SIGSEGV in StorageObj::AllocTensor); each thread gets
    its own VM instead. The VMs share the loaded module's weights (16 VMs of a ResNet-50, 98 MiB of weights,
    added 9 MiB in all), and the VM call releases the GIL, so threads run the model in parallel.
    """

    def __init__(self, module, metadata: ArtifactMetadata, num_threads: int | None = None):
        import tvm

        self.metadata = metadata
        self.num_threads = resolve_num_threads(num_threads, metadata.target.num_threads)
        self.inputs = list(metadata.inputs)
        self.outputs = list(metadata.outputs)
        self._names = [spec.name for spec in self.inputs]
        self._expected = [_ExpectedInput.of(spec) for spec in self.inputs]
        self._tvm = tvm
        self.module = module  # the loaded runtime module (VM executable), for tools that make their own VM
        self._per_thread = threading.local()  # .main: the calling thread's VM entry point; .stager: its inputs
        self._main()  # a module the VM cannot run fails here, in the loading thread, not at a first run

    def run(self, *args, **kwargs) -> list[np.ndarray]:
        """Run the model; inputs by position (model order) or by name. Returns the outputs in model order."""
        arrays = self.bind_inputs(*args, **kwargs)
        use_threads(self.num_threads)  # per thread too: a thread's first run sizes its own TVM pool
        main = self._main()
        return output_arrays(flatten_outputs(main(*self._per_thread.stager.tensors(arrays))))

    __call__ = run

    def _main(self):
        """The calling thread's VM entry point, made on its first call."""
        main = getattr(self._per_thread, "main", None)
        if main is None:
            from tvm.runtime.vm import (
                VirtualMachine,  # (relax.VirtualMachine, without the compiler's modules)
            )

            with _vm_creation:
                main = VirtualMachine(self.module, self._tvm.cpu())["main"]
            main.release_gil = True  # tvm-ffi's default, unless $TVM_FFI_RELEASE_GIL_BY_DEFAULT=0: threads overlap
            self._per_thread.main = main
            self._per_thread.stager = InputStager(len(self.inputs))
        return main

    def bind_inputs(self, *args, **kwargs) -> list[np.ndarray]:
        """The inputs (by position or name) as run() takes them: in model order, each checked by name,
        shape and dtype (InputError naming the input otherwise), C-contiguous."""
        names = self._names
        if not kwargs and len(args) == len(names):  # the common calls, without building a dict
            values = args
        elif not args and len(kwargs) == len(names) and all(n in kwargs for n in names):
            values = [kwargs[n] for n in names]
        else:
            values = self._gather(names, args, kwargs)
        return [_check_input(expected, value) for expected, value in zip(self._expected, values)]

    def _gather(self, names: list[str], args: tuple, kwargs: dict) -> list:
        """Inputs given partly by position, partly by name, in model order; InputError for what is amiss."""
        if len(args) > len(names):
            raise InputError(f"the model takes {len(names)} input(s) ({', '.join(names)}), got {len(args)} "
                             "positional")
        given = dict(zip(names, args))
        for name, value in kwargs.items():
            if name not in names:
                raise InputError(f"unknown input {name!r}; the model's inputs are {', '.join(names)}")
            if name in given:
                raise InputError(f"input {name!r} given both by position and by name")
            given[name] = value
        missing = [n for n in names if n not in given]
        if missing:
            raise InputError(f"missing input(s) {', '.join(map(repr, missing))}; expected "
                             + ", ".join(f"{s.name} {list(s.shape)} {s.dtype}" for s in self.inputs))
        return [given[n] for n in names]


@dataclass(frozen=True)
class _ExpectedInput:
    """An input's spec as run() checks it, its dtype and shape made once (checked on every call)."""
    name: str
    dtype: np.dtype
    shape: tuple
    index_bound: IndexBound | None

    @classmethod
    def of(cls, spec: TensorSpec) -> _ExpectedInput:
        return cls(spec.name, np.dtype(spec.dtype), tuple(spec.shape), spec.index_bound)


def _check_input(expected: _ExpectedInput, value) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype != expected.dtype:
        raise InputError(f"input {expected.name!r}: dtype {array.dtype} given, {expected.dtype} expected")
    if array.shape != expected.shape:
        raise InputError(f"input {expected.name!r}: shape {list(array.shape)} given, {list(expected.shape)} "
                         "expected")
    problem = indices_out_of_range(expected.name, expected.index_bound, array)
    if problem:
        raise InputError(problem)
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)  # (a 0-d array is contiguous)


def indices_out_of_range(name: str, bound: IndexBound | None, array: np.ndarray) -> str | None:
    """What is wrong with input `name` if a Gather reads it as indices and a value lies outside
    [-extent, extent), as onnxruntime refuses it (the kernel would read outside its table); else None."""
    if bound is None or not array.size or (array.min() >= -bound.extent and array.max() < bound.extent):
        return None
    where = tuple(int(i) for i in np.argwhere((array < -bound.extent) | (array >= bound.extent))[0])
    return (f"input {name!r}: value {array[where]} at {list(where)} is out of range for Gather {bound.node!r}, "
            f"which takes indices in [{-bound.extent}, {bound.extent - 1}]")


def flatten_outputs(result):
    """The VM's result (a tensor or nested tuples of them) as a flat list of tensors."""
    if hasattr(result, "numpy"):
        return [result]
    return [t for item in result for t in flatten_outputs(item)]


def load(path, num_threads: int | None = None) -> Predictor:
    """Load an artifact written by `CompiledModel.export`. Only load artifacts you trust: it runs their code.

    Before any of its code is loaded, the file must match the SHA-256 digest its metadata records (else
    ArtifactError: damaged or modified) and this host must have the CPU features it needs (else
    HostMismatchError).

    Runs use `num_threads` threads, else $TVM_NUM_THREADS, else the count it was compiled for (capped at this
    host's cores), else all cores.
    """
    import tvm

    path = Path(path)
    metadata = read_metadata(path)
    check_host_can_run(metadata, str(path))
    num_threads = resolve_num_threads(num_threads, metadata.target.num_threads)  # before any code loads
    with tvm_noise_silenced():
        module = tvm.runtime.load_module(str(path))
    return Predictor(module, metadata, num_threads)
