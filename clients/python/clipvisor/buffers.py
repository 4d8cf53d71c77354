"""Decoding into memory you already have.

By default every decoded tensor is a new numpy array. On this kind of VM the first write to a
fresh array of tens of MB costs as much as the copy out of the shared-memory block
(docs/benchmark-method.md §4.3), and a GPU training loop wants frames in pinned memory anyway.
An *allocator* (``Client(allocator=...)`` or ``allocator=`` on a call) says where each tensor
goes: :class:`ReusedBuffers` below, or any callable ``(name, shape, dtype) -> array``.
"""
from __future__ import annotations

import math
import threading
from typing import Any, Dict, Tuple

import numpy as np

__all__ = ["ReusedBuffers"]


class ReusedBuffers:
    """An allocator that decodes into the same memory every time: one buffer per tensor name
    (``"video"``, ``"audio"``) and per thread, grown when a clip needs more.

    The arrays of a result are views into those buffers and stay valid only until the **next
    decode in the same thread** with this allocator: use or copy them first (a training step
    that stacks frames into a batch, or copies them to the GPU, does). For that reason it
    refuses ``Client.sample``, whose clips would overwrite each other. Threads never share a
    buffer, so one instance may serve a multi-threaded loader.

    ``capacity()`` tells how many bytes it holds (for memory budgets).
    """

    #: Tells ``Client.sample`` that this allocator hands the same memory out again.
    reuses_memory = True

    def __init__(self) -> None:
        self._local = threading.local()

    def __call__(self, name: str, shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        buffers: Dict[str, np.ndarray] = self._buffers()
        buf = buffers.get(name)
        if buf is None or buf.nbytes < nbytes:
            # Grown by at least half so a slowly increasing clip length does not reallocate
            # every time; 64-byte aligned like numpy's own large arrays.
            size = max(nbytes, int(buf.nbytes * 1.5) if buf is not None else 0, 64)
            buf = np.empty(size, dtype=np.uint8)
            buffers[name] = buf
        return buf[:nbytes].view(dtype).reshape(shape)

    def _buffers(self) -> Dict[str, np.ndarray]:
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = {}
        return buffers

    def capacity(self) -> int:
        """Bytes held by the calling thread's buffers."""
        return sum(b.nbytes for b in self._buffers().values())

    # Pickled into DataLoader workers with the client: each worker starts with empty buffers.
    def __getstate__(self) -> Dict[str, Any]:
        return {}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]
