"""Decoded tensors onto a CUDA device through page-locked memory that is reused, not re-made.

A host-to-GPU copy runs asynchronously only from page-locked ("pinned") memory. From a plain
numpy array, ``tensor.to("cuda")`` blocks while CUDA stages the bytes itself, and
``pin_memory()`` first allocates page-locked memory anew, which costs more than the copy. A
:class:`CudaUploader` keeps a few page-locked *staging slots* per thread and reuses them:

- :meth:`CudaUploader.upload` copies an array into the next slot, starts the copy to the
  device with ``non_blocking=True`` on a stream (the caller's, or the current one) and returns at
  once, so that the next clip is read while this one travels;
- as a client's allocator (:meth:`CudaUploader.allocator`) it lets the block be decompressed
  straight into a slot, and ``upload`` of that array then copies nothing on the host;
- a slot is written again only after the copies that read it have finished (an event recorded
  behind the last one on each stream), so a slot is never overwritten while the GPU may read it.

``Video.to_torch(device="cuda")`` (and ``Audio``/``Clip``) goes through a default uploader per
device. torch is imported only when an uploader is made. CUDA cannot be initialised in forked
DataLoader workers: upload in the main process (docs/python-client.md, "GPU delivery").
"""
from __future__ import annotations

import math
import threading
from typing import Any, ContextManager, Dict, List, Optional, Tuple

import numpy as np

__all__ = ["CudaUploader", "default_uploader"]


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("GPU delivery needs PyTorch with CUDA: pip install torch (or 'clipvisor[torch]')") from exc
    return torch


def _resolved(torch: Any, device: Any) -> Any:
    """``device`` as a ``torch.device``; "cuda" without an index is the current CUDA device, so
    that "cuda" and "cuda:N" name the same uploader."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return dev


class _CudaBackend:
    """What the uploader needs from CUDA: page-locked host memory, events and streams. Tests
    pass an object with the same methods to run the slot logic on a machine without a GPU."""

    def __init__(self, torch: Any, device: Any) -> None:
        if device.type != "cuda":
            raise ValueError(f"CudaUploader copies to a CUDA device, not {device}")
        if not torch.cuda.is_available():
            raise RuntimeError(f"cannot copy to {device}: this PyTorch ({torch.__version__}) sees no CUDA device "
                               "(torch.cuda.is_available() is False)")
        self.torch = torch
        self.device = device

    def page_locked(self, nbytes: int) -> Any:
        return self.torch.empty(nbytes, dtype=self.torch.uint8, pin_memory=True)

    def event(self) -> Any:
        return self.torch.cuda.Event()

    def current_stream(self) -> Any:
        return self.torch.cuda.current_stream(self.device)

    def on(self, stream: Any) -> ContextManager[Any]:
        return self.torch.cuda.stream(stream)

    def device_of(self, stream: Any) -> Any:
        return stream.device

    def used_on(self, tensor: Any, stream: Any) -> None:
        tensor.record_stream(stream)


class _Slot:
    """One page-locked buffer: its bytes, a numpy view of them, an event per stream that copied
    from it (recorded behind its last copy on that stream), and the array the allocator last
    handed out from it (until it is taken again)."""

    __slots__ = ("storage", "array", "events", "claim")

    #: Streams whose events a slot keeps at most; past that they are forgotten once waited for.
    kept_streams = 8

    def __init__(self) -> None:
        self.storage: Any = None
        self.array: np.ndarray = np.empty(0, dtype=np.uint8)
        self.events: Dict[Any, Any] = {}
        self.claim: Optional[np.ndarray] = None  # flat, over a buffer of its own (see `allocator`)


class CudaUploader:
    """Copies numpy arrays to ``device`` through ``slots`` page-locked staging buffers per
    thread, asynchronously (see the module's text).

    ``stream``: the CUDA stream the copies run on (default: the current stream at each upload,
    so that the tensor is ready for the kernels that follow on it). With a stream of your own,
    the copies overlap the compute on others; then make the consuming stream wait for it
    (``torch.cuda.current_stream().wait_stream(stream)``), as for any side stream.

    An array that :meth:`allocator` handed out stays valid until ``slots`` more tensors are
    staged in the same thread; upload it before then (a decode makes one tensor per kind, so a
    :class:`~clipvisor.Clip` takes two), and do not change it after: the device reads it after
    ``upload`` returns. For that reason ``Client.sample`` refuses this allocator.
    """

    #: Host copies into a slot are made and queued to the device in pieces of this size.
    staging_piece_bytes = 8 << 20

    def __init__(self, device: Any = "cuda", *, stream: Any = None, slots: int = 2, _backend: Any = None) -> None:
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise ValueError(f"slots must be a positive integer, not {slots!r}")
        torch = _import_torch()
        self._torch = torch
        self.device = _resolved(torch, device)
        self._backend = _backend if _backend is not None else _CudaBackend(torch, self.device)
        self.stream = stream
        self.slots = slots
        self._local = threading.local()
        self._dtypes: Dict[np.dtype, Any] = {}

    # -- the allocator side ---------------------------------------------------------------------

    def allocator(self, name: str, shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An :data:`~clipvisor.Allocator`: the tensor is decompressed into the next staging
        slot (``Client(allocator=uploader.allocator)`` or ``allocator=`` on a call)."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        slot = self._take(nbytes)
        # Made through a buffer of its own so that every view of it has it as its base
        # (numpy points a view's base at the first array that owns its memory or is made over
        # another object): `_held` can then tell this claim's views from an older claim's.
        claim = np.frombuffer(slot.array.data, dtype=dtype, count=math.prod(shape))
        slot.claim = claim
        return claim.reshape(shape)

    # Lets ``Client.sample`` see the flag through the bound method.
    allocator.reuses_memory = True  # type: ignore[attr-defined]

    # -- the upload side ------------------------------------------------------------------------

    def upload(self, array: np.ndarray, *, stream: Any = None) -> Any:
        """A tensor on the device with ``array``'s shape, dtype and values. Returns once the copy
        is queued. An array of your own may be changed or freed at once (its bytes were copied
        into a slot); one from :meth:`allocator` is the slot, which the device reads after this
        returns."""
        if not isinstance(array, np.ndarray):
            raise TypeError(f"upload() takes a numpy array, not {type(array).__name__}")
        torch = self._torch
        dtype = self._torch_dtype(array.dtype)
        shape = tuple(array.shape)
        nbytes = array.nbytes
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype, device=self.device)
        current = self._backend.current_stream()
        stream = stream if stream is not None else self.stream
        if stream is None:
            stream = current
        elif self._backend.device_of(stream) != self.device:
            # The copy would run on the current stream of the uploader's device, not on this one,
            # and the event recorded here would not cover it.
            on = self._backend.device_of(stream)
            raise ValueError(f"the stream is on {on}, the uploader copies to {self.device}")
        held = self._held(array)
        with self._backend.on(stream):
            # Allocated on the copy's stream: the caching allocator then knows which stream
            # uses the memory.
            out = torch.empty(shape, dtype=dtype, device=self.device)
            if held is not None:
                slot, offset = held
                out.copy_(slot.storage[offset:offset + nbytes].view(dtype).view(shape), non_blocking=True)
            else:
                slot = self._take(nbytes)
                self._stage(array, slot, out)
            event = slot.events.get(stream)
            if event is None:
                event = slot.events[stream] = self._backend.event()
            event.record(stream)
        if stream != current:
            # The tensor is used where the caller's kernels run: the caching allocator must not
            # hand its memory out again until they are done with it (Tensor.record_stream).
            self._backend.used_on(out, current)
        return out

    def capacity(self) -> int:
        """Page-locked bytes held by the calling thread's slots."""
        return sum(s.array.nbytes for s in self._ring()[0])

    # -- slots ----------------------------------------------------------------------------------

    def _ring(self) -> Tuple[List[_Slot], List[int]]:
        ring = getattr(self._local, "ring", None)
        if ring is None:
            ring = self._local.ring = ([_Slot() for _ in range(self.slots)], [0])
        return ring

    def _take(self, nbytes: int) -> _Slot:
        """The next slot, once the GPU has finished reading it, with room for ``nbytes``."""
        slots, cursor = self._ring()
        slot = slots[cursor[0]]
        cursor[0] = (cursor[0] + 1) % len(slots)
        for event in slot.events.values():
            event.synchronize()  # every stream's last copy from this slot has finished
        if len(slot.events) > _Slot.kept_streams:
            slot.events.clear()
        if slot.array.nbytes < nbytes:
            # Grown by half again so that slowly growing clips do not re-pin every time. The old
            # buffer is let go first (arrays handed out from it keep it alive as long as they live).
            size = max(nbytes, int(slot.array.nbytes * 1.5), 64)
            slot.array, slot.storage = np.empty(0, dtype=np.uint8), None
            slot.storage = self._backend.page_locked(size)
            slot.array = slot.storage.numpy()
        slot.claim = None
        return slot

    def _held(self, array: np.ndarray) -> Optional[Tuple[_Slot, int]]:
        """The slot and byte offset of ``array``'s bytes when the allocator put them in a slot
        (and they are contiguous there); None when they must be staged."""
        for slot in self._ring()[0]:
            if slot.array.nbytes == 0 or not np.may_share_memory(array, slot.array):
                continue
            if slot.claim is None or not (array is slot.claim or array.base is slot.claim):
                raise ValueError(
                    "this array was decompressed into a staging slot that has been reused since: upload it before "
                    f"{self.slots} more tensors are staged in this thread (or make the uploader with more slots)")
            offset = array.ctypes.data - slot.array.ctypes.data
            if array.flags.c_contiguous and offset % array.itemsize == 0:
                return slot, offset
            return None  # strided, or re-typed at an offset torch cannot view: staged as a copy
        return None

    def _stage(self, array: np.ndarray, slot: _Slot, out: Any) -> None:
        """Copies ``array`` into ``slot`` and queues the copy of its bytes into ``out``, piece by
        piece, so that the device copies the first pieces while the host copies the next."""
        nbytes = array.nbytes
        staging = slot.array[:nbytes].view(array.dtype)
        pinned = slot.storage[:nbytes].view(out.dtype)
        if not array.flags.c_contiguous:
            np.copyto(staging.reshape(array.shape), array)
            out.copy_(pinned.view(out.shape), non_blocking=True)
            return
        source, dest = array.reshape(-1), out.view(-1)
        step = max(1, self.staging_piece_bytes // array.itemsize)
        for start in range(0, source.size, step):
            end = min(start + step, source.size)
            np.copyto(staging[start:end], source[start:end])
            dest[start:end].copy_(pinned[start:end], non_blocking=True)

    def _torch_dtype(self, dtype: np.dtype) -> Any:
        found = self._dtypes.get(dtype)
        if found is None:
            try:
                found = self._torch.from_numpy(np.empty(0, dtype=dtype)).dtype
            except TypeError as exc:
                raise TypeError(f"cannot upload {dtype} arrays: torch has no such dtype") from exc
            self._dtypes[dtype] = found
        return found


_defaults: Dict[str, CudaUploader] = {}
_defaults_lock = threading.Lock()


def default_uploader(device: Any) -> CudaUploader:
    """The uploader ``to_torch(device=...)`` uses for ``device`` (one per device per process)."""
    dev = _resolved(_import_torch(), device)
    key = str(dev)
    with _defaults_lock:
        uploader = _defaults.get(key)
        if uploader is None:
            uploader = _defaults[key] = CudaUploader(dev)
        return uploader


def is_cuda(device: Any) -> bool:
    """Whether ``device`` (a string, ``torch.device`` or index) names a CUDA device, as torch
    reads it (a bare index names the current accelerator)."""
    if device is None:
        return False
    torch = _import_torch()
    try:
        return bool(torch.device(device).type == "cuda")
    except (TypeError, RuntimeError, ValueError):
        return False  # not a device torch knows: `tensor.to(device)` says why

