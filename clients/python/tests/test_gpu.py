"""GPU delivery (clipvisor.gpu): staging slots that are reused, waits before a slot is rewritten,
the allocator path that copies nothing on the host, and the errors.

No GPU is needed: the uploader takes what it needs from CUDA (page-locked memory, events,
streams) from a backend object, and `HostBackend` below gives the same on the host, logging
every event record and wait. The CUDA backend itself runs in `bench/gpu_delivery.py` on a
machine with a GPU, and in the last test here where one is present."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Any, ContextManager, List, Tuple

import numpy as np
import pytest

import clipvisor
from blockwriter import natural_frames, video_result, write_block
from clipvisor import block as B
from conftest import BINARY

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")


class RecordingEvent:
    """torch.cuda.Event's contract as the uploader uses it: `record(stream)` marks the point
    after the copies queued so far; `synchronize()` waits until then (at once, on the host)."""

    def __init__(self, log: List[Tuple[Any, ...]], number: int) -> None:
        self.log = log
        self.number = number

    def record(self, stream: Any) -> None:
        self.log.append(("record", self.number, stream))

    def synchronize(self) -> None:
        self.log.append(("wait", self.number))


class HostBackend:
    """Page-locked memory as plain memory, events that log, streams as names (on the host,
    except those named "elsewhere:..."), and a log of the tensors said to be used on a stream."""

    def __init__(self) -> None:
        self.log: List[Tuple[Any, ...]] = []
        self.pinned: List[int] = []
        self.events = 0

    def page_locked(self, nbytes: int) -> Any:
        import torch

        self.pinned.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)

    def event(self) -> RecordingEvent:
        self.events += 1
        return RecordingEvent(self.log, self.events)

    def current_stream(self) -> str:
        return "current"

    def on(self, stream: Any) -> ContextManager[Any]:
        self.log.append(("on", stream))
        return contextlib.nullcontext()

    def device_of(self, stream: Any) -> Any:
        import torch

        return torch.device("meta") if str(stream).startswith("elsewhere:") else torch.device("cpu")

    def used_on(self, tensor: Any, stream: Any) -> None:
        self.log.append(("used_on", stream))


def uploader(slots: int = 2) -> Tuple[clipvisor.gpu.CudaUploader, HostBackend]:
    backend = HostBackend()
    return clipvisor.gpu.CudaUploader("cpu", slots=slots, _backend=backend), backend


def frames(t: int, seed: int = 0) -> np.ndarray:
    return np.ascontiguousarray(natural_frames(t, 24, 40, seed=seed).transpose(0, 3, 1, 2))


def waits(log: List[Tuple[Any, ...]]) -> List[int]:
    return [entry[1] for entry in log if entry[0] == "wait"]


def records(log: List[Tuple[Any, ...]]) -> List[int]:
    return [entry[1] for entry in log if entry[0] == "record"]


def test_an_upload_has_the_arrays_values_and_no_longer_needs_the_array() -> None:
    import torch

    up, _ = uploader()
    video = frames(3)
    audio = np.random.default_rng(1).standard_normal((1, 4000)).astype(np.float32)
    want = video.copy()
    got = up.upload(video)
    video[:] = 0  # staged: the array may change as soon as upload returns
    assert got.dtype == torch.uint8 and tuple(got.shape) == want.shape
    assert torch.equal(got, torch.from_numpy(want))
    sound = up.upload(audio)
    assert sound.dtype == torch.float32 and torch.equal(sound, torch.from_numpy(audio))


def test_the_steady_state_pins_no_new_memory() -> None:
    up, backend = uploader(slots=2)
    for i in range(10):
        up.upload(frames(4, seed=i))
    assert len(backend.pinned) == 2, f"page-locked allocations: {backend.pinned}"
    assert up.capacity() == sum(backend.pinned)


def test_a_slot_is_rewritten_only_after_the_copy_that_read_it_is_waited_for() -> None:
    up, backend = uploader(slots=2)
    for i in range(5):
        up.upload(frames(2, seed=i))
    # Copies 1..5 used slots 0,1,0,1,0; each reuse waits for that slot's last copy, and each
    # wait comes after that copy was queued and before the slot's next one.
    assert records(backend.log) == [1, 2, 1, 2, 1]
    assert waits(backend.log) == [1, 2, 1]
    order = [(e[0], e[1]) for e in backend.log if e[0] in ("record", "wait")]
    assert order == [("record", 1), ("record", 2), ("wait", 1), ("record", 1), ("wait", 2), ("record", 2),
                     ("wait", 1), ("record", 1)]


def test_a_large_array_is_staged_and_queued_in_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    up, _ = uploader(slots=1)
    up.staging_piece_bytes = 1000
    copies: List[int] = []
    real_copy = torch.Tensor.copy_

    def counted_copy(self: Any, src: Any, non_blocking: bool = False) -> Any:
        copies.append(src.numel() * src.element_size())
        return real_copy(self, src, non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", counted_copy)
    audio = np.random.default_rng(3).standard_normal((2, 1300)).astype(np.float32)  # 10400 bytes
    assert torch.equal(up.upload(audio), torch.from_numpy(audio))
    assert copies == [1000] * 10 + [400], "pieces of staging_piece_bytes, each queued as soon as staged"
    video = frames(2)[:, :, ::2]  # strided: staged whole
    assert torch.equal(up.upload(video), torch.from_numpy(video.copy()))
    assert copies[11:] == [video.nbytes]


def test_a_bigger_array_grows_its_slot_by_half_again() -> None:
    up, backend = uploader(slots=1)
    up.upload(np.zeros(1000, dtype=np.uint8))
    up.upload(np.zeros(1100, dtype=np.uint8))
    up.upload(np.zeros(1400, dtype=np.uint8))
    assert backend.pinned == [1000, 1500], "grown to 1.5x, then big enough for the third"


def test_the_allocator_path_copies_nothing_on_the_host() -> None:
    import torch

    up, backend = uploader(slots=1)
    for i in range(3):
        video = frames(3, seed=i)
        blob = write_block([("video", video, "TCHW")], video_result(video))
        block = B.read_block(blob, up.allocator)
        got = up.upload(block.tensors["video"])
        assert torch.equal(got, torch.from_numpy(video))
    # One slot: a staged copy would take the slot a second time per clip (and wait for it);
    # decompressed into the slot, only each later allocation waits for the previous copy.
    assert waits(backend.log) == [1, 1]
    assert len(backend.pinned) == 1


def test_views_of_a_staged_array_upload_from_the_slot_or_as_a_copy() -> None:
    import torch

    up, backend = uploader(slots=2)
    video = frames(4)
    staged = up.allocator("video", video.shape, np.dtype(np.uint8))
    staged[:] = video
    tail = up.upload(staged[1:])  # contiguous: from the slot itself
    assert torch.equal(tail, torch.from_numpy(video[1:]))
    assert waits(backend.log) == []
    strided = up.upload(staged[:, ::2])  # not contiguous: copied into the other slot
    assert torch.equal(strided, torch.from_numpy(np.ascontiguousarray(video[:, ::2])))


def test_an_array_whose_slot_was_reused_is_refused() -> None:
    up, _ = uploader(slots=2)
    first = up.allocator("video", (2, 3, 4, 5), np.dtype(np.uint8))
    up.allocator("audio", (1, 100), np.dtype(np.float32))
    up.allocator("video", (2, 3, 4, 5), np.dtype(np.uint8))  # the first slot again
    with pytest.raises(ValueError, match="reused since: upload it before 2 more tensors"):
        up.upload(first)


def test_the_callers_stream_carries_the_copy() -> None:
    up, backend = uploader()
    up.upload(frames(1))
    up.upload(frames(1), stream="mine")
    side = clipvisor.gpu.CudaUploader("cpu", stream="side", _backend=backend)
    side.upload(frames(1))
    assert [e for e in backend.log if e[0] == "on"] == [("on", "current"), ("on", "mine"), ("on", "side")]
    assert [e[2] for e in backend.log if e[0] == "record"] == ["current", "mine", "side"]
    # A tensor copied on a side stream is marked as used on the caller's current one, so that
    # its memory is not handed out again while the caller's kernels still read it.
    assert [e for e in backend.log if e[0] == "used_on"] == [("used_on", "current"), ("used_on", "current")]
    with pytest.raises(ValueError, match="the stream is on meta"):
        up.upload(frames(1), stream="elsewhere:1")


def test_a_slot_read_on_two_streams_waits_for_both_before_it_is_rewritten() -> None:
    up, backend = uploader(slots=1)
    staged = up.allocator("video", (4, 3, 24, 40), np.dtype(np.uint8))
    staged[:] = frames(4)
    up.upload(staged[:2], stream="s1")
    up.upload(staged[2:], stream="s2")
    up.upload(frames(1))  # takes the slot again
    recorded = [(e[1], e[2]) for e in backend.log if e[0] == "record"]
    assert recorded[:2] == [(1, "s1"), (2, "s2")]
    assert sorted(waits(backend.log)) == [1, 2]


def test_a_view_retyped_at_an_odd_offset_is_staged_as_a_copy() -> None:
    import torch

    up, backend = uploader(slots=2)
    raw = up.allocator("audio", (64,), np.dtype(np.uint8))
    raw[:] = np.arange(64, dtype=np.uint8)
    odd = raw[1:33].view(np.float32)  # 8 floats starting at byte 1: torch cannot view that
    got = up.upload(odd)
    assert torch.equal(got, torch.from_numpy(odd.copy()))
    assert len(backend.pinned) == 2, "copied into the other slot"


def test_empty_arrays_and_bad_arguments() -> None:
    up, backend = uploader()
    empty = up.upload(np.zeros((0, 3, 4, 5), dtype=np.uint8))
    assert tuple(empty.shape) == (0, 3, 4, 5) and backend.pinned == []
    with pytest.raises(TypeError, match="numpy array"):
        up.upload([1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="slots must be a positive integer"):
        clipvisor.gpu.CudaUploader("cpu", slots=0, _backend=backend)


def test_sample_refuses_an_uploaders_allocator_before_sending_anything() -> None:
    up, _ = uploader()
    client = clipvisor.Client("/nonexistent.sock", spawn=False)
    with pytest.raises(ValueError, match="CudaUploader hands the same memory out again"):
        client.sample(["/a.mp4", "/b.mp4"], allocator=up.allocator)


def test_to_torch_on_cuda_without_a_gpu_says_so() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    video = clipvisor.Video(frames=frames(1), pts=np.zeros(1), indices=np.zeros(1, dtype=np.int64), sample_fps=2.0,
                            layout="TCHW", width=40, height=24)
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        video.to_torch(device="cuda")
    with pytest.raises(ValueError, match=r"stream=\.\.\.\) is for CUDA devices"):
        video.to_torch(device="cpu", stream=object())
    assert torch.equal(video.to_torch(device="cpu"), torch.from_numpy(video.frames))


@pytest.mark.skipif(not os.path.exists(BINARY), reason=f"no clipvisor binary at {BINARY}")
def test_the_real_supervisor_decodes_into_staging_slots(short_dir: str) -> None:
    import torch

    from test_integration import Supervisor, media

    sup = Supervisor(short_dir)
    sup.start()
    try:
        client = clipvisor.Client(sup.path, spawn=False, margin=15.0)
        up, backend = uploader(slots=2)
        path = media("decord__flipping_a_pancake.mkv")
        want = client.video(path, fps=1.0, max_pixels=50176)
        for _ in range(3):
            got = client.video(path, fps=1.0, max_pixels=50176, allocator=up.allocator)
            assert torch.equal(up.upload(got.frames), torch.from_numpy(want.frames))
        assert len(backend.pinned) == 2 and waits(backend.log) == [1]
        client.close()
    finally:
        sup.stop()


def test_cuda_round_trip_where_a_gpu_is_present() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (bench/gpu_delivery.py measures this path on one)")
    up = clipvisor.gpu.CudaUploader("cuda")
    stream = torch.cuda.Stream()
    arrays = [frames(3, seed=i) for i in range(4)]
    outs = [up.upload(a, stream=stream) for a in arrays]
    torch.cuda.current_stream().wait_stream(stream)
    for a, o in zip(arrays, outs):
        assert o.is_cuda and torch.equal(o.cpu(), torch.from_numpy(a))
    assert up.capacity() > 0 and all(s.storage.is_pinned() for s in up._ring()[0])
