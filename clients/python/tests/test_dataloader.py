"""clipvisor.torch: SkippingDataset and skip_collate, with numpy alone and under a real DataLoader.

The numpy tests run without torch (the records of forked and spawned processes included). The
DataLoader tests need torch and the supervisor binary: two workers over samples of two clips
each, mixing good clips with a corrupt file, a FIFO that never delivers (short deadline), a
missing file and a one-frame video; they must finish, yield exactly the good samples, and report
exactly the bad paths.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import multiprocessing
import os
import pickle
import shutil
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pytest

import clipvisor
import clipvisor.compat
from clipvisor.compat import qwen
from clipvisor.torch import Skipped, SkippingDataset, skip_collate, skip_convert
from test_integration import BINARY, Supervisor, media

HAVE_TORCH = importlib.util.find_spec("torch") is not None


@pytest.fixture(autouse=True)
def no_garbage_for_forked_workers() -> None:
    """Garbage of earlier tests (e.g. decord readers, whose destructors join threads that exist
    only in this process) is finalised here, not in a forked DataLoader worker."""
    import gc

    gc.collect()


# -- numpy only -----------------------------------------------------------------------------------


class FakeClips:
    """Items 0..9: even ones fine, 3 and 7 time out, 5 returns a sample with a skipped clip inside."""

    def __init__(self) -> None:
        self.attribute = "wrapped"

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> Any:
        if i in (3, 7):
            raise clipvisor.ClipTimeout("timeout", f"/data/hang-{i}.mp4",
                                        f"/data/hang-{i}.mp4: no answer within 1000 ms")
        if i == 5:
            bad = clipvisor.ClipCorrupt("decode_error", "/data/bad.mp4", "/data/bad.mp4: bad")
            return {"id": i, "clips": [np.zeros(2), bad]}
        if i == 9:
            raise clipvisor.SupervisorUnavailable("no supervisor")
        return {"id": i, "clips": [np.full(2, i)]}


def read_items(dataset: SkippingDataset, indices: Sequence[int]) -> List[Any]:
    return [dataset[i] for i in indices]


def test_skipping_dataset_numpy(caplog: pytest.LogCaptureFixture) -> None:
    data = SkippingDataset(FakeClips())
    assert len(data) == 10 and data.attribute == "wrapped"
    with caplog.at_level(logging.WARNING, logger="clipvisor.torch"):
        items = [data[i] for i in (0, 1, 2, 3, 4, 5, 3)]
    assert [type(x) for x in items] == [dict, dict, dict, Skipped, dict, Skipped, Skipped]
    assert items[3].path == "/data/hang-3.mp4" and items[3].reason == "timeout" and items[3].index == 3
    assert items[5].path == "/data/bad.mp4" and items[5].reason == "decode_error"
    with pytest.raises(clipvisor.SupervisorUnavailable):  # infrastructure errors are not skips
        data[9]
    assert data.skip_count == 3
    assert data.skipped_paths == {"/data/hang-3.mp4", "/data/bad.mp4"}
    assert data.skip_counts == {"timeout": 2, "decode_error": 1}
    assert [(r.index, r.pid) for r in data.skipped] == [(3, os.getpid()), (5, os.getpid()), (3, os.getpid())]
    logged = [r.getMessage() for r in caplog.records if r.name == "clipvisor.torch"]
    assert len(logged) == 2 and any("hang-3.mp4" in m for m in logged)  # each path once per process
    marker = pickle.loads(pickle.dumps(items[3]))
    assert isinstance(marker, Skipped)
    assert (marker.index, marker.path, marker.reason) == (3, "/data/hang-3.mp4", "timeout")


def stack(batch: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {"id": [b["id"] for b in batch], "clips": np.stack([b["clips"][0] for b in batch])}


def test_skip_collate_numpy() -> None:
    data = SkippingDataset(FakeClips(), log=False)
    collate = functools.partial(skip_collate, collate_fn=stack)
    batch = collate([data[i] for i in (0, 3, 2, 5)])
    assert batch["id"] == [0, 2] and batch["clips"].shape == (2, 2)
    assert collate([data[3], data[5]]) is None  # nothing left
    assert skip_collate(data[3]) is None and skip_collate(data[0])["id"] == 0  # batch_size=None: one sample
    assert pickle.loads(pickle.dumps(collate)).func is skip_collate
    if not HAVE_TORCH:
        with pytest.raises(ImportError, match="collate_fn="):
            skip_collate([data[0]])


class ListSamples:
    """Each sample is a list (a conversation's clips, of different sizes); 1 and 3 are skipped."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> Any:
        if i in (1, 3):
            raise clipvisor.ClipTimeout("timeout", f"/data/hang-{i}.mp4", "no answer")
        return [np.full((2, 3), i, dtype=np.float32), np.full((1, 5), i, dtype=np.float32)]


def test_skip_convert_numpy() -> None:
    data = SkippingDataset(ListSamples(), log=False)
    assert skip_convert(data[1]) is None
    sample = data[0]
    assert skip_convert(sample) is sample  # a list sample is not taken for a batch
    assert skip_convert(sample, convert_fn=len) == 2
    convert = functools.partial(skip_convert, convert_fn=len)
    assert pickle.loads(pickle.dumps(convert)).func is skip_convert


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed")
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("collate", ["skip_collate", "skip_convert"])
def test_unbatched_dataloader_passes_list_samples_through(num_workers: int, collate: str) -> None:
    """DataLoader(batch_size=None): a marker becomes None, every other sample (a list of clips of
    different sizes included) comes through unchanged, not collated as if it were a batch."""
    import torch
    from torch.utils.data import DataLoader

    class Tensors(ListSamples):
        def __getitem__(self, i: int) -> Any:
            return [torch.from_numpy(x) for x in super().__getitem__(i)]

    fn = {"skip_collate": skip_collate, "skip_convert": skip_convert}[collate]
    loader = DataLoader(SkippingDataset(Tensors(), log=False), batch_size=None, num_workers=num_workers, collate_fn=fn)
    got = list(loader)
    assert got[1] is None and got[3] is None
    for i in (0, 2):
        assert isinstance(got[i], list) and [tuple(t.shape) for t in got[i]] == [(2, 3), (1, 5)]
        assert all(float(t.flatten()[0]) == i for t in got[i])
    # batched, skip_collate still drops the markers and collates the rest
    class Same(ListSamples):
        def __getitem__(self, i: int) -> Any:
            if i in (1, 3):
                raise clipvisor.ClipTimeout("timeout", f"/data/hang-{i}.mp4", "no answer")
            return [torch.full((3,), float(i)), torch.ones(2)]

    batches = list(DataLoader(SkippingDataset(Same(), log=False), batch_size=4, num_workers=num_workers,
                              collate_fn=skip_collate))
    assert len(batches) == 1 and [tuple(t.shape) for t in batches[0]] == [(2, 3), (2, 2)]
    assert batches[0][0][:, 0].tolist() == [0.0, 2.0]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_records_from_worker_processes(method: str) -> None:
    """Skips in forked and spawned processes reach the main process (a memfd, O_APPEND)."""
    data = SkippingDataset(FakeClips(), log=False)
    context = multiprocessing.get_context(method)
    with context.Pool(2) as pool:
        results = pool.starmap(read_items, [(data, [0, 3, 5]), (data, [7, 8, 3])])
    assert [type(x).__name__ for x in results[0] + results[1]] == \
        ["dict", "Skipped", "Skipped", "Skipped", "dict", "Skipped"]
    records = data.skipped
    assert sorted(r.index for r in records) == [3, 3, 5, 7]
    assert os.getpid() not in {r.pid for r in records}
    assert data.skipped_paths == {"/data/hang-3.mp4", "/data/hang-7.mp4", "/data/bad.mp4"}


# -- a real DataLoader over real clips --------------------------------------------------------------

GOOD = ["imageio-test_images__realshort.mp4", "jcodec__big_buck_bunny_160x90_ltr.mp4",
        "jcodec__seq_h264_4_audio.mp4", "decord__flipping_a_pancake.mkv", "jcodec__out9_sm.webm",
        "jcodec__precise_clip.mp4"]


class Conversations:
    """Samples of two videos each, read with clipvisor.compat.qwen.fetch_video (as a Qwen2.5-VL
    data pipeline would, after the one-line swap); samples whose id is in `via_sample` use
    Client.sample(all_or_nothing=False) instead, which returns a skipped clip in the list."""

    def __init__(self, samples: List[Tuple[int, List[str]]], client: Optional[clipvisor.Client], deadline: float,
                 via_sample: Sequence[int] = ()):
        self.samples = samples
        self.client = client
        self.deadline = deadline
        self.via_sample = set(via_sample)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Any:
        import torch

        sample_id, paths = self.samples[i]
        if sample_id in self.via_sample:
            client = self.client or clipvisor.compat.default_client()
            clips = client.sample([{"path": p, "frames": 4, "width": 56, "height": 56} for p in paths],
                                  all_or_nothing=False, deadline=self.deadline)
            if any(isinstance(c, clipvisor.ClipSkipped) for c in clips):
                return {"id": sample_id, "clips": clips}
            return {"id": sample_id, "video": torch.stack([torch.from_numpy(c.frames).float() for c in clips])}
        videos = [qwen.fetch_video({"video": p, "nframes": 4, "resized_height": 56, "resized_width": 56},
                                   client=self.client, deadline=self.deadline) for p in paths]
        return {"id": sample_id, "video": torch.stack(videos)}


@pytest.fixture(scope="module")
def served() -> Iterator[Tuple[clipvisor.Client, Dict[str, str]]]:
    if not HAVE_TORCH:
        pytest.skip("torch is not installed (optional: pip install 'clipvisor[torch]')")
    if not os.path.exists(BINARY):
        pytest.skip(f"no clipvisor binary at {BINARY}")
    workdir = tempfile.mkdtemp(prefix="cvd-", dir="/tmp")
    s = Supervisor(workdir)
    s.start()
    client = clipvisor.Client(s.path, spawn=False, margin=15.0, tag="pytest-dataloader")
    bad = {"missing": os.path.join(workdir, "missing.mp4"), "corrupt": os.path.join(workdir, "corrupt.mp4"),
           "fifo": os.path.join(workdir, "hang.mp4"), "one_frame": media("jcodec__37.mp4")}
    with open(bad["corrupt"], "wb") as f:
        f.write(np.random.default_rng(3).integers(0, 256, 150_000, dtype=np.uint8).tobytes())
    os.mkfifo(bad["fifo"])
    yield client, bad
    client.close()
    s.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def make_samples(bad: Dict[str, str]) -> Tuple[List[Tuple[int, List[str]]], List[int], Dict[int, str]]:
    good = [media(n) for n in GOOD]
    samples: List[Tuple[int, List[str]]] = []
    good_ids: List[int] = []
    bad_ids: Dict[int, str] = {}
    for k in range(14):
        a, b = good[k % len(good)], good[(k + 1) % len(good)]
        samples.append((k, [a, b]))
        good_ids.append(k)
    # each bad clip shares its sample with a good one: the whole sample goes
    for k, (_, path) in enumerate(sorted(bad.items()), start=100):
        pair = [good[k % len(good)], path] if k % 2 else [path, good[k % len(good)]]
        samples.insert((k - 100) * 4 + 1, (k, pair))
        bad_ids[k] = path
    return samples, good_ids, bad_ids


@pytest.mark.parametrize("via_sample", [False, True], ids=["fetch_video", "client.sample"])
def test_dataloader_two_workers_skips_bad_samples(served: Tuple[clipvisor.Client, Dict[str, str]],
                                                 monkeypatch: pytest.MonkeyPatch, via_sample: bool) -> None:
    import torch
    from torch.utils.data import DataLoader

    client, bad = served
    monkeypatch.setattr(clipvisor.compat, "_client", client)  # the compat functions' shared client
    samples, good_ids, bad_ids = make_samples(bad)
    ids_via_sample = [sid for sid, _ in samples] if via_sample else []
    data = SkippingDataset(Conversations(samples, None, deadline=1.5, via_sample=ids_via_sample))
    loader = DataLoader(data, batch_size=3, num_workers=2, collate_fn=skip_collate)
    t0 = time.monotonic()
    seen: List[int] = []
    for batch in loader:
        if batch is None:
            continue
        assert batch["video"].dtype == torch.float32 and tuple(batch["video"].shape[1:]) == (2, 4, 3, 56, 56)
        seen.extend(int(i) for i in batch["id"])
    elapsed = time.monotonic() - t0
    assert sorted(seen) == sorted(good_ids)
    assert data.skipped_paths == set(bad_ids.values())
    assert sorted(r.index for r in data.skipped) == sorted(i for i, (sid, _) in enumerate(samples) if sid in bad_ids)
    assert data.skip_count == len(bad_ids)
    reasons = {r.path: r.reason for r in data.skipped}
    assert reasons[bad["fifo"]] in ("timeout", "quarantined") and reasons[bad["missing"]] == "not_found"
    assert reasons[bad["corrupt"]] in ("decode_error", "unsupported")
    assert reasons[bad["one_frame"]] == "invalid_request"
    assert os.getpid() not in {r.pid for r in data.skipped}  # all in the workers
    assert elapsed < 60, elapsed


def test_dataloader_spawned_workers(served: Tuple[clipvisor.Client, Dict[str, str]]) -> None:
    """Workers started with `spawn` (a pickled dataset and client) report to the same records."""
    from torch.utils.data import DataLoader

    client, bad = served
    samples, good_ids, bad_ids = make_samples(bad)
    keep = [s for s in samples
            if s[0] in (0, 1, 2) or (s[0] in bad_ids and bad_ids[s[0]] in (bad["missing"], bad["corrupt"]))]
    data = SkippingDataset(Conversations(keep, client, deadline=5.0))
    loader = DataLoader(data, batch_size=2, num_workers=2, collate_fn=skip_collate, multiprocessing_context="spawn")
    seen = [int(i) for batch in loader if batch is not None for i in batch["id"]]
    assert sorted(seen) == [0, 1, 2]
    assert data.skipped_paths == {bad["missing"], bad["corrupt"]}


class CallerMistakes:
    """Item 0 a good clip, item 1 the corrupt file, item 2 a good clip asked for wrongly (`wrong`:
    a misspelled option or an out-of-range value), item 3 good again."""

    def __init__(self, client: clipvisor.Client, good: str, corrupt: str, wrong: Dict[str, Any]):
        self.client = client
        self.paths = [good, corrupt, good, good]
        self.wrong = wrong

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Any:
        options: Dict[str, Any] = dict(frames=2, width=56, height=56)
        if i == 2:
            options.update(self.wrong)
        return self.client.video(self.paths[i], deadline=10.0, **options).frames


def as_list(batch: List[Any]) -> List[Any]:
    """Collates nothing: numpy arrays, not torch tensors, cross from the workers. (A DataLoader
    left by an exception with tensors in flight takes 10 s to shut its workers down.)"""
    return batch


def test_dataloader_raises_a_callers_mistake_and_skips_a_corrupt_clip(
        served: Tuple[clipvisor.Client, Dict[str, str]]) -> None:
    """A request the caller got wrong is not a skip: it raises out of the DataLoader (as
    InvalidRequest, from a worker process) instead of every sample being dropped, while the corrupt
    clip before it is still skipped. (The DataLoader left by the exception takes torch about 10 s
    to shut down, so one DataLoader; the out-of-range value goes through SkippingDataset alone.)"""
    from torch.utils.data import DataLoader

    client, bad = served
    data = SkippingDataset(CallerMistakes(client, media(GOOD[1]), bad["corrupt"], {"options": {"fsp": 2}}), log=False)
    collate = functools.partial(skip_collate, collate_fn=as_list)
    loader = DataLoader(data, batch_size=1, num_workers=2, collate_fn=collate)
    got: List[Any] = []
    with pytest.raises(clipvisor.InvalidRequest) as info:
        for batch in loader:
            got.append(batch)
    assert len(got) == 2 and got[0][0].shape == (2, 3, 56, 56) and got[1] is None  # sample 1 skipped
    assert "fsp" in str(info.value) and "worker process" in str(info.value)
    assert data.skipped_paths == {bad["corrupt"]} and data.skip_counts in ({"decode_error": 1}, {"unsupported": 1})
    out_of_range = SkippingDataset(CallerMistakes(client, media(GOOD[1]), bad["corrupt"],
                                                  {"frames": None, "fps": -1.0}), log=False)
    with pytest.raises(clipvisor.InvalidRequest, match="fps"):
        out_of_range[2]
    assert isinstance(out_of_range[1], Skipped) and out_of_range.skip_count == 1
