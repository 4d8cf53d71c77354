"""Pure-Python reader of clipvisor blocks (docs/block-format.md, version 1).

A block is a sequence of standard zstd frames: a skippable header frame (JSON with a CRC-32),
one zstd frame per video frame / audio chunk, and a seek table in the zstd seekable format.
:func:`validate_block` performs every check of the format's section 4 before anything is
decompressed; :func:`read_block` then decompresses each tensor straight into its final numpy
array; :func:`read_block_fd` does the same for a sealed memfd received from the supervisor
(seal check, read-only mapping, the fd closed and the mapping dropped before returning).

Decompression strategy (see bench/python_block_read.py for the measurements): one
``ZstdDecompressor.stream_reader(..., read_across_frames=True).readinto(dest)`` call per tensor,
with ``dest`` a byte view of the preallocated array. libzstd then takes its single-pass path
for each frame (the whole frame is in the input and its content fits in the output), which
decodes straight into the array *and* verifies the frame's content checksum; the GIL is released
around each frame. No intermediate ``bytes`` object is made. At first use a self-test checks
that this path rejects a corrupt checksum with the installed ``zstandard``; if it ever did not,
the reader falls back to per-frame ``decompress()`` plus a copy (slower, equally strict).
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import random
import struct
import threading
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import zstandard

from .buffers import default_arrays
from .errors import BlockFormatError

__all__ = [
    "Allocator",
    "Block",
    "BlockLayout",
    "TensorInfo",
    "FrameInfo",
    "validate_block",
    "read_block",
    "read_block_fd",
    "read_block_file",
    "check_seals",
    "HEADER_MAGIC",
    "SEEK_TABLE_MAGIC",
    "SEEKABLE_FOOTER_MAGIC",
    "ZSTD_MAGIC",
]

HEADER_MAGIC = 0x184D2A50
SEEK_TABLE_MAGIC = 0x184D2A5E
SEEKABLE_FOOTER_MAGIC = 0x8F92EAB1
ZSTD_MAGIC = 0xFD2FB528
PAYLOAD_MAGIC = b"CVB1"
FORMAT_NAME = "clipvisor-block"
VERSION = 1
MAX_HEADER_BYTES = 64 << 20
MAX_FRAME_BYTES = 1 << 31
HEADER_PREFIX = 16
SEEK_ENTRY = 12
SEEK_FOOTER = 9
CHECKSUM_FLAG = 0x80
MIN_BLOCK = HEADER_PREFIX + SEEK_FOOTER + 8  # 33 bytes

DTYPES: Dict[str, np.dtype] = {"uint8": np.dtype(np.uint8), "float32": np.dtype("<f4")}

# fcntl constants (Linux); Python has them since 3.8, the numbers are the kernel's.
F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
F_SEAL_GROW = getattr(fcntl, "F_SEAL_GROW", 0x0004)
F_SEAL_WRITE = getattr(fcntl, "F_SEAL_WRITE", 0x0008)
REQUIRED_SEALS = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE
# Prefault the whole mapping in one call instead of one page fault per 4 KiB page (Linux; the
# constant is in Python's mmap module from 3.10).
MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000 if os.uname().sysname == "Linux" else 0)

_U32 = struct.Struct("<I")
_ENTRY = struct.Struct("<III")
_FRAME_START = struct.Struct("<IB")  # magic, frame header descriptor
_FCS = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"), 8: struct.Struct("<Q")}

Buffer = Union[bytes, bytearray, memoryview, mmap.mmap]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it."""

    name: str
    dtype: np.dtype
    shape: Tuple[int, ...]
    layout: str
    frame_sizes: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(sum(self.frame_sizes))


class FrameInfo(NamedTuple):
    """One data frame, as cross-checked between the seek table and the zstd frame itself. (A
    named tuple: a block has one per video frame or audio second, made on every read.)"""

    offset: int
    compressed_size: int
    decompressed_size: int
    checksum: int


@dataclass
class BlockLayout:
    """A block whose structure passed every check: offsets and sizes are inside the bytes and
    agree between the header, the seek table and the zstd frames."""

    header: Dict[str, Any]
    tensors: List[TensorInfo]
    frames: List[List[FrameInfo]]
    size: int

    @property
    def result(self) -> Dict[str, Any]:
        return self.header["result"]


@dataclass
class Block:
    """A decoded block: the header, its ``result`` metadata, and the tensors by name."""

    header: Dict[str, Any]
    tensors: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def result(self) -> Dict[str, Any]:
        return self.header["result"]


def _fail(message: str) -> BlockFormatError:
    return BlockFormatError(f"invalid block: {message}")


def _u32(buf: Buffer, offset: int, size: int) -> int:
    if offset < 0 or offset + 4 > size:
        raise _fail(f"read of 4 bytes at {offset} is outside the {size}-byte block")
    return _U32.unpack_from(buf, offset)[0]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_header(raw: bytes) -> Tuple[Dict[str, Any], List[TensorInfo], int]:
    # The writer pads the header with spaces (room reserved before the result is known): ~10 KB
    # behind an audio block's 1 KB of JSON. Cut them with one comparison rather than let the
    # parser scan them (any other tail is left for the parser to judge).
    end = raw.rfind(b"}") + 1
    if end and raw[end:] == b" " * (len(raw) - end):
        raw = raw[:end]
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _fail("header is not a JSON object")
    if header.get("format") != FORMAT_NAME:
        raise _fail(f"header format is not {FORMAT_NAME}")
    version = header.get("version")
    if not _is_int(version) or version != VERSION:
        raise _fail(f"unsupported block version {version!r}")
    tensors_json = header.get("tensors")
    result = header.get("result")
    crc = header.get("frame_headers_crc32")
    if not isinstance(tensors_json, list) or not isinstance(result, dict) or not isinstance(crc, int) \
            or isinstance(crc, bool):
        raise _fail("header lacks 'tensors', 'result' or 'frame_headers_crc32'")
    if not 0 <= crc <= 0xFFFFFFFF:
        raise _fail("frame_headers_crc32 is out of range")
    tensors: List[TensorInfo] = []
    names = set()
    for item in tensors_json:
        if not isinstance(item, dict):
            raise _fail("a tensor description is not an object")
        name, dtype_name = item.get("name"), item.get("dtype")
        shape, layout, sizes = item.get("shape"), item.get("layout"), item.get("frame_sizes")
        if not isinstance(name, str) or not isinstance(layout, str):
            raise _fail("tensor 'name' and 'layout' must be strings")
        if name in names:
            raise _fail(f"tensor {name!r} twice")
        names.add(name)
        if dtype_name not in DTYPES:
            raise _fail(f"tensor {name!r}: unknown dtype {dtype_name!r}")
        dtype = DTYPES[dtype_name]
        # `type(x) is int`: JSON gives plain ints, and a bool is not one (a frame list is long).
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _fail(f"tensor {name!r} has a bad shape")
        if not isinstance(sizes, list) or not all(type(s) is int and 0 <= s <= MAX_FRAME_BYTES for s in sizes):
            raise _fail(f"tensor {name!r} has bad frame_sizes")
        total = dtype.itemsize
        for d in shape:
            total *= d
        if sum(sizes) != total:
            raise _fail(f"tensor {name!r}: frame sizes do not add up to its shape")
        tensors.append(TensorInfo(name, dtype, tuple(shape), layout, tuple(sizes)))
    return header, tensors, crc


def _zstd_frame(buf: Buffer, start: int, end: int, index: int) -> Tuple[int, int, int]:
    """Parses the zstd frame in ``buf[start:end]``: returns (header size, content size, end of
    the frame as its block structure says). Never reads outside ``[start, end)``."""
    if end - start < 6:
        raise _fail(f"frame {index}: truncated zstd frame header")
    magic, fhd = _FRAME_START.unpack_from(buf, start)
    if magic != ZSTD_MAGIC:
        raise _fail(f"frame {index}: not a zstd frame")
    if not fhd & 0x04:
        raise _fail(f"frame {index}: has no content checksum")
    if fhd & 0x08:
        raise _fail(f"frame {index}: reserved bit set in the frame header descriptor")
    single = bool(fhd & 0x20)
    did_size = (0, 1, 2, 4)[fhd & 3]
    fcs_size = ((1 if single else 0), 2, 4, 8)[fhd >> 6]
    header_size = 5 + (0 if single else 1) + did_size + fcs_size
    if header_size > end - start:
        raise _fail(f"frame {index}: truncated zstd frame header")
    pos = start + 5 + (0 if single else 1)
    if did_size and int.from_bytes(bytes(buf[pos:pos + did_size]), "little") != 0:
        raise _fail(f"frame {index}: uses a dictionary")
    pos += did_size
    if fcs_size == 0:
        raise _fail(f"frame {index}: has no content size")
    content = _FCS[fcs_size].unpack_from(buf, pos)[0]
    if fcs_size == 2:
        content += 256
    pos = start + header_size
    while True:
        if end - pos < 3:
            raise _fail(f"frame {index}: truncated zstd block header")
        # Four bytes at once where they are inside the frame (a checksum always follows).
        bh = _U32.unpack_from(buf, pos)[0] & 0xFFFFFF if end - pos >= 4 else \
            buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16)
        btype = (bh >> 1) & 3
        if btype == 3:
            raise _fail(f"frame {index}: reserved zstd block type")
        pos += 3 + (1 if btype == 1 else bh >> 3)
        if pos > end:
            raise _fail(f"frame {index}: zstd block runs past the frame")
        if bh & 1:
            break
    pos += 4  # content checksum
    if pos > end:
        raise _fail(f"frame {index}: truncated content checksum")
    return header_size, content, pos


def validate_block(buf: Buffer) -> BlockLayout:
    """Checks everything but the frame contents (whose checksums decompression verifies);
    raises :class:`BlockFormatError` on any inconsistency. ``buf`` is any bytes-like object."""
    size = len(buf)
    if size < MIN_BLOCK:
        raise _fail(f"{size} bytes is too short for a block")
    # 1. Header frame.
    if _u32(buf, 0, size) != HEADER_MAGIC:
        raise _fail("no header frame (bad magic number at byte 0)")
    payload = _u32(buf, 4, size)
    if payload < 8 or payload > MAX_HEADER_BYTES or payload + 8 > size:
        raise _fail("header frame size is out of bounds")
    if bytes(buf[8:12]) != PAYLOAD_MAGIC:
        raise _fail("header payload magic is not CVB1")
    header_end = 8 + payload
    raw = bytes(buf[HEADER_PREFIX:header_end])
    if _u32(buf, 12, size) != zlib.crc32(raw):
        raise _fail("header CRC32 mismatch")
    # 2. Header JSON.
    header, tensors, frames_crc = _parse_header(raw)
    # 3. Seek table, from the footer backwards.
    if _u32(buf, size - 4, size) != SEEKABLE_FOOTER_MAGIC:
        raise _fail("no seek table (bad seekable magic at the end)")
    descriptor = buf[size - 5]
    if descriptor != CHECKSUM_FLAG:
        raise _fail(f"seek table descriptor {descriptor:#x} is not 0x80")
    count = _u32(buf, size - 9, size)
    expected = 1 + sum(len(t.frame_sizes) for t in tensors)
    if count != expected:
        raise _fail(f"seek table lists {count} frames, header implies {expected}")
    table_size = count * SEEK_ENTRY + SEEK_FOOTER
    table_start = size - table_size - 8
    if table_start < header_end:
        raise _fail("seek table overlaps the header")
    if _u32(buf, table_start, size) != SEEK_TABLE_MAGIC or _u32(buf, table_start + 4, size) != table_size:
        raise _fail("seek table frame header is wrong")
    # 4. Entries against the header and the zstd frames.
    with memoryview(buf) as whole, whole.cast("B") as view:
        frames = _check_frames(view, tensors, header_end, table_start, frames_crc)
    return BlockLayout(header, tensors, frames, size)


def _check_frames(view: memoryview, tensors: List[TensorInfo], header_end: int, table_start: int,
                  frames_crc: int) -> List[List[FrameInfo]]:
    """Step 4 to 6 of :func:`validate_block`: the seek table's entries against the header's
    frame sizes and the zstd frames themselves, the frame headers' CRC, no stray bytes."""
    base = table_start + 8
    if _ENTRY.unpack_from(view, base) != (header_end, 0, 0):
        raise _fail("seek table entry 0 does not describe the header frame")
    offset = header_end
    index = 1
    crc = 0
    frames: List[List[FrameInfo]] = []
    for tensor in tensors:
        listed: List[FrameInfo] = []
        for want in tensor.frame_sizes:
            compressed, decompressed, checksum = _ENTRY.unpack_from(view, base + index * SEEK_ENTRY)
            if decompressed != want:
                raise _fail(f"frame {index}: seek table says {decompressed} bytes, header {want}")
            if compressed < 12 or compressed > table_start - offset:
                raise _fail(f"frame {index}: compressed size {compressed} is out of bounds")
            end = offset + compressed
            header_size, content, frame_end = _zstd_frame(view, offset, end, index)
            crc = zlib.crc32(view[offset:offset + header_size], crc)
            if content != decompressed:
                raise _fail(f"frame {index}: content size {content} differs from the seek table")
            if frame_end != end:
                raise _fail(f"frame {index}: zstd frame length differs from the seek table")
            if _U32.unpack_from(view, end - 4)[0] != checksum:
                raise _fail(f"frame {index}: checksum differs from the seek table")
            listed.append(FrameInfo(offset, compressed, decompressed, checksum))
            offset = end
            index += 1
        frames.append(listed)
    # 5. Frame headers CRC.
    if crc != frames_crc:
        raise _fail("zstd frame headers do not match the header's frame_headers_crc32")
    # 6. No stray bytes.
    if offset != table_start:
        raise _fail(f"{table_start - offset} stray bytes between the last frame and the seek table")
    return frames


# --- decompression -------------------------------------------------------------------------

_local = threading.local()


def _dctx() -> zstandard.ZstdDecompressor:
    # A ZstdDecompressor must not be used by two threads at once; one per thread.
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def _readinto_tensor(src: memoryview, dest: memoryview) -> int:
    with _dctx().stream_reader(src, read_across_frames=True) as reader:
        return reader.readinto(dest)


def _copy_per_frame(buf: memoryview, frames: Sequence[FrameInfo], dest: np.ndarray) -> None:
    dctx = _dctx()
    pos = 0
    for f in frames:
        with buf[f.offset:f.offset + f.compressed_size] as src:
            data = dctx.decompress(src, max_output_size=f.decompressed_size)
        if len(data) != f.decompressed_size:
            raise _fail(f"frame at byte {f.offset} decompressed to {len(data)} bytes, not {f.decompressed_size}")
        dest[pos:pos + len(data)] = np.frombuffer(data, dtype=np.uint8)
        pos += len(data)


# -- decompression on several threads ------------------------------------------------------------

#: Tensors below this size are decompressed by the calling thread alone: for them, handing runs
#: to other threads costs about what those threads save.
PARALLEL_MIN_BYTES = 4 << 20

#: Helper threads at most (``Client(decompress_threads=)`` allows up to 64, less the caller's).
MAX_HELPERS = 63

_pool: Optional[ThreadPoolExecutor] = None
_pool_lock = threading.Lock()


def _helpers() -> ThreadPoolExecutor:
    """The shared helper threads (started as runs need them, up to :data:`MAX_HELPERS`), made at
    first use, and again in a forked child, which has none of its parent's threads."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(MAX_HELPERS, thread_name_prefix="clipvisor-decompress")
        return _pool


def frame_runs(frames: Sequence[FrameInfo], count: int) -> List[Tuple[int, int, int, int]]:
    """Splits ``frames`` into at most ``count`` runs of consecutive frames with about equal output:
    ``(first, end, output offset, output bytes)`` each, covering every frame once, in order."""
    total = sum(f.decompressed_size for f in frames)
    runs: List[Tuple[int, int, int, int]] = []
    first, start, done = 0, 0, 0
    for i, f in enumerate(frames):
        done += f.decompressed_size
        # Close a run once its share is reached, keeping a frame for each run still to come.
        if len(runs) < count - 1 and done * count >= total * (len(runs) + 1) and len(frames) - i - 1 >= 1:
            runs.append((first, i + 1, start, done - start))
            first, start = i + 1, done
    runs.append((first, len(frames), start, done - start))
    return runs


def _readinto_runs(whole: memoryview, frames: Sequence[FrameInfo], flat: np.ndarray, threads: int, name: str) -> None:
    """Decompresses runs of frames into their places in ``flat``: the first run on this thread,
    the others on helper threads. Returns only once every run has ended (none writes into
    ``flat`` afterwards, even when one failed)."""

    def one(run: Tuple[int, int, int, int]) -> None:
        first, end, start, n = run
        a, b = frames[first], frames[end - 1]
        with whole[a.offset:b.offset + b.compressed_size] as src, \
                memoryview(flat)[start:start + n] as dest:  # type: ignore[arg-type]
            got = _readinto_tensor(src, dest)
        if got != n:
            raise _fail(f"tensor {name!r}: frames {first}..{end - 1} decompressed to {got} bytes, not {n}")

    runs = frame_runs(frames, min(threads, MAX_HELPERS + 1))
    pool = _helpers()
    pending = [pool.submit(one, run) for run in runs[1:]]
    try:
        one(runs[0])
    finally:
        wait(pending)
    for future in pending:
        future.result()  # the first failure, if any


_strategy: Optional[str] = None
_strategy_lock = threading.Lock()


# -- block fds across fork ------------------------------------------------------------------------
#
# A block's memfd (and its mapping) keeps the supervisor's pages charged until every copy is gone;
# a child forked while one is open (a DataLoader worker) must not keep a copy, and nothing in the
# child ever reads it. So:
#
# - fds are received O_CLOEXEC (nothing survives exec) and tracked here from receipt until closed;
# - mappings are made MADV_DONTFORK, and each live mapping is tracked too: Python's mmap keeps a
#   dup of the fd while the mapping lives, and the child must never deallocate an inherited mmap
#   object whose mapping it does not have (its munmap would unmap whatever the child has put at
#   that address since), so the child keeps such objects alive for good;
# - receiving an fd and mapping a block happen under a fork guard, which a fork waits for, so a
#   child never sees an fd not yet tracked or a mapping not yet MADV_DONTFORK;
# - a forked child closes every fd it inherited that refers to a tracked block.
#
# Tracking is by (st_dev, st_ino) as well as by number: an fd closed behind the registry's back
# (os.close by a caller) may have its number reused by another file, which must be left alone.

_fork_guard = threading.Lock()
_fds_lock = threading.Lock()
_open_fds: Dict[int, Tuple[int, int]] = {}  # received fd → identity of its file
_live_maps: "weakref.WeakKeyDictionary[mmap.mmap, Tuple[int, int]]" = weakref.WeakKeyDictionary()
_pinned_in_child: List[mmap.mmap] = []  # inherited mmap objects whose mapping this process lacks


def fork_guard() -> "threading.Lock":
    """The lock held while receiving block fds and mapping blocks; a fork waits for it."""
    return _fork_guard


def _identity(fd: int) -> Optional[Tuple[int, int]]:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def track_fd(fd: int, cloexec: bool = False) -> None:
    """Records a block fd as open in this process (closed in forked children). With `cloexec`,
    also sets its close-on-exec flag (when it was not received with MSG_CMSG_CLOEXEC)."""
    if cloexec:
        try:
            os.set_inheritable(fd, False)
        except OSError:
            pass
    ident = _identity(fd)
    if ident is None:
        return
    with _fds_lock:
        _open_fds[fd] = ident


def close_fd(fd: int) -> None:
    """Closes an fd, forgetting it if it was a tracked block fd."""
    with _fds_lock:
        _open_fds.pop(fd, None)
    try:
        os.close(fd)
    except OSError:
        pass


def close_tracked_fd(fd: int) -> None:
    """Closes `fd` only if it is a tracked block fd not closed yet (after fork, where the child
    hook below may already have closed it: the number must then not be closed twice)."""
    with _fds_lock:
        if _open_fds.pop(fd, None) is None:
            return
    try:
        os.close(fd)
    except OSError:
        pass


def _track_mapping(mm: mmap.mmap, ident: Tuple[int, int]) -> None:
    with _fds_lock:
        _live_maps[mm] = ident  # until closed, or the object goes


def _untrack_mapping(mm: mmap.mmap) -> None:
    with _fds_lock:
        _live_maps.pop(mm, None)


def _before_fork() -> None:
    _fork_guard.acquire()


def _after_fork_in_parent() -> None:
    _fork_guard.release()


def _after_fork_in_child() -> None:
    global _strategy_lock, _fds_lock, _fork_guard, _pool_lock, _pool
    # A parent thread may have held these locks at the fork; it does not exist here.
    _strategy_lock = threading.Lock()
    _fds_lock = threading.Lock()
    _fork_guard = threading.Lock()
    _pool_lock = threading.Lock()
    _pool = None  # its threads stayed in the parent
    maps = list(_live_maps.items())
    _pinned_in_child.extend(mm for mm, _ in maps)  # never deallocated here, so never munmapped
    _live_maps.clear()
    idents = set(_open_fds.values()) | {ident for _, ident in maps}
    numbers = list(_open_fds)
    _open_fds.clear()
    if not idents:
        return
    try:
        numbers = [int(n) for n in os.listdir("/proc/self/fd")]  # every copy, mmap's dups included
    except (OSError, ValueError):
        pass
    for fd in numbers:
        if _identity(fd) in idents:
            try:
                os.close(fd)
            except OSError:
                pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


def _self_test() -> str:
    """'readinto' when the single-pass readinto path rejects corrupt content in a first, middle
    and last frame with this zstandard build (it does with libzstd ≥ 1.3); else 'decompress'."""
    # Incompressible test data from the standard library's generator, not numpy.random: numpy
    # imports that lazily, and a fork while another thread is importing it leaves the child
    # blocked on the module's import lock.
    rng = random.Random(1)
    parts = [rng.randbytes(n) for n in (200_000, 1_000, 70_000)]
    for level in (-1000, 3):
        c = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
        frames = [c.compress(p) for p in parts]
        good = b"".join(frames)
        out = bytearray(sum(map(len, parts)))
        try:
            if _readinto_tensor(memoryview(good), memoryview(out)) != len(out) or bytes(out) != b"".join(parts):
                return "decompress"
        except zstandard.ZstdError:
            return "decompress"
        start = 0
        for frame in frames:
            for pos in (start + len(frame) // 2, start + len(frame) - 5, start + len(frame) - 1):
                bad = bytearray(good)
                bad[pos] ^= 0x10
                try:
                    _readinto_tensor(memoryview(bytes(bad)), memoryview(out))
                except zstandard.ZstdError:
                    continue
                return "decompress"
            start += len(frame)
    return "readinto"


def decompression_strategy() -> str:
    """The strategy in use: ``"readinto"`` (fast) or ``"decompress"`` (fallback)."""
    global _strategy
    if _strategy is None:
        with _strategy_lock:
            if _strategy is None:
                _strategy = _self_test()
    return _strategy


def decompress_tensor(buf: Buffer, layout: BlockLayout, index: int, out: Optional[np.ndarray] = None,
                      threads: int = 1) -> np.ndarray:
    """Decompresses tensor ``index`` of a validated block into ``out`` (or a new array of the
    tensor's shape and dtype from :data:`clipvisor.buffers.default_arrays`), verifying every
    frame's content checksum. With ``threads`` > 1, a tensor of at least
    :data:`PARALLEL_MIN_BYTES` is split into runs of whole frames, decompressed by that many
    threads at once (zstd releases the GIL)."""
    info = layout.tensors[index]
    frames = layout.frames[index]
    if out is None:
        out = default_arrays(info.name, info.shape, np.dtype(info.dtype))
    elif out.shape != info.shape or out.dtype != info.dtype or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writable C-contiguous {info.dtype} array of shape {info.shape}")
    nbytes = info.nbytes
    if nbytes == 0 and not frames:
        return out
    flat = out.reshape(-1).view(np.uint8)
    with memoryview(buf) as whole:
        try:
            if decompression_strategy() == "readinto" and nbytes > 0:
                if threads > 1 and nbytes >= PARALLEL_MIN_BYTES and len(frames) > 1:
                    _readinto_runs(whole, frames, flat, threads, info.name)
                else:
                    first, last = frames[0], frames[-1]
                    with whole[first.offset:last.offset + last.compressed_size] as src, \
                            memoryview(flat) as dest:  # type: ignore[arg-type]
                        got = _readinto_tensor(src, dest)
                    if got != nbytes:
                        raise _fail(f"tensor {info.name!r} decompressed to {got} bytes, not {nbytes}")
                # Empty frames produce no output, so readinto may stop before those at the end;
                # check their checksums one by one (they do not occur in practice).
                empties = [f for f in frames if f.decompressed_size == 0]
                if empties:
                    _copy_per_frame(whole, empties, flat)
            else:
                _copy_per_frame(whole, frames, flat)
        except zstandard.ZstdError as exc:
            raise _fail(f"tensor {info.name!r}: {exc}") from None
    return out


Allocator = Callable[[str, Tuple[int, ...], np.dtype], np.ndarray]
"""Where a block's tensors are decompressed: called with the tensor's name (``"video"``,
``"audio"``), shape and dtype; returns a writable C-contiguous array of exactly that shape and
dtype (a reused buffer, pinned memory for GPU copies, a slice of a batch). See
:class:`clipvisor.ReusedBuffers` and docs/python-client.md, "Decoding into your own buffers"."""


def _allocated(allocator: Allocator, info: TensorInfo) -> np.ndarray:
    out = allocator(info.name, info.shape, np.dtype(info.dtype))
    if not isinstance(out, np.ndarray) or out.shape != info.shape or out.dtype != np.dtype(info.dtype) \
            or not out.flags.c_contiguous or not out.flags.writeable:
        got = (f"a {'writable' if out.flags.writeable else 'read-only'} "
               f"{'C-contiguous' if out.flags.c_contiguous else 'strided'} {out.dtype} array of shape {out.shape}"
               if isinstance(out, np.ndarray) else type(out).__name__)
        raise ValueError(f"the allocator returned {got} for tensor {info.name!r}; it must return a writable "
                         f"C-contiguous {info.dtype} array of shape {info.shape}")
    return out


def read_block(buf: Buffer, allocator: Optional[Allocator] = None, threads: int = 1) -> Block:
    """Validates a block and decompresses every tensor into a new numpy array, or into the
    array ``allocator`` returns for it; on up to ``threads`` threads (see
    :func:`decompress_tensor`)."""
    layout = validate_block(buf)
    block = Block(layout.header)
    for i, info in enumerate(layout.tensors):
        out = _allocated(allocator, info) if allocator is not None else None
        block.tensors[info.name] = decompress_tensor(buf, layout, i, out, threads)
    return block


def check_seals(fd: int) -> None:
    """Raises :class:`BlockFormatError` unless ``fd`` is a memfd sealed against shrink, grow and
    write: only then can its bytes not change (or vanish) under a reader's mapping."""
    try:
        seals = fcntl.fcntl(fd, F_GET_SEALS)
    except OSError as exc:
        raise BlockFormatError(f"invalid block: the fd is not a sealable memfd ({exc.strerror})") from None
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        raise BlockFormatError(f"invalid block: the memfd is not sealed (seals {seals:#x})")


def _map(fd: int, size: int) -> mmap.mmap:
    # Under the fork guard: a child forked meanwhile must not inherit the mapping before it is
    # MADV_DONTFORK, nor the mmap object's dup of the fd before it is tracked.
    with _fork_guard:
        flags = mmap.MAP_SHARED | MAP_POPULATE
        try:
            mm = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)
        except OSError:
            if not MAP_POPULATE:
                raise
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        if _MADV_DONTFORK is not None:
            try:
                mm.madvise(_MADV_DONTFORK)
            except (OSError, ValueError):
                pass
        ident = _identity(fd)
        if ident is not None:
            _track_mapping(mm, ident)
    return mm


_MADV_DONTFORK = getattr(mmap, "MADV_DONTFORK", None) if hasattr(mmap.mmap, "madvise") else None


def _unmap(mm: mmap.mmap) -> None:
    if _pinned_in_child and any(p is mm for p in _pinned_in_child):
        return  # inherited across a fork (from within read_block_fd): not mapped here, not ours to unmap
    try:
        mm.close()
    except BufferError:  # a view is still exported; the mapping goes when it does
        return
    _untrack_mapping(mm)


def read_block_fd(fd: int, *, require_seals: bool = True, close: bool = True,
                  allocator: Optional[Allocator] = None, threads: int = 1) -> Block:
    """Reads a block from an fd: checks the seals (unless ``require_seals`` is false, e.g. for
    a cache file), maps it read-only, closes the fd (when ``close``), validates and decompresses
    every tensor into new arrays (or those ``allocator`` returns), and unmaps before returning —
    the pages of a supervisor's memfd stay charged to the service until both the fd and the
    mapping are gone."""
    try:
        if require_seals:
            check_seals(fd)
        size = os.fstat(fd).st_size
        if size < MIN_BLOCK:
            raise _fail(f"{size} bytes is too short for a block")
        mm = _map(fd, size)
    finally:
        if close:
            close_fd(fd)
    try:
        return read_block(mm, allocator, threads)
    finally:
        _unmap(mm)


def read_block_file(path: Union[str, os.PathLike]) -> Block:
    """Reads a block stored as a file (a cache on disk); no seals are required."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    return read_block_fd(fd, require_seals=False, close=True)
