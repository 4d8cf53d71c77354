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
