"""Block slabs: the shared memory a connection's blocks are written into, mapped once.

A fresh sealed memfd per clip costs, on a VM, more than copying its bytes: the worker's writes
allocate and zero every page, this process maps and faults each one, and the last close frees
them. With slabs (docs/protocol.md, "Block slabs") the supervisor writes a connection's blocks
into a few memfds it reuses; this process maps each once and says when it has copied a block
out (``release_slabs``, sent with its next request), after which the slab may take another.

Safety: a slab is sealed against shrinking, so a mapping of it can never fault on pages cut
away; a block in it is never rewritten before this process releases it; and it is validated
(checksums included) as it is copied out, like any block.
"""

from __future__ import annotations

import fcntl
import os
import threading
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, NoReturn, Optional, Union

from . import block as _block
from .block import Allocator, Block, BlockFormatError
from .errors import ProtocolError, SupervisorUnavailable

if TYPE_CHECKING:  # typing.TypeGuard is 3.10+; annotations are not evaluated at run time
    from typing import TypeGuard

__all__ = ["SlabTable", "SlabLease", "BlockRef", "DEFAULT_SLABS"]

#: Slabs a client asks for: one per clip in flight, plus the one being copied out.
DEFAULT_SLABS = 4

_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
_F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)


class _Slab:
    __slots__ = ("fd", "mapping")

    def __init__(self, fd: int):
        self.fd = fd
        self.mapping: Optional[Any] = None  # mmap.mmap, made at first read


class SlabLease:
    """A block in a slab, held by the answer that delivered it until read or dropped."""

    __slots__ = ("table", "index", "nbytes", "_done")

    def __init__(self, table: "SlabTable", index: int, nbytes: int):
        self.table = table
        self.index = index
        self.nbytes = nbytes
        self._done = False

    def read(self, allocator: Optional[Allocator] = None, threads: int = 1) -> Block:
        """Validates the block and copies its tensors out (into what `allocator` returns, on up
        to `threads` threads); the slab is released either way."""
        try:
            return self.table.read(self.index, self.nbytes, allocator, threads)
        finally:
            self.release()

    def release(self) -> None:
        """Gives the slab back unread (an answer nobody waits for any more)."""
        if not self._done:
            self._done = True
            self.table.released(self.index)


class SlabTable:
    """The slabs of one connection: their fds and mappings, and the releases not yet sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slabs: Dict[int, _Slab] = {}
        self._releases: List[int] = []
        self._closed = False

    def lease(self, reply: Mapping[str, Any], fd: Optional[int]) -> SlabLease:
        """The lease for an answer whose block is in a slab (its ``slab`` object), taking the
        slab's fd when it came with the answer. Raises ProtocolError (the fd closed) on an
        answer that does not follow docs/protocol.md."""
        slab = reply.get("slab")
        fields = slab if isinstance(slab, dict) else {}
        index, attached, nbytes = fields.get("index"), fields.get("attached"), reply.get("block_bytes")
        if not _is_count(index) or not isinstance(attached, bool) or not _is_count(nbytes) or nbytes < _block.MIN_BLOCK:
            _refuse(fd, f"an answer with a malformed slab: slab {slab!r}, block_bytes {nbytes!r}")
        if attached != (fd is not None):
            came = "an fd came" if fd is not None else "no fd came"
            _refuse(fd, f"slab {index}: the answer says attached={attached} but {came} with it")
        with self._lock:
            if self._closed:
                _refuse(fd, "a slab answer on a closed connection")
            if fd is not None:
                _check_slab_seals(fd, index)
                old = self._slabs.pop(index, None)
                if old is not None:
                    self._drop(old)
                self._slabs[index] = _Slab(fd)
            elif index not in self._slabs:
                raise ProtocolError(f"slab {index}: a block in a slab whose fd never came")
        return SlabLease(self, index, nbytes)

    def read(self, index: int, nbytes: int, allocator: Optional[Allocator], threads: int = 1) -> Block:
        with self._lock:
            slab = self._slabs.get(index)
            if slab is None or self._closed:
                # Another thread dropped the connection after this answer came, before it was read.
                raise SupervisorUnavailable(f"the connection closed before the block in slab {index} was read")
            if slab.mapping is None or len(slab.mapping) < nbytes:
                size = os.fstat(slab.fd).st_size
                if size < nbytes:
                    raise BlockFormatError(f"invalid block: slab {index} holds {size} bytes, the answer says {nbytes}")
                if slab.mapping is not None:
                    _block._unmap(slab.mapping)
                slab.mapping = _block._map(slab.fd, size)
            # The view is taken under the lock: a mapping with a view cannot be closed, so a
            # connection closed meanwhile unmaps it only once this read is done.
            view = memoryview(slab.mapping)[:nbytes]
        try:
            return _block.read_block(view, allocator, threads)
        finally:
            view.release()

    def released(self, index: int) -> None:
        with self._lock:
            if not self._closed:
                self._releases.append(index)

    def has_releases(self) -> bool:
        with self._lock:
            return bool(self._releases)

    def take_releases(self) -> List[int]:
        """The slabs to name in ``release_slabs`` of the next request (then forgotten here)."""
        with self._lock:
            taken, self._releases = self._releases, []
        return taken

    def restore_releases(self, indices: List[int]) -> None:
        """Releases taken for a request that never left (sent with the next one instead)."""
        with self._lock:
            if not self._closed:
                self._releases[:0] = indices

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._slabs)

    def close(self) -> None:
        """Unmaps every slab (a mapping being read goes when its read is done) and closes its fd."""
        with self._lock:
            self._closed = True
            slabs, self._slabs = list(self._slabs.values()), {}
            self._releases = []
        for slab in slabs:
            self._drop(slab)

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's slabs are not ours (block.py's fork hook has closed
        their fds here and keeps their mappings from ever being unmapped)."""
        self._lock = threading.Lock()
        self._slabs = {}
        self._releases = []
        self._closed = True

    @staticmethod
    def _drop(slab: _Slab) -> None:
        if slab.mapping is not None:
            _block._unmap(slab.mapping)
            slab.mapping = None
        _block.close_fd(slab.fd)


#: What an ok answer's block arrives as: a sealed memfd's fd, or a lease of a slab.
BlockRef = Union[int, SlabLease]


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _refuse(fd: Optional[int], problem: str) -> NoReturn:
    """An answer that breaks docs/protocol.md: the fd that came with it is closed."""
    if fd is not None:
        _block.close_fd(fd)
    raise ProtocolError(problem)


def _check_slab_seals(fd: int, index: int) -> None:
    """A slab must be a memfd sealed against shrinking: a mapping of it then never faults."""
    try:
        seals = fcntl.fcntl(fd, _F_GET_SEALS)
    except OSError as exc:
        _block.close_fd(fd)
        raise ProtocolError(f"slab {index}: the fd is not a sealable memfd ({exc.strerror})") from None
    if not seals & _F_SEAL_SHRINK:
        _block.close_fd(fd)
        raise ProtocolError(f"slab {index}: the memfd is not sealed against shrinking (seals {seals:#x})")
