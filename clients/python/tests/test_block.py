"""The pure-Python block reader against blocks from the test-only writer (docs/block-format.md)."""

from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np
import pytest

from blockwriter import (
    ALL_SEALS,
    F_SEAL_GROW,
    F_SEAL_SHRINK,
    F_SEAL_WRITE,
    memfd_with,
    natural_frames,
    video_result,
    write_block,
)
from clipvisor import BlockFormatError, ClipvisorError
from clipvisor import block as B
from forking import status_in_child


def small_block(level: int = -1000) -> tuple:
    rng = np.random.default_rng(7)
    video = rng.integers(0, 256, (2, 3, 4, 6), dtype=np.uint8)
    audio = rng.standard_normal((2, 5)).astype(np.float32)
    blob = write_block([("video", video, "TCHW"), ("audio", audio, "CN")], video_result(video), level=level,
                       audio_chunk=3)
    return blob, video, audio


@pytest.mark.parametrize("level", [-1000, -5, 3])
def test_round_trip_video_and_audio(level: int) -> None:
    frames = np.ascontiguousarray(natural_frames(3, 36, 64).transpose(0, 3, 1, 2))
    audio = np.random.default_rng(1).standard_normal((2, 40000)).astype(np.float32)
    blob = write_block([("video", frames, "TCHW"), ("audio", audio, "CN")], video_result(frames), level=level)
    block = B.read_block(blob)
    assert block.tensors["video"].dtype == np.uint8 and block.tensors["video"].shape == frames.shape
    assert np.array_equal(block.tensors["video"], frames)
    assert block.tensors["audio"].dtype == np.float32 and np.array_equal(block.tensors["audio"], audio)
    assert block.result["video"]["pts"] == video_result(frames)["video"]["pts"]


def test_round_trip_thwc_and_large_frames() -> None:
    frames = natural_frames(2, 252, 448)  # > 128 KiB per frame: several zstd blocks each
    blob = write_block([("video", frames, "THWC")], video_result(frames, "THWC"))
    assert np.array_equal(B.read_block(blob).tensors["video"], frames)


def test_zero_frames_and_empty_frames() -> None:
    empty = np.zeros((0, 3, 4, 4), dtype=np.uint8)
    block = B.read_block(write_block([("video", empty, "TCHW")]))
    assert block.tensors["video"].shape == (0, 3, 4, 4)
    # Frames of zero bytes (width 0) still carry checksums that must verify.
    zero_width = np.zeros((3, 3, 4, 0), dtype=np.uint8)
    blob = write_block([("video", zero_width, "TCHW")])
    assert B.read_block(blob).tensors["video"].shape == (3, 3, 4, 0)


def test_every_flipped_byte_is_rejected() -> None:
    blob, _, _ = small_block()
    assert len(blob) > 200
    for i in range(len(blob)):
        for mask in (0x01, 0x10, 0x80, 0xFF):
            bad = bytearray(blob)
            bad[i] ^= mask
            with pytest.raises(BlockFormatError):
                B.read_block(bytes(bad))


def test_every_flipped_byte_is_rejected_compressed_frames() -> None:
    rng = np.random.default_rng(3)
    video = np.repeat(rng.integers(0, 4, (2, 3, 8, 1), dtype=np.uint8), 16, axis=3)  # compressible
    blob = write_block([("video", video, "TCHW")], level=3)
    # Really compressed (zstd compressed blocks, not stored ones).
    assert all(f.compressed_size < f.decompressed_size / 2 for f in B.validate_block(blob).frames[0])
    for i in range(len(blob)):
        for mask in (0x01, 0x10, 0x80, 0xFF):
            bad = bytearray(blob)
            bad[i] ^= mask
            with pytest.raises(BlockFormatError):
                B.read_block(bytes(bad))


def test_every_truncation_is_rejected() -> None:
    blob, _, _ = small_block()
    for n in range(len(blob)):
        with pytest.raises(BlockFormatError):
            B.read_block(blob[:n])
    # and trailing garbage too
    with pytest.raises(BlockFormatError):
        B.read_block(blob + b"\0")


def test_fallback_strategy_is_equally_strict(monkeypatch: pytest.MonkeyPatch) -> None:
    assert B.decompression_strategy() == "readinto"
    monkeypatch.setattr(B, "_strategy", "decompress")
    blob, video, audio = small_block()
    block = B.read_block(blob)
    assert np.array_equal(block.tensors["video"], video) and np.array_equal(block.tensors["audio"], audio)
    layout = B.validate_block(blob)
    for f in layout.frames[0]:
        # a content byte of each stored frame (after header and the 3-byte block header)
        bad = bytearray(blob)
        bad[f.offset + f.compressed_size - 6] ^= 0x01
        with pytest.raises(BlockFormatError):
            B.read_block(bytes(bad))


def test_errors_are_clipvisor_errors_not_index_errors() -> None:
    for junk in (b"", b"\0" * 33, b"\x50\x2a\x4d\x18" + b"\xff" * 60, os.urandom(1000)):
        with pytest.raises(BlockFormatError) as info:
            B.read_block(junk)
        assert isinstance(info.value, ClipvisorError)


def rebuild(header: dict, blob: bytes) -> bytes:
    """`blob` with its header JSON replaced (CRC and seek table entry 0 fixed up)."""
    payload = struct.unpack_from("<I", blob, 4)[0]
    old_end = 8 + payload
    js = json.dumps(header).encode()
    head = struct.pack("<II", 0x184D2A50, 8 + len(js)) + b"CVB1" + struct.pack("<I", zlib.crc32(js)) + js
    rest = bytearray(blob[old_end:])
    n = struct.unpack_from("<I", rest, len(rest) - 9)[0]
    table = len(rest) - (12 * n + 9) - 8
    struct.pack_into("<I", rest, table + 8, len(head))
    return head + bytes(rest)


def header_of(blob: bytes) -> dict:
    payload = struct.unpack_from("<I", blob, 4)[0]
    return json.loads(blob[16:8 + payload])


@pytest.mark.parametrize("change, message", [
    (lambda h: h.update(version=2), "version"),
    (lambda h: h.update(version=True), "version"),
    (lambda h: h.update(format="other"), "format"),
    (lambda h: h["tensors"].append(dict(h["tensors"][0])), "twice"),
    (lambda h: h["tensors"][0].update(dtype="float64"), "dtype"),
    (lambda h: h["tensors"][0].update(shape=[2, 3, -4, 6]), "shape"),
    (lambda h: h["tensors"][0].update(shape=[2, 3, 4, 7]), "add up"),
    (lambda h: h.pop("result"), "lacks"),
    (lambda h: h.update(frame_headers_crc32=h["frame_headers_crc32"] ^ 1), "frame_headers_crc32"),
])
def test_header_checks(change, message: str) -> None:
    blob, _, _ = small_block()
    header = header_of(blob)
    change(header)
    with pytest.raises(BlockFormatError, match=message):
        B.read_block(rebuild(header, blob))


def test_unknown_header_keys_are_ignored() -> None:
    blob, video, _ = small_block()
    header = header_of(blob)
    header["future_key"] = {"x": 1}
    assert np.array_equal(B.read_block(rebuild(header, blob)).tensors["video"], video)


def test_frames_without_checksum_or_content_size_are_rejected() -> None:
    video = np.random.default_rng(0).integers(0, 256, (1, 3, 4, 4), dtype=np.uint8)
    for options, message in (({"write_checksum": False}, "no content checksum"),
                             ({"write_content_size": False}, "no content size")):
        blob = write_block([("video", video, "TCHW")], frame_options=options)
        with pytest.raises(BlockFormatError, match=message):
            B.read_block(blob)


def test_seals_required_for_memfds() -> None:
    blob, video, _ = small_block()
    fd = memfd_with(blob)
    assert np.array_equal(B.read_block_fd(fd).tensors["video"], video)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by the reader
    for seals in (0, F_SEAL_SHRINK | F_SEAL_GROW, F_SEAL_WRITE):
        fd = memfd_with(blob, seals)
        with pytest.raises(BlockFormatError, match="sealed"):
            B.read_block_fd(fd)
        with pytest.raises(OSError):
            os.fstat(fd)  # closed on error too
    fd = memfd_with(blob, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE)  # no F_SEAL_SEAL: still safe
    B.read_block_fd(fd)


def test_regular_files_need_require_seals_false(tmp_path) -> None:
    blob, video, _ = small_block()
    path = tmp_path / "clip.cvb"
    path.write_bytes(blob)
    fd = os.open(path, os.O_RDONLY)
    with pytest.raises(BlockFormatError, match="memfd"):
        B.read_block_fd(fd)
    assert np.array_equal(B.read_block_file(path).tensors["video"], video)


def test_tampered_memfd_rejected_and_closed() -> None:
    blob, _, _ = small_block()
    bad = bytearray(blob)
    bad[-30] ^= 0x80
    fd = memfd_with(bytes(bad), ALL_SEALS)
    with pytest.raises(BlockFormatError):
        B.read_block_fd(fd)
    with pytest.raises(OSError):
        os.fstat(fd)


def test_decompress_into_caller_array() -> None:
    blob, video, _ = small_block()
    layout = B.validate_block(blob)
    out = np.empty(video.shape, np.uint8)
    assert B.decompress_tensor(blob, layout, 0, out) is out
    assert np.array_equal(out, video)
    with pytest.raises(ValueError):
        B.decompress_tensor(blob, layout, 0, np.empty((1,), np.uint8))


# -- decompression on several threads ---------------------------------------------------------------


def big_block(level: int = -1000) -> tuple:
    """Video over PARALLEL_MIN_BYTES (14 frames of 448x252), and audio beside it."""
    frames = np.ascontiguousarray(natural_frames(14, 252, 448, seed=3).transpose(0, 3, 1, 2))
    audio = np.random.default_rng(2).standard_normal((1, 48000)).astype(np.float32)
    assert frames.nbytes >= B.PARALLEL_MIN_BYTES
    blob = write_block([("video", frames, "TCHW"), ("audio", audio, "CN")], video_result(frames), level=level)
    return blob, frames, audio


def test_frame_runs_cover_every_frame_once_in_order_with_about_equal_output() -> None:
    def frames_of(sizes: list) -> list:
        return [B.FrameInfo(offset=i, compressed_size=1, decompressed_size=n, checksum=0) for i, n in enumerate(sizes)]

    cases = [[100] * 12, [100] * 3, [5, 500, 5, 5, 500], [0, 0, 100, 0], [1], [7] * 100, [100, 0, 0, 0, 0, 100]]
    for sizes in cases:
        frames = frames_of(sizes)
        for count in (1, 2, 3, 4, 8, 200):
            runs = B.frame_runs(frames, count)
            assert 1 <= len(runs) <= min(count, len(frames)), (sizes, count, runs)
            assert runs[0][0] == 0 and runs[-1][1] == len(frames)
            offset = 0
            for (first, end, start, n), nxt in zip(runs, runs[1:] + [(len(frames),)]):
                assert first < end == nxt[0], (sizes, count, runs)  # non-empty, consecutive
                assert start == offset and n == sum(sizes[first:end])
                offset += n
    even = B.frame_runs(frames_of([100] * 12), 4)
    assert [n for *_, n in even] == [300, 300, 300, 300]


@pytest.mark.parametrize("level", [-1000, 3])
def test_several_threads_decompress_the_same_bytes(level: int) -> None:
    blob, frames, audio = big_block(level)
    for threads in (2, 3, 8):
        block = B.read_block(blob, threads=threads)
        assert np.array_equal(block.tensors["video"], frames) and np.array_equal(block.tensors["audio"], audio)


def test_several_threads_reject_a_damaged_frame_in_any_run() -> None:
    blob, _, _ = big_block()
    layout = B.validate_block(blob)
    video = layout.frames[0]
    for frame in (video[0], video[5], video[-1]):  # in the first (this thread's), a middle and the last run
        bad = bytearray(blob)
        bad[frame.offset + frame.compressed_size // 2] ^= 0x10
        with pytest.raises(BlockFormatError, match="tensor 'video'"):
            B.read_block(bytes(bad), threads=4)
    assert np.array_equal(B.read_block(blob, threads=4).tensors["video"], B.read_block(blob).tensors["video"])


def test_a_forked_child_decompresses_on_threads_of_its_own() -> None:
    blob, frames, _ = big_block()
    assert np.array_equal(B.read_block(blob, threads=3).tensors["video"], frames)  # the parent's threads exist

    def child() -> bool:
        return bool(np.array_equal(B.read_block(blob, threads=3).tensors["video"], frames))

    assert status_in_child(child) == 0, "the child hung on the parent's helper threads, or decoded wrong bytes"


# -- fork safety -------------------------------------------------------------------------------------


def test_fork_while_another_thread_holds_the_strategy_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    monkeypatch.setattr(B, "_strategy", None)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with B._strategy_lock:  # as a thread running the self-test does
            held.set()
            release.wait(60)

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    assert held.wait(20)
    try:
        code = status_in_child(lambda: B.decompression_strategy() in ("readinto", "decompress"))
    finally:
        release.set()
        t.join(20)
    assert code == 0, f"the child could not take the strategy lock (exit {code}; -14 is SIGALRM: deadlock)"


def _memfd_copies(ident) -> tuple:
    """(fds, mappings) of this process that refer to the file `ident` (st_dev, st_ino)."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == ident:
            fds.append(int(name))
    with open("/proc/self/maps") as f:
        maps = [line for line in f if len(line.split()) >= 5 and line.split()[4] == str(ident[1]) and "memfd:" in line]
    return fds, maps


def test_forked_child_does_not_inherit_a_block_being_read(monkeypatch: pytest.MonkeyPatch) -> None:
    blob, video, audio = small_block()
    fd = memfd_with(blob, name="clipvisor-block")
    st = os.fstat(fd)
    ident = (st.st_dev, st.st_ino)
    B.track_fd(fd)  # as the protocol layer does on receipt
    seen = {}
    real_read_block = B.read_block

    def read_block_and_fork(buf, allocator=None, threads=1):
        # The fd is closed by now; the mapping (and the mmap object's own dup of the fd) live.
        seen["parent"] = _memfd_copies(ident)
        seen["child"] = status_in_child(lambda: _memfd_copies(ident) == ([], []))
        return real_read_block(buf, allocator, threads)

    monkeypatch.setattr(B, "read_block", read_block_and_fork)
    block = B.read_block_fd(fd)
    assert np.array_equal(block.tensors["video"], video)
    fds, maps = seen["parent"]
    assert len(fds) == 1 and fd not in B._open_fds and maps  # the mmap's dup, and the mapping
    assert seen["child"] == 0, "the forked child kept a copy of the block's memfd or mapping"
    assert _memfd_copies(ident) == ([], [])  # and the parent let go of everything once read


def test_child_never_unmaps_an_inherited_live_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    """A block mapping still alive at the fork (a view of it outlived read_block_fd, as one in a
    traceback can) is MADV_DONTFORK, so the child lacks it: the child must never deallocate the
    inherited mmap object, whose munmap would hit whatever the child has put at that address."""
    frames = natural_frames(8, 256, 256)
    blob = write_block([("video", frames, "THWC")], video_result(frames, "THWC"), level=-1000)
    stash = []
    real_read_block = B.read_block

    def keep_a_view(buf, allocator=None, threads=1):
        stash.append(memoryview(buf))
        return real_read_block(buf, allocator, threads)

    monkeypatch.setattr(B, "read_block", keep_a_view)
    B.read_block_fd(memfd_with(blob))
    monkeypatch.setattr(B, "read_block", real_read_block)
    assert len(B._live_maps) >= 1  # still mapped: its close() found the view

    def child() -> bool:
        arrays = [np.full(len(blob) // 8 + 1000, 1.0) for _ in range(40)]  # may reuse the range
        stash.clear()
        import gc

        gc.collect()
        return all(float(a[-1]) == 1.0 for a in arrays) and float(sum(a.sum() for a in arrays)) > 0

    try:
        assert status_in_child(child) == 0
    finally:
        stash.clear()
    import gc

    gc.collect()


def test_forked_child_closes_received_block_fds() -> None:
    blob, _, _ = small_block()
    fd = memfd_with(blob, name="clipvisor-block")
    st = os.fstat(fd)
    ident = (st.st_dev, st.st_ino)
    B.track_fd(fd)
    try:
        assert status_in_child(lambda: _memfd_copies(ident) == ([], [])) == 0
        assert _memfd_copies(ident)[0] == [fd]  # the parent's stays open
    finally:
        B.close_fd(fd)
    assert fd not in B._open_fds


def test_child_leaves_alone_an_fd_number_reused_after_an_untracked_close() -> None:
    blob, _, _ = small_block()
    fd = memfd_with(blob, name="clipvisor-block")
    B.track_fd(fd)
    os.close(fd)  # behind the registry's back
    r, w = os.pipe()
    try:
        reused = r if r == fd else (w if w == fd else None)
        if reused is None:
            pytest.skip("the fd number was not reused")
        assert status_in_child(lambda: os.fstat(reused) is not None) == 0
    finally:
        os.close(r)
        os.close(w)
        B._open_fds.pop(fd, None)
