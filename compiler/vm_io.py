"""Numpy arrays into and out of the Relax VM, at a cost that does not show next to a tiny model's run.

`tvm.runtime.tensor(array)` allocates and copies (about 15 us per input) and `Tensor.numpy()` about 4 us per
output: on a 50 us streaming model that was half the call. DLPack shares memory instead, in well under a
microsecond. Compiled kernels assume 64-byte aligned buffers (TVM's allocation alignment; the generated code
may use aligned vector loads), so a large input is shared only when its data is so aligned; otherwise, and
always for small inputs (copying a few KiB costs less than reading a pointer through `ndarray.ctypes`), it is
copied into a staging tensor of the calling thread, allocated once. Outputs are copied out of the VM's tensors: an
output may be a view of an input or a weight, and the caller owns what run() returns.
"""

from __future__ import annotations

import numpy as np

ALIGNMENT = 64  # bytes: TVM's kAllocAlignment, which compiled kernels assume of every buffer
SHARE_FROM_BYTES = 1 << 18  # inputs this large are shared when aligned, smaller ones copied


class InputStager:
    """One thread's inputs as VM tensors: shared when aligned, else copied into tensors kept for the next run.

    Not thread-safe: each thread keeps its own (a staging tensor holds an input until the run returns)."""

    def __init__(self, count: int):
        self._staged: list[tuple[object, np.ndarray] | None] = [None] * count

    def tensors(self, arrays: list[np.ndarray]) -> list:
        """`arrays` (C-contiguous, checked) as tensors the VM may read; valid until the next call."""
        import tvm_ffi

        tensors = []
        for slot, array in enumerate(arrays):
            if array.nbytes >= SHARE_FROM_BYTES and array.ctypes.data % ALIGNMENT == 0:
                tensors.append(tvm_ffi.from_dlpack(array))
            else:
                tensors.append(self._copy_in(slot, array))
        return tensors

    def _copy_in(self, slot: int, array: np.ndarray):
        staged = self._staged[slot]
        if staged is None or staged[1].shape != array.shape or staged[1].dtype != array.dtype:
            import tvm

            tensor = tvm.runtime.empty(array.shape, str(array.dtype))  # aligned by TVM's allocator
            staged = (tensor, np.from_dlpack(tensor))
            self._staged[slot] = staged
        staged[1][...] = array
        return staged[0]


def output_arrays(tensors) -> list[np.ndarray]:
    """The VM's output tensors as numpy arrays of the caller's own (copies)."""
    return [_output_array(t) for t in tensors]


def _output_array(tensor) -> np.ndarray:
    try:
        return np.array(np.from_dlpack(tensor), copy=True)
    except (BufferError, RuntimeError, TypeError):  # a dtype DLPack's numpy side lacks (bfloat16)
        return tensor.numpy()
