"""clipvisor.compat.qwen.fetch_video against qwen-vl-utils' rules, and against the library itself.

The expected frame counts, frame indices, output sizes and sample_fps come from qwen-vl-utils
0.0.11's (and 0.0.14's) ``vision_process.py`` rules written out below (``ref_*``), fed with the
clips' frame counts and rates from the corpus MANIFEST (ffprobe's, not clipvisor's). The
implementation under test is never used to compute an expected value.

Index checks use a synthetic clip whose frame N is a uniform gray of luma 16+N (lossless H.264 with
B-frames): the decoded pixel value names the frame that was sampled.

Against the library (``qwen_vl_utils`` 0.0.11 with decord and torchvision installed; skipped
otherwise): same shape and sample_fps exactly; the same frame indices exactly (synthetic clip);
pixels within MAX_MEAN_ABS_DIFF / MIN_PSNR_DB (qwen-vl-utils decodes with decord, whose RGB
conversion upsamples chroma by nearest neighbour, then resizes float-free uint8 frames with
torchvision's bicubic+antialias; clipvisor converts and scales in one swscale bicubic pass with
full chroma interpolation).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from fractions import Fraction
from typing import Any, Dict, Iterator, List, Mapping, Tuple

import numpy as np
import pytest

import clipvisor
import clipvisor.compat
from clipvisor.compat import qwen
from test_integration import BINARY, Supervisor, manifest, media

HAVE_TORCH = importlib.util.find_spec("torch") is not None
needs_binary = pytest.mark.skipif(not os.path.exists(BINARY), reason=f"no clipvisor binary at {BINARY} "
                                  "(build it with `swift build`, or set $CLIPVISOR_BIN)")

# Pixels: qwen-vl-utils (decord + torchvision) vs clipvisor (swscale), per frame, values 0..255.
MAX_MEAN_ABS_DIFF = 2.5  # measured: at most 1.72 (BBB 160x90 upscaled to 448x252)
MIN_PSNR_DB = 36.0  # measured: at least 40.1 dB

# -- qwen-vl-utils 0.0.11 rules, written out ---------------------------------------------------


def ref_round_by(n: float, f: int) -> int:
    return round(n / f) * f


def ref_ceil_by(n: float, f: int) -> int:
    return math.ceil(n / f) * f


def ref_floor_by(n: float, f: int) -> int:
    return math.floor(n / f) * f


def ref_smart_resize(h: int, w: int, factor: int, min_pixels: float, max_pixels: float) -> Tuple[int, int]:
    hb, wb = max(factor, ref_round_by(h, factor)), max(factor, ref_round_by(w, factor))
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        return ref_floor_by(h / beta, factor), ref_floor_by(w / beta, factor)
    if hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        return ref_ceil_by(h * beta, factor), ref_ceil_by(w * beta, factor)
    return hb, wb


def ref_linspace_round(first: int, last: int, n: int) -> List[int]:
    """torch.linspace(first, last, n).round(): float32 step; each value first + step·i (first
    half) or last - step·(n-1-i) (second half) rounded once to float32 (torch's CPU kernels use
    fused multiply-add); round half to even. Exact rationals here, then one rounding."""
    if n == 1:
        return [first]
    step = Fraction(float(np.float32(np.float32(last - first) / np.float32(n - 1))))
    out = []
    for i in range(n):
        exact = Fraction(first) + step * i if i < n // 2 else Fraction(last) - step * (n - 1 - i)
        out.append(round(float(np.float32(float(exact)))))
    return out


def ref_expect(ele: Mapping[str, Any], total_frames: int, fps: float, h: int, w: int, *, factor: int = 28,
               fps_default: float = 2.0, min_frames_default: int = 4, max_frames_default: int = 768,
               video_min: float = 128 * 28 * 28, video_max: float = 768 * 28 * 28,
               video_total: float = 90316800, image_min: float = 4 * 28 * 28,
               image_max: float = 16384 * 28 * 28) -> Dict[str, Any]:
    """What qwen-vl-utils' fetch_video (decord backend) produces: frame indices, sample_fps, size."""
    start, end = 0, total_frames - 1
    if ele.get("video_start") is not None or ele.get("video_end") is not None:
        duration = total_frames / fps
        if ele.get("video_start") is not None:
            start = math.ceil(max(0.0, min(ele["video_start"], duration)) * fps)
        if ele.get("video_end") is not None:
            end = min(math.floor(max(0.0, min(ele["video_end"], duration)) * fps), total_frames - 1)
    total = end - start + 1
    if "nframes" in ele:
        n = ref_round_by(ele["nframes"], 2)
    else:
        lo = ref_ceil_by(ele.get("min_frames", min_frames_default), 2)
        hi = ref_floor_by(ele.get("max_frames", min(max_frames_default, total)), 2)
        n = ref_floor_by(min(min(max(total / fps * ele.get("fps", fps_default), lo), hi), total), 2)
    if "resized_height" in ele and "resized_width" in ele:
        min_pixels, max_pixels = image_min, image_max
        size = ref_smart_resize(ele["resized_height"], ele["resized_width"], factor, image_min, image_max)
    else:
        min_pixels = ele.get("min_pixels", video_min)
        max_pixels = max(min(video_max, ele.get("total_pixels", video_total) / n * 2), int(min_pixels * 1.05))
        max_pixels = min(ele.get("max_pixels", max_pixels), max_pixels)
        size = ref_smart_resize(h, w, factor, min_pixels, max_pixels)
    # 0.0.14's smart_resize asserts max_pixels >= min_pixels; 0.0.11 resizes anyway
    return {"indices": ref_linspace_round(start, end, n), "n": n, "sample_fps": n / max(total, 1e-6) * fps,
            "size": size, "total": total, "asserts_in_0014": max_pixels < min_pixels}


def corpus_clip(name: str, upright: bool = True) -> Tuple[str, int, float, int, int]:
    """(path, frame count, fps, height, width) from the MANIFEST (ffprobe); the size upright
    (a display matrix of ±90° swaps it, as decord 0.6 and torchcodec do) unless `upright` is false."""
    row = manifest()[name]
    path = media(name)
    decoded = int(row["decoded_frames"])
    if row["nb_frames"] not in ("?", "-") and int(row["nb_frames"]) != decoded:
        pytest.skip(f"{name}: container and decoded frame counts differ")
    rate = Fraction(row["fps"].split()[0])
    w, h = (int(v) for v in row["WxH"].split("x"))
    rotation = re.search(r"display matrix rotation (-?\d+)", row["notes"])
    if upright and rotation and int(rotation.group(1)) % 180 == 90:
        w, h = h, w
    return path, decoded, rate.numerator / rate.denominator, h, w


# -- unit tests (no supervisor) ----------------------------------------------------------------


def test_linspace_matches_reference_and_torch() -> None:
    rng = np.random.default_rng(7)
    cases = [(a, b, n) for a in range(0, 30, 3) for b in range(a + 1, a + 200, 13)
             for n in range(1, min(b - a + 2, 60), 5)]
    cases += [(int(a), int(a + d), int(n)) for a, d, n in zip(rng.integers(0, 60000, 400),
                                                                rng.integers(800, 200000, 400),
                                                                rng.integers(2, 800, 400))]
    for a, b, n in cases:
        assert qwen.linspace_indices(a, b, n) == ref_linspace_round(a, b, n), (a, b, n)
    if HAVE_TORCH:
        import torch

        for a, b, n in cases:
            assert ref_linspace_round(a, b, n) == torch.linspace(a, b, n).round().long().tolist(), (a, b, n)


def test_settings_defaults_env_and_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "qwen_vl_utils.vision_process", raising=False)
    for var in ("FPS", "FPS_MIN_FRAMES", "FPS_MAX_FRAMES", "VIDEO_MIN_PIXELS", "VIDEO_MAX_PIXELS", "VIDEO_TOTAL_PIXELS",
                "MAX_RATIO", "FRAME_FACTOR", "MODEL_SEQ_LEN", "VIDEO_MAX_TOKEN_NUM", "VIDEO_MIN_TOKEN_NUM",
                "SPATIAL_MERGE_SIZE"):
        monkeypatch.delenv(var, raising=False)
    s = qwen.settings()
    assert (s.version, s.factor, s.fps, s.fps_min_frames, s.fps_max_frames, s.frame_factor) == \
        ("0.0.11", 28, 2.0, 4, 768, 2)
    assert (s.video_min_pixels, s.video_max_pixels, s.video_total_pixels) == (100352, 602112, 90316800)
    s3 = qwen.settings(image_patch_size=16)
    assert (s3.version, s3.factor, s3.video_min_pixels, s3.video_max_pixels) == ("0.0.14", 32, 128 * 1024, 768 * 1024)
    assert s3.video_total_pixels == 128000 * 32 * 32 * 0.9
    assert qwen.settings(image_patch_size=14).video_total_pixels == 90316800.0
    # ms-swift's environment variables
    monkeypatch.setenv("FPS", "1.5")
    monkeypatch.setenv("FPS_MAX_FRAMES", "12")
    monkeypatch.setenv("VIDEO_MAX_PIXELS", "50176")
    monkeypatch.setenv("VIDEO_TOTAL_PIXELS", "1e7")
    s = qwen.settings()
    assert (s.fps, s.fps_max_frames, s.video_max_pixels, s.video_total_pixels) == (1.5, 12, 50176, 10_000_000)
    assert qwen.settings(image_patch_size=16).video_max_pixels == (50176 // 1024) * 1024  # ms-swift: pixels // factor²
    monkeypatch.setenv("VIDEO_MAX_TOKEN_NUM", "100")
    monkeypatch.setenv("MODEL_SEQ_LEN", "64000")
    s3 = qwen.settings(image_patch_size=16)
    assert (s3.video_max_pixels, s3.video_total_pixels) == (100 * 1024, 64000 * 1024 * 0.9)
    # an imported qwen_vl_utils.vision_process wins: what the replaced function would read
    monkeypatch.setitem(sys.modules, "qwen_vl_utils.vision_process",
                        types.SimpleNamespace(FPS_MAX_FRAMES=4, VIDEO_TOTAL_PIXELS=123456))
    s = qwen.settings()
    assert (s.fps_max_frames, s.video_total_pixels, s.fps) == (4, 123456, 1.5)


def test_inputs_clipvisor_does_not_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("qwen_vl_utils", "qwen_vl_utils.vision_process"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(qwen, "_original", None)
    for video in ("https://example.com/a.mp4", "http://x/y.mp4", "data:video/mp4;base64,AAAA", ["a.jpg", "b.jpg"]):
        with pytest.raises(NotImplementedError, match="local files"):
            qwen.fetch_video({"video": video})
    # with qwen-vl-utils imported, they go to its own fetch_video, arguments as given
    calls: List[Tuple[Any, Dict[str, Any]]] = []

    def original(ele: Any, **kwargs: Any) -> str:
        calls.append((ele, kwargs))
        return "from-qwen"

    module = types.SimpleNamespace(fetch_video=qwen.fetch_video)  # swapped by hand
    package = types.SimpleNamespace(fetch_video=original)          # the package name keeps the original
    monkeypatch.setitem(sys.modules, "qwen_vl_utils.vision_process", module)
    monkeypatch.setitem(sys.modules, "qwen_vl_utils", package)
    assert qwen.fetch_video({"video": ["a.jpg"]}, return_video_sample_fps=True) == "from-qwen"
    assert calls == [({"video": ["a.jpg"]}, {"return_video_sample_fps": True})]
    with pytest.raises(AssertionError, match="Only accept either `fps` or `nframes`"):
        qwen.fetch_video({"video": "/nonexistent.mp4", "fps": 2, "nframes": 4})


def test_patch_and_unpatch(monkeypatch: pytest.MonkeyPatch) -> None:
    def original(ele: Any, **kwargs: Any) -> str:
        return "qwen"

    module = types.ModuleType("qwen_vl_utils.vision_process")
    module.fetch_video = original  # type: ignore[attr-defined]
    package = types.ModuleType("qwen_vl_utils")
    package.fetch_video = original  # type: ignore[attr-defined]
    package.vision_process = module  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "qwen_vl_utils", package)
    monkeypatch.setitem(sys.modules, "qwen_vl_utils.vision_process", module)
    monkeypatch.setattr(qwen, "_original", None)
    qwen.patch()
    qwen.patch()  # idempotent: the original stays the original
    assert module.fetch_video is qwen.fetch_video and package.fetch_video is qwen.fetch_video  # type: ignore[attr-defined]
    assert qwen.fetch_video({"video": "https://example.com/a.mp4"}) == "qwen"
    qwen.unpatch()
    assert module.fetch_video is original and package.fetch_video is original  # type: ignore[attr-defined]


def test_qwen_value_error_is_a_value_error_and_a_skip() -> None:
    import pickle

    err = qwen.QwenValueError("invalid_request", "/x.mp4", "nframes should in interval [2, 1], but got 0.")
    assert isinstance(err, ValueError) and isinstance(err, clipvisor.ClipSkipped)
    assert str(err) == "nframes should in interval [2, 1], but got 0." and err.path == "/x.mp4"
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is qwen.QwenValueError and str(back) == str(err) and back.reason == "invalid_request"


# -- against a real supervisor ------------------------------------------------------------------


@pytest.fixture(scope="module")
def supervisor() -> Iterator[Supervisor]:
    if not os.path.exists(BINARY):
        pytest.skip(f"no clipvisor binary at {BINARY}")
    workdir = tempfile.mkdtemp(prefix="cvq-", dir="/tmp")
    s = Supervisor(workdir)
    s.start()
    yield s
    s.stop()
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def cv(supervisor: Supervisor) -> Iterator[clipvisor.Client]:
    c = clipvisor.Client(supervisor.path, spawn=False, margin=15.0, tag="pytest-compat")
    yield c
    c.close()


@pytest.fixture(scope="module", autouse=True)
def collect_garbage_at_the_end() -> Iterator[None]:
    """Finalise here the decord readers left in reference cycles by qwen-vl-utils: a forked child
    of a later test (a DataLoader worker) would otherwise run their destructors, which join
    decoding threads that exist only in this process, and crash (SIGSEGV)."""
    yield
    import gc

    gc.collect()


@pytest.fixture(autouse=True)
def clean_constants(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ms-swift variables from the environment, and no qwen_vl_utils module constants, unless a
    test sets them."""
    for var in ("FPS", "FPS_MIN_FRAMES", "FPS_MAX_FRAMES", "VIDEO_MIN_PIXELS", "VIDEO_MAX_PIXELS", "VIDEO_TOTAL_PIXELS",
                "MAX_RATIO", "FRAME_FACTOR", "MODEL_SEQ_LEN", "VIDEO_MAX_TOKEN_NUM", "VIDEO_MIN_TOKEN_NUM",
                "SPATIAL_MERGE_SIZE", "IMAGE_MIN_TOKEN_NUM", "IMAGE_MAX_TOKEN_NUM", "MIN_PIXELS", "MAX_PIXELS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delitem(sys.modules, "qwen_vl_utils.vision_process", raising=False)


@pytest.fixture(scope="module")
def synthetic() -> Iterator[Dict[str, str]]:
    """Clips made with the ffmpeg CLI: `index` (96x64, 25 fps, 200 frames, frame N = luma 16+N,
    lossless, B-frames), `vfr` (the same frames with a gap every 10 frames), `wide` (404x2)."""
    if subprocess.run(["ffmpeg", "-version"], capture_output=True).returncode != 0:
        pytest.skip("no ffmpeg CLI to make the synthetic clips")
    d = tempfile.mkdtemp(prefix="cvq-syn-")
    gray = "color=c=black:s=96x64:r=25:d=8,format=yuv420p,geq=lum='16+N':cb=128:cr=128"
    out = {"index": os.path.join(d, "index.mp4"), "vfr": os.path.join(d, "vfr.mp4"),
           "wide": os.path.join(d, "wide.mkv")}
    for args in (["-f", "lavfi", "-i", gray, "-c:v", "libx264", "-qp", "0", "-bf", "2", "-g", "50", out["index"]],
                 ["-f", "lavfi", "-i", gray + ",setpts='(N+floor(N/10)*0.6)/25/TB'", "-fps_mode", "vfr",
                  "-c:v", "libx264", "-qp", "0", out["vfr"]],
                 ["-f", "lavfi", "-i", "color=c=gray:s=404x2:r=10:d=1", "-c:v", "ffv1", out["wide"]]):
        subprocess.run(["ffmpeg", "-v", "error", "-y"] + args, check=True)
    yield out
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def frame_numbers(video: Any) -> List[int]:
    """The frame number each output frame of the synthetic `index` clip shows (luma 16+N, full-range RGB)."""
    array = video.numpy() if hasattr(video, "numpy") else np.asarray(video)
    means = array.reshape(array.shape[0], -1).mean(axis=1)
    spread = np.ptp(array.reshape(array.shape[0], -1), axis=1)
    assert np.all(spread <= 2), spread  # uniform frames
    return [int(v) for v in np.rint(means * 219 / 255)]


def as_numpy(video: Any) -> np.ndarray:
    return video.numpy() if hasattr(video, "numpy") else np.asarray(video)


CASES: List[Tuple[str, Dict[str, Any]]] = [
    ("imageio-test_images__realshort.mp4", {}),
    ("imageio-test_images__realshort.mp4", {"fps": 8.0}),
    ("imageio-test_images__realshort.mp4", {"nframes": 9}),  # 9/2 = 4.5 rounds to even: 8 frames
    ("imageio-test_images__realshort.mp4", {"nframes": 36}),
    ("imageio-test_images__realshort.mp4", {"resized_height": 100, "resized_width": 150}),
    ("imageio-test_images__realshort.mp4", {"min_pixels": 200704, "max_pixels": 401408}),  # upscales
    ("imageio-test_images__realshort.mp4", {"video_start": 0.2, "video_end": 0.9}),
    ("jcodec__big_buck_bunny_160x90_ltr.mp4", {}),
    ("jcodec__big_buck_bunny_160x90_ltr.mp4", {"fps": 4, "min_frames": 6, "max_frames": 10}),
    ("jcodec__big_buck_bunny_160x90_ltr.mp4", {"video_start": 1.0}),
    ("jcodec__big_buck_bunny_160x90_ltr.mp4", {"video_end": 1.5, "fps": 5}),
    ("jcodec__seq_h264_4_audio.mp4", {"total_pixels": 400000, "fps": 3}),
    ("jcodec__seq_h264_4_audio.mp4", {"video_start": 2.02, "video_end": 7.5, "nframes": 12}),
    ("jcodec__seq_h264_4_audio.mp4", {"video_start": 3, "video_end": 1000}),
    ("jcodec__precise_clip.mp4", {"min_frames": 10, "max_frames": 6}),  # min > max: qwen takes max
    ("decord__flipping_a_pancake.mkv", {"max_pixels": 50176}),
    ("decord__flipping_a_pancake.mkv", {"video_start": 4.5, "video_end": 8.25, "max_pixels": 100000}),
    ("jcodec__out9_sm.webm", {"fps": 1.0}),
    ("decord__video_90.mov", {"nframes": 2}),  # display matrix -90: upright, as decord 0.6 / torchcodec give it
    ("imageio-test_images__cockatoo.mp4", {"max_pixels": 200704}),
    ("imageio-test_images__cockatoo.mp4", {"video_start": 10, "video_end": 12, "fps": 3}),
]


@needs_binary
@pytest.mark.parametrize("name,ele", CASES, ids=[f"{n.split('__')[1]}-{e}" for n, e in CASES])
def test_table_qwen25(cv: clipvisor.Client, name: str, ele: Dict[str, Any]) -> None:
    path, total, fps, h, w = corpus_clip(name)
    want = ref_expect(ele, total, fps, h, w)
    video, sample_fps = qwen.fetch_video({"video": path, **ele}, return_video_sample_fps=True, client=cv)
    assert tuple(video.shape) == (want["n"], 3) + want["size"]
    assert str(video.dtype) in ("torch.float32", "float32")
    assert sample_fps == pytest.approx(want["sample_fps"], rel=1e-12)
    # the same call in 0.0.14's signature (factor 28: the same constants) reports the indices
    if want["asserts_in_0014"]:
        with pytest.raises(AssertionError, match="max_pixels of image must be greater than or equal to min_pixels"):
            qwen.fetch_video({"video": path, **ele}, image_patch_size=14, client=cv)
        return
    (again, meta), fps3 = qwen.fetch_video({"video": "file://" + path, **ele}, image_patch_size=14,
                                           return_video_metadata=True, return_video_sample_fps=True, client=cv)
    assert meta["frames_indices"] == want["indices"]
    assert meta["total_num_frames"] == want["total"] and meta["fps"] == pytest.approx(fps, rel=1e-12)
    assert fps3 == sample_fps
    assert np.array_equal(as_numpy(again), as_numpy(video))
    assert 0 <= float(as_numpy(video).min()) and float(as_numpy(video).max()) <= 255


CASES_QWEN3: List[Tuple[str, Dict[str, Any]]] = [
    ("imageio-test_images__realshort.mp4", {}),
    ("jcodec__seq_h264_4_audio.mp4", {"nframes": 6, "max_pixels": 300000}),
    ("imageio-test_images__cockatoo.mp4", {"fps": 0.5}),  # 768·32² per frame: above the worker's own cap
    ("jcodec__big_buck_bunny_160x90_ltr.mp4", {"resized_height": 90, "resized_width": 160}),
]


@needs_binary
@pytest.mark.parametrize("name,ele", CASES_QWEN3, ids=[f"{n.split('__')[1]}-{e}" for n, e in CASES_QWEN3])
def test_table_qwen3_patch16(cv: clipvisor.Client, name: str, ele: Dict[str, Any]) -> None:
    path, total, fps, h, w = corpus_clip(name)
    f = 32
    want = ref_expect(ele, total, fps, h, w, factor=f, video_min=128 * f * f, video_max=768 * f * f,
                      video_total=128000 * f * f * 0.9, image_min=4 * f * f, image_max=16384 * f * f)
    (video, meta), sample_fps = qwen.fetch_video({"video": path, **ele}, image_patch_size=16,
                                                 return_video_metadata=True, return_video_sample_fps=True, client=cv)
    assert tuple(video.shape) == (want["n"], 3) + want["size"]
    assert video.shape[2] % 32 == 0 and video.shape[3] % 32 == 0
    assert meta["frames_indices"] == want["indices"] and meta["video_backend"] == "clipvisor"
    assert sample_fps == pytest.approx(want["sample_fps"], rel=1e-12)


ENV_CASES: List[Tuple[str, Dict[str, str], Dict[str, Any]]] = [
    # ms-swift's variables; the worker's own rule can express the first three ...
    ("jcodec__seq_h264_4_audio.mp4", {"FPS": "1.0", "FPS_MAX_FRAMES": "6", "VIDEO_MAX_PIXELS": "50176"},
     {"fps_default": 1.0, "max_frames_default": 6, "video_max": 50176}),
    ("imageio-test_images__realshort.mp4", {"VIDEO_MIN_PIXELS": "200704", "FPS_MIN_FRAMES": "10"},
     {"video_min": 200704, "min_frames_default": 10}),
    ("jcodec__seq_h264_4_audio.mp4", {"VIDEO_TOTAL_PIXELS": "300000"}, {"video_total": 300000}),
    # ... these need the client's plan: a per-frame cap above 768·28², an aspect limit
    ("imageio-test_images__cockatoo.mp4", {"VIDEO_MAX_PIXELS": "1000000", "FPS": "0.5"},
     {"video_max": 1000000, "fps_default": 0.5}),
]


@needs_binary
@pytest.mark.parametrize("name,env,consts", ENV_CASES, ids=[str(e) for _, e, _ in ENV_CASES])
def test_table_environment(cv: clipvisor.Client, monkeypatch: pytest.MonkeyPatch, name: str, env: Dict[str, str],
                           consts: Dict[str, Any]) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    path, total, fps, h, w = corpus_clip(name)
    want = ref_expect({}, total, fps, h, w, **consts)
    video, sample_fps = qwen.fetch_video({"video": path}, return_video_sample_fps=True, client=cv)
    assert tuple(video.shape) == (want["n"], 3) + want["size"]
    assert sample_fps == pytest.approx(want["sample_fps"], rel=1e-12)


@needs_binary
def test_rotation_switch(cv: clipvisor.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """CLIPVISOR_QWEN_ROTATE=0 keeps the stored orientation (qwen-vl-utils' torchvision backend)."""
    for upright, env in ((True, "1"), (False, "0")):
        monkeypatch.setenv("CLIPVISOR_QWEN_ROTATE", env)
        path, total, fps, h, w = corpus_clip("decord__video_90.mov", upright=upright)
        want = ref_expect({"nframes": 2, "max_pixels": 60000}, total, fps, h, w)
        for patch_direct in (False, True):  # one request, and probe-and-plan
            with monkeypatch.context() as m:
                if patch_direct:
                    m.setattr(qwen, "_direct_request", lambda *a, **k: None)
                video = qwen.fetch_video({"video": path, "nframes": 2, "max_pixels": 60000}, client=cv)
            assert tuple(video.shape) == (2, 3) + want["size"], (upright, patch_direct)


@needs_binary
def test_planned_path_gives_the_same_frames(cv: clipvisor.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """The single-request path (the worker's own Qwen rule) and the probe-and-plan path agree
    frame for frame."""
    path = media("jcodec__seq_h264_4_audio.mp4")
    for ele in ({}, {"nframes": 10, "max_pixels": 20000}, {"resized_height": 56, "resized_width": 84}):
        direct = qwen.fetch_video({"video": path, **ele}, client=cv)
        with monkeypatch.context() as m:
            m.setattr(qwen, "_direct_request", lambda *a, **k: None)
            planned = qwen.fetch_video({"video": path, **ele}, client=cv)
        assert np.array_equal(as_numpy(direct), as_numpy(planned)), ele


@needs_binary
@pytest.mark.parametrize("ele", [
    {}, {"fps": 3.3}, {"nframes": 17}, {"nframes": 200}, {"video_start": 0.5, "video_end": 5.0},
    {"video_start": 1.3, "nframes": 30}, {"video_end": 7.77, "fps": 4}, {"video_start": 2.0, "video_end": 2.2},
], ids=str)
def test_frame_indices_synthetic(cv: clipvisor.Client, synthetic: Dict[str, str], ele: Dict[str, Any]) -> None:
    want = ref_expect(ele, 200, 25.0, 64, 96)
    video, sample_fps = qwen.fetch_video({"video": synthetic["index"], **ele}, return_video_sample_fps=True, client=cv)
    assert frame_numbers(video) == want["indices"]
    assert sample_fps == pytest.approx(want["sample_fps"], rel=1e-12)


@needs_binary
def test_frame_indices_long_clip(cv: clipvisor.Client, synthetic: Dict[str, str]) -> None:
    """768 frames out of 11 547: torch.linspace's rounding matters at this size."""
    long_clip = os.path.join(os.path.dirname(synthetic["index"]), "long.mp4")
    if not os.path.exists(long_clip):
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "color=c=black:s=16x16:r=100",
                        "-frames:v", "11547", "-c:v", "libx264", "-g", "250", long_clip], check=True)
    ele = {"nframes": 768, "min_pixels": 784, "max_pixels": 784}
    (video, meta) = qwen.fetch_video({"video": long_clip, **ele}, image_patch_size=14, return_video_metadata=True,
                                     client=cv)
    assert tuple(video.shape) == (768, 3, 28, 28) and meta["total_num_frames"] == 11547
    assert meta["frames_indices"] == ref_linspace_round(0, 11546, 768)


@needs_binary
def test_irregular_frame_times_keep_the_count(cv: clipvisor.Client, synthetic: Dict[str, str],
                                               caplog: pytest.LogCaptureFixture) -> None:
    """A range on a stream whose frames are not 1/fps apart: qwen's index arithmetic cannot be
    mapped onto the frames' times exactly. The frame count and size stay qwen's; a warning says so."""
    fps = 5000 / 211  # the stream's avg_frame_rate
    want = ref_expect({"video_start": 5.0, "video_end": 7.0}, 200, fps, 64, 96)
    with caplog.at_level(logging.WARNING, logger="clipvisor.compat.qwen"):
        video = qwen.fetch_video({"video": synthetic["vfr"], "video_start": 5.0, "video_end": 7.0}, client=cv)
    assert tuple(video.shape) == (want["n"], 3) + want["size"]
    assert any("not 1/fps apart" in r.getMessage() for r in caplog.records)


@needs_binary
def test_same_errors_as_qwen(cv: clipvisor.Client, synthetic: Dict[str, str]) -> None:
    one = media("jcodec__37.mp4")  # a video track with a single frame
    with pytest.raises(ValueError) as info:
        qwen.fetch_video({"video": one}, client=cv)
    assert str(info.value) == "nframes should in interval [2, 1], but got 0."
    assert isinstance(info.value, clipvisor.ClipSkipped) and info.value.path == one
    path, total, fps, h, w = corpus_clip("imageio-test_images__realshort.mp4")
    for nframes, got in ((1, 0), (40, 40)):
        with pytest.raises(ValueError, match=rf"^nframes should in interval \[2, 36\], but got {got}\.$"):
            qwen.fetch_video({"video": path, "nframes": nframes}, client=cv)
    duration = total / fps
    message = (f"Invalid time range: Start frame 31 (at 1.0s) exceeds end frame 30 (at 1.01s). "
               f"Video duration: {duration:.2f}s (36 frames @ {fps}fps)")
    with pytest.raises(ValueError) as info:
        qwen.fetch_video({"video": path, "video_start": 1.0, "video_end": 1.01}, client=cv)
    assert str(info.value) == message
    with pytest.raises(ValueError, match=r"^absolute aspect ratio must be smaller than 200, got 202\.0$"):
        qwen.fetch_video({"video": synthetic["wide"], "nframes": 2}, client=cv)
    with pytest.raises(ValueError, match=r"^absolute aspect ratio must be smaller than 200, got 300\.0$"):
        qwen.fetch_video({"video": path, "resized_height": 10, "resized_width": 3000}, client=cv)


@needs_binary
def test_bad_clips_raise_clip_skipped(cv: clipvisor.Client) -> None:
    d = tempfile.mkdtemp(prefix="cvq-bad-", dir="/tmp")
    try:
        with pytest.raises(clipvisor.ClipNotFound):
            qwen.fetch_video({"video": os.path.join(d, "missing.mp4")}, client=cv)
        junk = os.path.join(d, "junk.mp4")
        with open(junk, "wb") as f:
            f.write(np.random.default_rng(1).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
        with pytest.raises(clipvisor.ClipCorrupt):
            qwen.fetch_video({"video": junk}, client=cv)
        fifo = os.path.join(d, "hang.mp4")
        os.mkfifo(fifo)
        for ele in ({}, {"video_start": 1.0}):  # one request, or probe first
            t0 = time.monotonic()
            with pytest.raises(clipvisor.ClipTimeout) as info:
                qwen.fetch_video({"video": fifo, **ele}, client=cv, deadline=1.0)
            assert time.monotonic() - t0 < 1.0 + 1.0
            assert info.value.path == fifo
    finally:
        import shutil

        shutil.rmtree(d, ignore_errors=True)


@needs_binary
def test_default_client_and_numpy_without_torch(cv: clipvisor.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clipvisor.compat, "_client", cv)
    monkeypatch.setattr(qwen, "_torch_checked", True)
    monkeypatch.setattr(qwen, "_torch", None)  # as if torch were not installed
    video = qwen.fetch_video({"video": media("jcodec__big_buck_bunny_160x90_ltr.mp4"), "nframes": 4})
    assert isinstance(video, np.ndarray) and video.dtype == np.float32 and video.shape[:2] == (4, 3)
    assert video.flags["C_CONTIGUOUS"]


# -- against qwen-vl-utils itself ----------------------------------------------------------------


def qwen_library() -> Any:
    try:
        import decord  # noqa: F401
        import torchvision  # noqa: F401
        from qwen_vl_utils import vision_process
    except Exception as exc:  # ImportError, or a broken install (e.g. torchvision/torch mismatch)
        pytest.skip(f"qwen-vl-utils with decord and torchvision is not importable: {exc!r}")
    version = getattr(vision_process, "VIDEO_TOTAL_PIXELS", None)
    if version is None:
        pytest.skip("qwen-vl-utils is not 0.0.11 (the Qwen2.5-VL version this table is written for)")
    return vision_process


@pytest.fixture
def library(monkeypatch: pytest.MonkeyPatch) -> Any:
    vp = qwen_library()
    monkeypatch.setattr(vp, "FORCE_QWENVL_VIDEO_READER", "decord")
    vp.get_video_reader_backend.cache_clear()
    monkeypatch.setitem(sys.modules, "qwen_vl_utils.vision_process", vp)
    yield vp
    vp.get_video_reader_backend.cache_clear()


LIBRARY_CASES: List[Tuple[str, Dict[str, Any]]] = [
    ("imageio-test_images__realshort.mp4", {}),
    ("imageio-test_images__realshort.mp4", {"nframes": 9, "max_pixels": 50000}),
    ("jcodec__big_buck_bunny_160x90_ltr.mp4", {"video_start": 1.0, "video_end": 2.5}),
    ("jcodec__seq_h264_4_audio.mp4", {"fps": 3, "min_pixels": 100000}),
    ("jcodec__seq_h264_4_audio.mp4", {"resized_height": 112, "resized_width": 200}),
    ("imageio-test_images__cockatoo.mp4", {"max_pixels": 100352}),
    ("decord__video_90.mov", {"nframes": 2}),
]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


@needs_binary
@pytest.mark.parametrize("name,ele", LIBRARY_CASES, ids=[f"{n.split('__')[1]}-{e}" for n, e in LIBRARY_CASES])
def test_against_qwen_vl_utils(cv: clipvisor.Client, library: Any, name: str, ele: Dict[str, Any]) -> None:
    path = media(name)
    theirs, their_fps = library.fetch_video({"video": path, **ele}, return_video_sample_fps=True)
    ours, our_fps = qwen.fetch_video({"video": path, **ele}, return_video_sample_fps=True, client=cv)
    assert tuple(ours.shape) == tuple(theirs.shape) and ours.dtype == theirs.dtype
    assert our_fps == their_fps
    a, b = as_numpy(ours), as_numpy(theirs)
    for t in range(a.shape[0]):
        diff = float(np.abs(a[t] - b[t]).mean())
        assert diff <= MAX_MEAN_ABS_DIFF and psnr(a[t], b[t]) >= MIN_PSNR_DB, (t, diff, psnr(a[t], b[t]))


@needs_binary
@pytest.mark.parametrize("ele", [{}, {"nframes": 31}, {"video_start": 1.3, "video_end": 6.1}, {"fps": 7.5},
                                 {"video_start": 0.52, "nframes": 64}], ids=str)
def test_against_qwen_vl_utils_indices(cv: clipvisor.Client, library: Any, synthetic: Dict[str, str],
                                       ele: Dict[str, Any]) -> None:
    import decord

    # decord converts luma 16+N to a gray that is not always clipvisor's (its swscale rounds
    # differently): name their frames by decord's own gray of every frame at full size.
    everything = decord.VideoReader(synthetic["index"]).get_batch(list(range(200))).asnumpy()
    grays = everything.reshape(200, -1).mean(axis=1)
    assert len(set(np.rint(grays).astype(int).tolist())) == 200
    theirs, their_fps = library.fetch_video({"video": synthetic["index"], **ele}, return_video_sample_fps=True)
    ours, our_fps = qwen.fetch_video({"video": synthetic["index"], **ele}, return_video_sample_fps=True, client=cv)
    their_frames = as_numpy(theirs).reshape(theirs.shape[0], -1)
    assert np.all(np.ptp(their_frames, axis=1) == 0)
    their_numbers = [int(np.argmin(np.abs(grays - v))) for v in their_frames.mean(axis=1)]
    assert frame_numbers(ours) == their_numbers
    assert tuple(ours.shape) == tuple(theirs.shape) and our_fps == their_fps
    assert float(np.abs(as_numpy(ours) - as_numpy(theirs)).max()) <= 1.0  # gray levels: at most one apart


@needs_binary
def test_against_qwen_vl_utils_errors(cv: clipvisor.Client, library: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # qwen-vl-utils retries a failed backend with torchvision.io.read_video, which recent
    # torchvision no longer has: retry with decord instead, so that its ValueError comes through.
    monkeypatch.setitem(library.VIDEO_READER_BACKENDS, "torchvision", library.VIDEO_READER_BACKENDS["decord"])
    path = media("imageio-test_images__realshort.mp4")
    for ele in ({"nframes": 40}, {"video_start": 1.0, "video_end": 1.01}):
        with pytest.raises(ValueError) as theirs:
            library.fetch_video({"video": path, **ele})
        with pytest.raises(ValueError) as ours:
            qwen.fetch_video({"video": path, **ele}, client=cv)
        assert str(ours.value) == str(theirs.value)


@needs_binary
def test_patch_swaps_process_vision_info(cv: clipvisor.Client, library: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import qwen_vl_utils

    monkeypatch.setattr(clipvisor.compat, "_client", cv)
    monkeypatch.setattr(qwen, "_original", None)
    monkeypatch.setattr(library, "fetch_video", library.fetch_video)        # restored afterwards
    monkeypatch.setattr(qwen_vl_utils, "fetch_video", qwen_vl_utils.fetch_video)
    qwen.patch()
    path = media("jcodec__big_buck_bunny_160x90_ltr.mp4")
    messages = [{"role": "user", "content": [{"type": "video", "video": "file://" + path, "nframes": 4},
                                             {"type": "text", "text": "what happens?"}]}]
    images, videos, kwargs = library.process_vision_info(messages, return_video_kwargs=True)
    assert images is None and len(videos) == 1 and tuple(videos[0].shape[:2]) == (4, 3)
    assert kwargs == {"fps": [pytest.approx(4 / 75 * 25.0)]}
    with pytest.raises(clipvisor.ClipNotFound):
        library.process_vision_info([{"role": "user", "content": [{"video": "/nonexistent/clip.mp4"}]}])
    from qwen_vl_utils import fetch_video  # what ms-swift's templates import at call time

    assert fetch_video is qwen.fetch_video
