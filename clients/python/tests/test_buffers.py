"""Decoding into the caller's memory: allocators, ReusedBuffers, and their errors. Unit tests on
blocks from the test writer; the same against the real supervisor at the end."""

from __future__ import annotations

import os
import pickle
import threading
from typing import Dict, List, Tuple

import numpy as np
import pytest

import clipvisor
from blockwriter import natural_frames, video_result, write_block
from clipvisor import block as B
from conftest import BINARY, open_fds


def _block(frames: int, rng_seed: int = 1) -> Tuple[bytes, np.ndarray, np.ndarray]:
    video = np.ascontiguousarray(natural_frames(frames, 24, 40, seed=rng_seed).transpose(0, 3, 1, 2))
    audio = np.random.default_rng(rng_seed).standard_normal((1, 3000)).astype(np.float32)
    blob = write_block([("video", video, "TCHW"), ("audio", audio, "CN")], video_result(video))
    return blob, video, audio


def test_an_allocator_receives_each_tensor_and_the_data_lands_in_its_arrays() -> None:
    blob, video, audio = _block(3)
    calls: List[Tuple[str, Tuple[int, ...], np.dtype]] = []
    given: Dict[str, np.ndarray] = {}

    def allocator(name: str, shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        calls.append((name, shape, dtype))
        given[name] = np.full(shape, 7, dtype=dtype)
        return given[name]

    block = B.read_block(blob, allocator)
    assert calls == [("video", video.shape, np.dtype(np.uint8)), ("audio", audio.shape, np.dtype(np.float32))]
    assert block.tensors["video"] is given["video"] and np.array_equal(given["video"], video)
    assert block.tensors["audio"] is given["audio"] and np.array_equal(given["audio"], audio)


@pytest.mark.parametrize("wrong", ["shape", "dtype", "strided", "readonly", "list"])
def test_an_allocator_that_returns_the_wrong_array_is_named_in_the_error(wrong: str) -> None:
    blob, video, _ = _block(2)

    def allocator(name: str, shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        if wrong == "shape":
            return np.empty((shape[0] + 1,) + tuple(shape[1:]), dtype=dtype)
        if wrong == "dtype":
            return np.empty(shape, dtype=np.float64 if name == "video" else np.uint8)
        if wrong == "strided":
            return np.empty(tuple(shape[:-1]) + (shape[-1] * 2,), dtype=dtype)[..., ::2]
        if wrong == "readonly":
            a = np.empty(shape, dtype=dtype)
            a.flags.writeable = False
            return a
        return [0]  # type: ignore[return-value]

    with pytest.raises(ValueError, match=r"the allocator returned .* for tensor 'video'; it must return a writable "
                                         r"C-contiguous uint8 array of shape \(2, 3, 24, 40\)"):
        B.read_block(blob, allocator)


def test_a_failing_allocator_leaves_no_fd_and_no_mapping() -> None:
    from blockwriter import memfd_with

    blob, _, _ = _block(2)
    before = open_fds()

    def allocator(name: str, shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        raise MemoryError("no pinned memory left")

    for _ in range(20):
        fd = memfd_with(blob)
        with pytest.raises(MemoryError, match="no pinned memory left"):
            B.read_block_fd(fd, allocator=allocator)
    assert open_fds() == before
    with open("/proc/self/maps") as f:
        assert "memfd:" not in f.read()


def test_reused_buffers_reuse_one_buffer_per_tensor_and_grow_when_needed() -> None:
    buffers = clipvisor.ReusedBuffers()
    small, video_small, _ = _block(2)
    large, video_large, audio_large = _block(5, rng_seed=2)
    first = B.read_block(small, buffers).tensors["video"]
    assert np.array_equal(first, video_small)
    grown = B.read_block(large, buffers).tensors
    assert np.array_equal(grown["video"], video_large) and np.array_equal(grown["audio"], audio_large)
    capacity = buffers.capacity()
    again = B.read_block(small, buffers).tensors["video"]
    assert np.array_equal(again, video_small)
    assert np.shares_memory(again, grown["video"]), "a smaller clip did not reuse the grown buffer"
    assert buffers.capacity() == capacity, "the buffer was reallocated for a smaller clip"
    # The documented cost: the previous result was overwritten in place.
    assert not np.array_equal(grown["video"][:2], video_large[:2])


def test_reused_buffers_never_share_memory_between_threads() -> None:
    buffers = clipvisor.ReusedBuffers()
    blob, video, _ = _block(3)
    results: List[np.ndarray] = []
    lock = threading.Lock()

    def work() -> None:
        out = B.read_block(blob, buffers).tensors["video"]
        with lock:
            results.append(out)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(np.array_equal(r, video) for r in results)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.shares_memory(results[i], results[j])


def test_reused_buffers_pickle_empty_and_clients_carry_their_allocator() -> None:
    buffers = clipvisor.ReusedBuffers()
    blob, _, _ = _block(2)
    B.read_block(blob, buffers)
    assert buffers.capacity() > 0
    copy = pickle.loads(pickle.dumps(buffers))
    assert isinstance(copy, clipvisor.ReusedBuffers) and copy.capacity() == 0
    client = clipvisor.Client("/nonexistent.sock", spawn=False, allocator=buffers)
    clone = pickle.loads(pickle.dumps(client))
    assert isinstance(clone.allocator, clipvisor.ReusedBuffers)


def test_sample_refuses_reused_buffers_before_sending_anything() -> None:
    client = clipvisor.Client("/nonexistent.sock", spawn=False, allocator=clipvisor.ReusedBuffers())
    with pytest.raises(ValueError, match="a sample's clips would overwrite each other"):
        client.sample(["/a.mp4", "/b.mp4"])


# -- RecycledArrays: new arrays whose memory comes back when they die -----------------------

MiB = 1 << 20


def _address(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def test_recycled_arrays_are_ordinary_writable_arrays_of_the_asked_shape() -> None:
    pool = clipvisor.RecycledArrays()
    a = pool("video", (3, 5, 240, 320), np.dtype(np.uint8))  # 1.1 MiB
    b = pool("audio", (2, 300_000), np.dtype(np.float32))  # 2.3 MiB
    assert a.base is not None and b.base is not None
    assert a.shape == (3, 5, 240, 320) and a.dtype == np.uint8
    assert b.shape == (2, 300_000) and b.dtype == np.float32
    for arr in (a, b):
        assert arr.flags.c_contiguous and arr.flags.writeable
    a[...] = 7
    b[...] = 1.5
    assert int(a.sum()) == 7 * a.size and float(b.sum()) == 1.5 * b.size
    assert not np.shares_memory(a, b)
    # Below min_bytes: plain numpy arrays, nothing pooled.
    small = pool("audio", (10,), np.dtype(np.float32))
    assert small.base is None
    del a, b, arr, small
    granule = pool.granule
    assert pool.held_bytes() == sum(-(-n // granule) * granule for n in (3 * 5 * 240 * 320, 2 * 300_000 * 4))


def test_recycled_memory_comes_back_only_when_the_last_view_dies() -> None:
    pool = clipvisor.RecycledArrays()
    first = pool("video", (4, 1 << 20), np.dtype(np.uint8))
    where = _address(first)
    view = first[1:3].reshape(-1)  # a view outlives its array
    del first
    second = pool("video", (4, 1 << 20), np.dtype(np.uint8))
    assert _address(second) != where and not np.shares_memory(second, view)
    view[:] = 5
    second[...] = 9
    assert int(view.min()) == 5, "two live arrays share memory"
    del view
    third = pool("video", (4, 1 << 20), np.dtype(np.uint8))
    assert _address(third) == where, "the memory of a dead array was not used again"
    del second, third


def test_recycled_arrays_fit_sizes_and_keep_at_most_keep_bytes() -> None:
    pool = clipvisor.RecycledArrays(keep_bytes=8 * MiB, keep_peak=False)
    big = pool("video", (16 * MiB,), np.dtype(np.uint8))
    where = _address(big)
    del big
    assert pool.held_bytes() == 0, "a buffer over keep_bytes stayed in the pool"
    pool = clipvisor.RecycledArrays(keep_bytes=64 * MiB, keep_peak=False)
    big = pool("video", (16 * MiB,), np.dtype(np.uint8))
    where = _address(big)
    del big
    # A clip much shorter than the buffer gets memory of its own: it must not pin 16 MiB.
    short = pool("video", (3 * MiB,), np.dtype(np.uint8))
    assert _address(short) != where
    del short
    again = pool("video", (15 * MiB,), np.dtype(np.uint8))
    assert _address(again) == where, "a buffer within max_slack was not used"
    del again
    held = [pool("video", (6 * MiB,), np.dtype(np.uint8)) for _ in range(20)]
    del held
    assert pool.held_bytes() <= 64 * MiB
    with pytest.raises(ValueError):
        clipvisor.RecycledArrays(max_slack=0.5)
    with pytest.raises(ValueError):
        clipvisor.RecycledArrays(keep_bytes=-1)


def test_recycled_arrays_never_hand_live_memory_to_two_threads() -> None:
    pool = clipvisor.RecycledArrays()
    live: Dict[int, Tuple[int, int]] = {}
    lock = threading.Lock()
    errors: List[str] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        kept: List[np.ndarray] = []
        for _ in range(150):
            n = int(rng.integers(1, 5)) * MiB + int(rng.integers(0, 4096))
            a = pool("video", (n,), np.dtype(np.uint8))
            start, end = _address(a), _address(a) + n
            with lock:
                for other, (s, e) in live.items():
                    if start < e and s < end:
                        errors.append(f"thread {seed} got memory in use by array {other}")
                live[id(a)] = (start, end)
            a[::4096] = seed
            kept.append(a)
            if len(kept) > 3 or rng.random() < 0.5:
                gone = kept.pop(int(rng.integers(0, len(kept))))
                assert int(gone[::4096].min()) == seed and int(gone[::4096].max()) == seed, "another thread wrote here"
                with lock:
                    del live[id(gone)]
                del gone
        with lock:
            for a in kept:
                del live[id(a)]

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert 0 < pool.held_bytes() <= max(pool.keep_bytes, pool.peak_bytes) and pool.live_bytes == 0


def test_free_memory_is_bounded_by_keep_bytes_or_the_arrays_peak() -> None:
    pool = clipvisor.RecycledArrays(keep_bytes=4 * MiB)
    small = [pool("video", (4 * MiB,), np.dtype(np.uint8)) for _ in range(3)]
    assert pool.live_bytes == pool.peak_bytes == 12 * MiB
    del small
    # Three arrays were alive at once: their 12 MiB stay for the next three.
    assert pool.held_bytes() == 12 * MiB and pool.live_bytes == 0
    big = pool("video", (10 * MiB,), np.dtype(np.uint8))  # fits no free buffer
    del big
    # 22 MiB free against a 12 MiB peak: the three oldest buffers went first.
    assert pool.held_bytes() == 10 * MiB
    flat = clipvisor.RecycledArrays(keep_bytes=4 * MiB, keep_peak=False)
    small = [flat("video", (4 * MiB,), np.dtype(np.uint8)) for _ in range(3)]
    del small
    assert flat.held_bytes() == 4 * MiB


def test_a_sample_of_many_clips_finds_its_memory_again_at_the_next_step() -> None:
    pool = clipvisor.RecycledArrays()
    sizes = [int(n) * MiB // 4 for n in np.random.default_rng(5).integers(5, 40, size=30)]
    step = [pool("video", (n,), np.dtype(np.uint8)) for n in sizes]
    first = {_address(a) for a in step}
    del step
    step = [pool("video", (n,), np.dtype(np.uint8)) for n in sizes]
    assert {_address(a) for a in step} == first, "the second step got new memory"
    assert pool.live_bytes == pool.peak_bytes
    del step


def test_a_buffer_no_allocation_took_for_max_idle_allocations_is_dropped() -> None:
    pool = clipvisor.RecycledArrays(max_idle=4)
    odd = pool("video", (5 * MiB,), np.dtype(np.uint8))
    del odd
    for _ in range(5):
        a = pool("video", (2 * MiB,), np.dtype(np.uint8))
        del a
    assert pool.held_bytes() == 2 * MiB, "the 5 MiB buffer nobody asked for stayed"


def test_recycled_memory_beyond_keep_bytes_is_freed_as_arrays_die() -> None:
    pool = clipvisor.RecycledArrays(keep_bytes=8 * MiB, keep_peak=False)
    arrays = [pool("video", (4 * MiB,), np.dtype(np.uint8)) for _ in range(6)]
    del arrays
    # No allocation since: the pool trimmed itself when the arrays died.
    assert len(pool._free) + len(pool._returned) <= 2
    assert pool.held_bytes() <= 8 * MiB


def test_a_lease_cannot_be_copied_and_odd_dtypes_get_plain_arrays() -> None:
    import copy

    pool = clipvisor.RecycledArrays()
    a = pool("video", (2 * MiB,), np.dtype(np.uint8))
    for duplicate in (copy.copy, copy.deepcopy, lambda x: pickle.loads(pickle.dumps(x))):
        with pytest.raises(TypeError, match="cannot be copied or pickled"):
            duplicate(a.base)
    assert np.array_equal(pickle.loads(pickle.dumps(a)), a)  # the array itself pickles its data
    structured = np.dtype([("a", "<i4"), ("b", "<f4")])
    s = pool("x", (MiB,), structured)
    assert s.dtype == structured and s.shape == (MiB,) and s.base is None
    sub = pool("x", (MiB,), np.dtype(("<f4", (3,))))
    assert sub.dtype == np.float32 and sub.shape == (MiB, 3)


def test_a_child_forked_while_a_pool_is_locked_allocates_from_a_fresh_pool() -> None:
    from forking import status_in_child

    pool = clipvisor.RecycledArrays()
    inherited = pool("video", (2 * MiB,), np.dtype(np.uint8))
    inherited[...] = 3

    def child() -> bool:
        a = pool("video", (2 * MiB,), np.dtype(np.uint8))  # would deadlock on the parent's lock
        a[...] = 4
        return int(inherited.max()) == 3 and not np.shares_memory(a, inherited)

    with pool._lock:  # as if another thread were inside the pool at the fork
        code = status_in_child(child)
    assert code == 0


def test_decoding_without_an_allocator_recycles_memory_and_pickles_an_empty_pool() -> None:
    video = np.ascontiguousarray(natural_frames(40, 120, 160, seed=3).transpose(0, 3, 1, 2))
    blob = write_block([("video", video, "TCHW")], video_result(video))
    first = B.read_block(blob).tensors["video"]
    assert np.array_equal(first, video) and first.base is not None
    where = _address(first)
    del first
    second = B.read_block(blob).tensors["video"]
    assert _address(second) == where and np.array_equal(second, video)
    copy = pickle.loads(pickle.dumps(clipvisor.buffers.default_arrays))
    assert copy.held_bytes() == 0 and copy.keep_bytes == clipvisor.buffers.default_arrays.keep_bytes
    del second


# -- against the real supervisor ------------------------------------------------------------

needs_binary = pytest.mark.skipif(not os.path.exists(BINARY), reason=f"no clipvisor binary at {BINARY}")


@needs_binary
def test_the_real_supervisor_decodes_into_reused_buffers_and_an_allocator(short_dir: str) -> None:
    from test_integration import Supervisor, media

    sup = Supervisor(short_dir)
    sup.start()
    try:
        plain = clipvisor.Client(sup.path, spawn=False, margin=15.0)
        reused = clipvisor.Client(sup.path, spawn=False, margin=15.0, allocator=clipvisor.ReusedBuffers())
        path = media("decord__flipping_a_pancake.mkv")
        want = plain.video(path, fps=1.0, max_pixels=50176)
        first = reused.video(path, fps=1.0, max_pixels=50176)
        assert np.array_equal(first.frames, want.frames)
        second = reused.video(path, fps=1.0, max_pixels=50176, layout="THWC")
        assert np.shares_memory(first.frames, second.frames), "the second clip was not decoded into the same buffer"
        assert np.array_equal(second.frames, want.frames.transpose(0, 2, 3, 1))

        # A per-call allocator wins over the client's; clip() sends both tensors through it.
        seen: List[str] = []

        def allocator(name: str, shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
            seen.append(name)
            return np.empty(shape, dtype=dtype)

        c = reused.clip(path, video={"fps": 1.0, "max_pixels": 50176}, allocator=allocator)
        assert seen == ["video", "audio"] and c.audio is not None
        assert np.array_equal(c.video.frames, want.frames)
        # sample() with a fresh-memory allocator: every clip keeps its own arrays.
        results = plain.sample([path, {"path": path, "fps": 0.5}], max_pixels=50176, allocator=allocator)
        assert all(isinstance(r, clipvisor.Video) for r in results)
        assert not np.shares_memory(results[0].frames, results[1].frames)
        # A wrong allocator is the caller's mistake: ValueError, and the supervisor serves on.
        with pytest.raises(ValueError, match="for tensor 'video'"):
            plain.video(path, fps=1.0, allocator=lambda n, s, d: np.empty((1,), dtype=d))
        assert np.array_equal(plain.video(path, fps=1.0, max_pixels=50176).frames, want.frames)
        plain.close()
        reused.close()
    finally:
        sup.stop()
