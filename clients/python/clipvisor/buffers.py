"""Decoding into memory you already have.

By default every decoded tensor is a new numpy array. On this kind of VM the first write to a
fresh array of tens of MB costs as much as the copy out of the shared-memory block
(docs/benchmark-method.md §4.3), and a GPU training loop wants frames in pinned memory anyway.
An *allocator* (``Client(allocator=...)`` or ``allocator=`` on a call) says where each tensor
goes: :class:`ReusedBuffers` below, or any callable ``(name, shape, dtype) -> array``.
Without one, large tensors come from :class:`RecycledArrays`: new arrays to the caller, whose
memory is used again once they are garbage.
"""
from __future__ import annotations

import collections
import math
import os
import threading
import weakref
from typing import Any, Deque, Dict, List, Optional, Tuple

import numpy as np

__all__ = ["ReusedBuffers", "RecycledArrays"]


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


_live_pools: "weakref.WeakSet[RecycledArrays]" = weakref.WeakSet()


class _Lease:
    """The base of an array from :class:`RecycledArrays`: numpy keeps it alive as long as the
    array or any view of it (a torch tensor from ``torch.from_numpy`` included) lives, and its
    memory goes back to the pool when the last of them is gone."""

    __slots__ = ("__array_interface__", "_memory", "_pool")

    def __init__(self, memory: np.ndarray, shape: Tuple[int, ...], dtype: np.dtype, pool: "RecycledArrays"):
        self._memory = memory
        self._pool = pool
        self.__array_interface__ = {"version": 3, "shape": shape, "typestr": dtype.str,
                                    "data": (memory.ctypes.data, False)}

    def __del__(self) -> None:
        self._pool._give_back(self._memory)

    def __reduce__(self) -> Any:
        # A copy would hand the same memory back twice (and a pickled pointer means nothing in
        # another process): copy or pickle the array, never its lease.
        raise TypeError("the lease of a RecycledArrays array cannot be copied or pickled; copy the array")


class RecycledArrays:
    """An allocator of new arrays whose memory is used again once they are garbage.

    Each array is the caller's, like ``np.empty``'s, for as long as it or any view of it lives
    (safe for ``Client.sample`` and for arrays kept across steps). What differs is where the
    memory goes afterwards: into a pool that the next array of about the same size is taken
    from, instead of back to the system. The first write to fresh memory costs as much as the
    copy out of the block on this kind of VM (the kernel zeroes every page), and glibc gives a
    thread's memory back to the system whenever that thread's heap empties, so a client called
    from several threads paid it for nearly every large tensor (docs/benchmarks.md).

    How much free memory it keeps: up to ``keep_bytes`` (256 MiB), or, with ``keep_peak``, up
    to the most its arrays ever held at once when that is more: clips decoded one after another
    at a few sizes find their buffers again, and so does a training step that decodes a 2 GB
    sample, at the next step. A buffer that no allocation took for ``max_idle`` allocations
    goes back to the system, so memory for sizes no longer asked for does not stay; beyond
    the bound, the oldest buffers go first. ``keep_bytes=0, keep_peak=False`` keeps nothing.
    A buffer serves requests down to ``1 / max_slack`` of its size, so a short clip never pins a
    long clip's memory.

    The client uses one process-wide instance for tensors of ``min_bytes`` or more when no
    allocator is given (``default_arrays``; its attributes may be changed). The arrays do not
    own their data (``arr.base`` is the pool's lease), so ``arr.resize`` refuses them, as it
    refuses any view.
    """

    #: Every array is new to its caller (``Client.sample`` accepts this allocator).
    reuses_memory = False

    #: Buffers are whole multiples of this, so sizes that differ by a little share buffers.
    granule = 64 << 10

    def __init__(self, keep_bytes: int = 256 << 20, keep_peak: bool = True, min_bytes: int = 1 << 20,
                 max_slack: float = 1.25, max_idle: int = 256) -> None:
        if keep_bytes < 0 or min_bytes < 0 or max_slack < 1 or max_idle < 1:
            raise ValueError("keep_bytes and min_bytes must be >= 0, max_slack >= 1, max_idle >= 1")
        self.keep_bytes = keep_bytes
        self.keep_peak = keep_peak
        self.min_bytes = min_bytes
        self.max_slack = max_slack
        self.max_idle = max_idle
        #: Bytes of buffers in arrays not yet known to be dead, and the most there ever were.
        self.live_bytes = 0
        self.peak_bytes = 0
        self._allocations = 0
        self._reset()
        _live_pools.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._returned: Deque[np.ndarray] = collections.deque()
        self._free: List[Tuple[np.ndarray, int]] = []  # (buffer, allocation count when freed), oldest first

    def __call__(self, name: str, shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        shape = tuple(int(n) for n in shape)
        nbytes = math.prod(shape) * dtype.itemsize
        # Structured and subarray dtypes do not survive `__array_interface__`'s typestr: plain
        # arrays for those (decoded tensors are never such), as for small ones.
        if nbytes < max(self.min_bytes, 1) or dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
            return np.empty(shape, dtype)
        size = -(-nbytes // self.granule) * self.granule
        memory = self._take(nbytes, size)
        if memory is None:
            memory = np.empty(size, np.uint8)
        return np.asarray(_Lease(memory, shape, dtype, self))

    def _take(self, nbytes: int, size: int) -> Optional[np.ndarray]:
        """A free buffer for ``nbytes``, or None after making room for a new one of ``size``;
        either way counted as live."""
        with self._lock:
            self._collect()
            self._allocations += 1
            limit = nbytes * self.max_slack + self.granule
            fits = [i for i, (m, _) in enumerate(self._free) if nbytes <= m.nbytes <= limit]
            taken: Optional[np.ndarray] = None
            if fits:
                taken = self._free.pop(min(fits, key=lambda i: self._free[i][0].nbytes))[0]
            self.live_bytes += taken.nbytes if taken is not None else size
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            self._collect()  # what a garbage collection returned meanwhile, then the trim
            return taken

    def _give_back(self, memory: np.ndarray) -> None:
        """Called when an array's last view is gone, in whatever thread that happened, possibly
        inside a garbage collection that interrupted this pool's own code under its lock: so
        it never waits for the lock. deque.append is atomic; the returned memory is counted and
        trimmed now when the lock is free, else when its holder (or the next return) collects."""
        self._returned.append(memory)
        if self._lock.acquire(blocking=False):
            try:
                self._collect()
            finally:
                self._lock.release()

    def _collect(self) -> None:
        """Moves returned memory into the free list, then trims (under the lock)."""
        returned = self._returned
        while returned:
            memory = returned.popleft()
            self.live_bytes = max(0, self.live_bytes - memory.nbytes)
            self._free.append((memory, self._allocations))
        self._trim()

    def _trim(self) -> None:
        """Drops free buffers idle for ``max_idle`` allocations, then the oldest while the free
        memory is over its bound (under the lock)."""
        self._free = [(m, at) for m, at in self._free if self._allocations - at < self.max_idle]
        bound = max(self.keep_bytes, self.peak_bytes if self.keep_peak else 0)
        held = sum(m.nbytes for m, _ in self._free)
        while self._free and held > bound:
            held -= self._free.pop(0)[0].nbytes

    def held_bytes(self) -> int:
        """Bytes the pool holds for arrays to come (none of them in use)."""
        with self._lock:
            self._collect()
            return sum(m.nbytes for m, _ in self._free)

    # Pickled into DataLoader workers with the client: each starts with an empty pool.
    def __getstate__(self) -> Dict[str, Any]:
        return {"keep_bytes": self.keep_bytes, "keep_peak": self.keep_peak, "min_bytes": self.min_bytes,
                "max_slack": self.max_slack, "max_idle": self.max_idle}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]


def _after_fork_in_child() -> None:
    # A parent thread may have held a pool's lock at the fork. The child keeps the arrays it
    # inherited (its own copies, which come back to its pools when they die, hence the live
    # count stays); the free buffers are dropped.
    for pool in list(_live_pools):
        pool._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

#: The pool behind every decode that names no allocator.
default_arrays = RecycledArrays()
