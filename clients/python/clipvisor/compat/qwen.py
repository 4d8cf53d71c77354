"""qwen-vl-utils' ``fetch_video``, decoded by clipvisor (docs/compat.md).

Swap it in with one line, before the first sample is read::

    import clipvisor.compat.qwen
    clipvisor.compat.qwen.patch()
    # or, by hand: qwen_vl_utils.vision_process.fetch_video = clipvisor.compat.qwen.fetch_video
    #              (plus qwen_vl_utils.fetch_video, which ms-swift imports)

:func:`fetch_video` takes the same ``ele`` dict and returns the same thing as qwen-vl-utils:
the same frame count, the same frame indices, the same output size and ``sample_fps``, a float32
``(T, 3, H, W)`` torch tensor (a numpy array when torch is not installed), and the same
``ValueError``\\ s for impossible inputs. Two signatures:

- ``fetch_video(ele, image_factor=28, return_video_sample_fps=False)``: qwen-vl-utils 0.0.8–0.0.11
  (Qwen2-VL, Qwen2.5-VL).
- ``fetch_video(ele, image_patch_size=14, return_video_sample_fps=False, return_video_metadata=False)``
  (``image_patch_size`` or ``return_video_metadata`` given by keyword): qwen-vl-utils 0.0.14
  (Qwen3-VL; ``image_patch_size=16`` → factor 32, pixel limits in tokens × factor²).

What differs: a clip that cannot be decoded raises :class:`~clipvisor.ClipSkipped` (timeout,
crash, corrupt, missing...) instead of hanging the DataLoader worker; the impossible inputs
raise :class:`QwenValueError`, which is a ``ValueError`` (as in qwen-vl-utils) and a
``ClipSkipped`` (reason ``invalid_request``), so that :class:`clipvisor.torch.SkippingDataset`
drops the sample. Frames are scaled by swscale (bicubic, antialiased when downscaling) on uint8,
where qwen-vl-utils uses torchvision's bicubic+antialias: pixel values differ slightly. Frames
are upright (the display matrix applied), as qwen-vl-utils' decord and torchcodec backends give
them; ``CLIPVISOR_QWEN_ROTATE=0`` keeps the stored orientation.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import re
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple

import numpy as np

from ..client import Client
from ..errors import ClipCorrupt, ClipIncompatible, ClipUnsupported, InvalidRequest
from ..results import Video
from . import default_client

__all__ = [
    "fetch_video",
    "patch",
    "unpatch",
    "QwenValueError",
    "QwenSettings",
    "settings",
    "smart_resize",
    "smart_nframes",
    "linspace_indices",
    "frame_range",
]

logger = logging.getLogger(__name__)

# qwen-vl-utils 0.0.11 constants (Qwen2.5-VL).
IMAGE_FACTOR = 28
MIN_PIXELS = 4 * 28 * 28  # smart_resize's defaults, bound at definition time in 0.0.11
MAX_PIXELS = 16384 * 28 * 28
MAX_RATIO = 200
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = int(float(128000 * 28 * 28 * 0.9))
FRAME_FACTOR = 2
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
# qwen-vl-utils 0.0.14 constants (Qwen3-VL): pixel limits are token counts × factor².
SPATIAL_MERGE_SIZE = 2
IMAGE_MIN_TOKEN_NUM = 4
IMAGE_MAX_TOKEN_NUM = 16384
VIDEO_MIN_TOKEN_NUM = 128
VIDEO_MAX_TOKEN_NUM = 768
MODEL_SEQ_LEN = 128000

# What the worker's own Qwen rule can express (docs/decoding.md): its per-frame pixel cap is
# fixed at 768·28², its aspect-ratio limit at 200.
_WORKER_FRAME_CAP = 768 * 28 * 28
_WORKER_MAX_RATIO = 200
_WORKER_MAX_FPS = 1000.0
_WORKER_MAX_FRAMES = 10_000  # the worker's per-clip frame limit (DecodeOptions.maxFramesPerClip)

_UNSET: Any = object()


class QwenValueError(ClipIncompatible):
    """What qwen-vl-utils raises as ``ValueError`` for an input that cannot work with this clip
    (fewer than ``FRAME_FACTOR`` frames, an empty ``video_start``/``video_end`` range, an aspect
    ratio above ``MAX_RATIO``). ``str()`` is qwen-vl-utils' message; also a
    :class:`~clipvisor.ClipIncompatible` (so a :class:`~clipvisor.ClipSkipped`: the clip, not
    the caller, is at fault) with reason ``invalid_request`` and the clip's ``path``."""

    def __str__(self) -> str:
        return self.message


def _qwen_error(path: Optional[str], message: str) -> QwenValueError:
    return QwenValueError("invalid_request", path, message)


# -- qwen-vl-utils' rules, reproduced with Python's numeric semantics --------------------------

def _round_by_factor(number: float, factor: int) -> int:
    return round(number / factor) * factor


def _ceil_by_factor(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def _floor_by_factor(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def smart_resize(height: int, width: int, factor: int, min_pixels: float, max_pixels: float,
                 max_ratio: float = MAX_RATIO, *, check_order: bool = False,
                 path: Optional[str] = None) -> Tuple[int, int]:
    """qwen-vl-utils' ``smart_resize``: ``(height, width)``, both multiples of `factor`, with
    about the same aspect ratio and a pixel count within [min_pixels, max_pixels].
    ``check_order`` adds 0.0.14's assertion that ``max_pixels >= min_pixels``."""
    if max(height, width) / min(height, width) > max_ratio:
        raise _qwen_error(path, f"absolute aspect ratio must be smaller than {max_ratio}, "
                                f"got {max(height, width) / min(height, width)}")
    if check_order:
        assert max_pixels >= min_pixels, "The max_pixels of image must be greater than or equal to min_pixels."
    h_bar = max(factor, _round_by_factor(height, factor))
    w_bar = max(factor, _round_by_factor(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = _floor_by_factor(height / beta, factor)
        w_bar = _floor_by_factor(width / beta, factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = _ceil_by_factor(height * beta, factor)
        w_bar = _ceil_by_factor(width * beta, factor)
    return h_bar, w_bar


def smart_nframes(ele: Mapping[str, Any], total_frames: int, video_fps: float, s: "QwenSettings",
                  path: Optional[str] = None) -> int:
    """qwen-vl-utils' ``smart_nframes``: how many frames to sample."""
    assert not ("fps" in ele and "nframes" in ele), "Only accept either `fps` or `nframes`"
    ff = s.frame_factor
    if "nframes" in ele:
        nframes = _round_by_factor(ele["nframes"], ff)
    else:
        fps = ele.get("fps", s.fps)
        min_frames = _ceil_by_factor(ele.get("min_frames", s.fps_min_frames), ff)
        max_frames = _floor_by_factor(ele.get("max_frames", min(s.fps_max_frames, total_frames)), ff)
        nframes = total_frames / video_fps * fps
        nframes = min(min(max(nframes, min_frames), max_frames), total_frames)
        nframes = _floor_by_factor(nframes, ff)
    if not (ff <= nframes and nframes <= total_frames):
        raise _qwen_error(path, f"nframes should in interval [{ff}, {total_frames}], but got {nframes}.")
    return int(nframes)


def frame_range(ele: Mapping[str, Any], total_frames: int, video_fps: float,
                path: Optional[str] = None) -> Tuple[int, int, int]:
    """qwen-vl-utils' ``calculate_video_frame_range`` (the decord/torchcodec backends):
    ``(start_frame, end_frame, count)``, both ends included: ``ceil(video_start × fps)`` and
    ``floor(video_end × fps)``, the times clamped to the video's ``total_frames / fps``."""
    if video_fps <= 0:
        raise _qwen_error(path, "video_fps must be a positive number")
    if total_frames <= 0:
        raise _qwen_error(path, "total_frames must be a positive integer")
    video_start = ele.get("video_start", None)
    video_end = ele.get("video_end", None)
    if video_start is None and video_end is None:
        return 0, total_frames - 1, total_frames
    max_duration = total_frames / video_fps
    video_start_clamped = video_end_clamped = 0.0
    if video_start is not None:
        video_start_clamped = max(0.0, min(video_start, max_duration))
        start_frame = math.ceil(video_start_clamped * video_fps)
    else:
        start_frame = 0
    if video_end is not None:
        video_end_clamped = max(0.0, min(video_end, max_duration))
        end_frame = math.floor(video_end_clamped * video_fps)
        end_frame = min(end_frame, total_frames - 1)
    else:
        end_frame = total_frames - 1
    if start_frame >= end_frame:
        raise _qwen_error(
            path,
            f"Invalid time range: Start frame {start_frame} "
            f"(at {video_start_clamped if video_start is not None else 0}s) "
            f"exceeds end frame {end_frame} (at {video_end_clamped if video_end is not None else max_duration}s). "
            f"Video duration: {max_duration:.2f}s ({total_frames} frames @ {video_fps}fps)")
    return start_frame, end_frame, end_frame - start_frame + 1


def linspace_indices(first: int, last: int, count: int) -> List[int]:
    """``torch.linspace(first, last, count).round().long().tolist()`` without torch.

    torch's CPU kernel computes in float32: ``step = (last - first) / (count - 1)``; the first
    half counts up from `first` (``first + step·i``), the second half down from `last`
    (``last - step·(count-1-i)``), each a fused multiply-add (one rounding: torch's AVX2/AVX-512
    kernels are built with FMA), then ``round()`` rounds half to even. The float64 products and
    sums below are exact for frame indices, so rounding them once to float32 is the FMA.
    Checked against torch 2.x on 600 000 (first, last, count) cases, ranges up to 260 000 frames;
    without the FMA (two roundings), 43% of the large cases differ by one frame somewhere.
    """
    if count <= 0:
        return []
    if count == 1:
        return [int(first)]
    start, end = np.float32(first), np.float32(last)
    step = np.float64(np.float32((end - start) / np.float32(count - 1)))
    i = np.arange(count, dtype=np.float64)
    up = (np.float64(start) + step * i).astype(np.float32)
    down = (np.float64(end) - step * (count - 1 - i)).astype(np.float32)
    values = np.where(np.arange(count) < count // 2, up, down)
    return [int(v) for v in np.rint(values)]


# -- settings: qwen-vl-utils' module constants, ms-swift's environment variables ----------------

@dataclass(frozen=True)
class QwenSettings:
    """The constants one :func:`fetch_video` call uses (see :func:`settings`)."""

    version: str  # "0.0.11" (Qwen2.5-VL) or "0.0.14" (Qwen3-VL)
    factor: int
    fps: float
    fps_min_frames: int
    fps_max_frames: int
    frame_factor: int
    video_min_pixels: float
    video_max_pixels: float  # per-frame cap before the total budget
    video_total_pixels: float
    max_ratio: float
    image_min_pixels: float  # smart_resize's defaults, for resized_height/resized_width
    image_max_pixels: float
    rotate: bool = True  # apply the display matrix, as decord 0.6 and torchcodec do


def _qwen_module() -> Any:
    return sys.modules.get("qwen_vl_utils.vision_process")


def _const(name: str, default: Any, convert: Callable[[str], Any], *env: str) -> Any:
    """A constant as qwen-vl-utils would see it: the attribute of an imported
    ``qwen_vl_utils.vision_process`` (where ms-swift writes its overrides), else the first set
    environment variable of `env` (ms-swift's names), else `default`."""
    module = _qwen_module()
    if module is not None and hasattr(module, name):
        return getattr(module, name)
    for var in env or (name,):
        value = os.environ.get(var)
        if value not in (None, ""):
            return convert(value)
    return default


def _int(value: str) -> int:
    return int(float(value))


def settings(image_factor: Optional[int] = None, image_patch_size: Optional[int] = None,
             qwen3: Optional[bool] = None) -> QwenSettings:
    """The constants :func:`fetch_video` uses for a call with these arguments.

    Each comes from an imported ``qwen_vl_utils.vision_process`` module when there is one (the
    values the replaced function would read, ms-swift's overrides included), else from the
    environment variables ms-swift honours, else from qwen-vl-utils' defaults (docs/compat.md).
    """
    if qwen3 is None:
        qwen3 = image_patch_size is not None
    rotate = os.environ.get("CLIPVISOR_QWEN_ROTATE", "1").strip().lower() not in ("0", "false", "no", "off")
    fps = float(_const("FPS", FPS, float))
    min_frames = _const("FPS_MIN_FRAMES", FPS_MIN_FRAMES, _int)
    max_frames = _const("FPS_MAX_FRAMES", FPS_MAX_FRAMES, _int)
    frame_factor = _const("FRAME_FACTOR", FRAME_FACTOR, _int)
    max_ratio = _const("MAX_RATIO", MAX_RATIO, _int)
    if not qwen3:
        factor = IMAGE_FACTOR if image_factor is None else int(image_factor)
        return QwenSettings(
            version="0.0.11", factor=factor, fps=fps, fps_min_frames=min_frames, fps_max_frames=max_frames,
            frame_factor=frame_factor,
            video_min_pixels=_const("VIDEO_MIN_PIXELS", VIDEO_MIN_PIXELS, _int),
            video_max_pixels=_const("VIDEO_MAX_PIXELS", VIDEO_MAX_PIXELS, _int),
            # ms-swift's VIDEO_TOTAL_PIXELS (bare qwen-vl-utils 0.0.11 reads VIDEO_MAX_PIXELS here,
            # QwenLM/Qwen2.5-VL#1120; with the module imported its own value wins, see _const).
            video_total_pixels=_const("VIDEO_TOTAL_PIXELS", VIDEO_TOTAL_PIXELS, _int),
            max_ratio=max_ratio, image_min_pixels=MIN_PIXELS, image_max_pixels=MAX_PIXELS, rotate=rotate)
    patch_size = 14 if image_patch_size is None else int(image_patch_size)
    merge = _const("SPATIAL_MERGE_SIZE", SPATIAL_MERGE_SIZE, _int)
    factor = patch_size * merge
    square = factor * factor

    def tokens(name: str, default: int, pixels_env: str) -> int:
        # ms-swift's compat_qwen_vl_utils: VIDEO_MAX_PIXELS=... becomes VIDEO_MAX_TOKEN_NUM=... // factor².
        module = _qwen_module()
        if module is not None and hasattr(module, name):
            return getattr(module, name)
        if os.environ.get(name):
            return _int(os.environ[name])
        if os.environ.get(pixels_env):
            return _int(os.environ[pixels_env]) // square
        return default

    seq_len = _const("MODEL_SEQ_LEN", MODEL_SEQ_LEN, _int)
    return QwenSettings(
        version="0.0.14", factor=factor, fps=fps, fps_min_frames=min_frames, fps_max_frames=max_frames,
        frame_factor=frame_factor,
        video_min_pixels=tokens("VIDEO_MIN_TOKEN_NUM", VIDEO_MIN_TOKEN_NUM, "VIDEO_MIN_PIXELS") * square,
        video_max_pixels=tokens("VIDEO_MAX_TOKEN_NUM", VIDEO_MAX_TOKEN_NUM, "VIDEO_MAX_PIXELS") * square,
        video_total_pixels=seq_len * factor * factor * 0.9,
        max_ratio=max_ratio,
        image_min_pixels=tokens("IMAGE_MIN_TOKEN_NUM", IMAGE_MIN_TOKEN_NUM, "MIN_PIXELS") * square,
        image_max_pixels=tokens("IMAGE_MAX_TOKEN_NUM", IMAGE_MAX_TOKEN_NUM, "MAX_PIXELS") * square, rotate=rotate)


# -- the plan: what qwen-vl-utils would produce for one clip -----------------------------------

@dataclass
class _Plan:
    start_frame: int
    end_frame: int
    total: int  # frames in the range
    nframes: int
    indices: List[int]
    sample_fps: float
    height: int
    width: int


def _budget(ele: Mapping[str, Any], s: QwenSettings, nframes: int) -> Tuple[float, float]:
    """fetch_video's per-frame (min_pixels, max_pixels) for `nframes` frames."""
    min_pixels = ele.get("min_pixels", s.video_min_pixels)
    total_pixels = ele.get("total_pixels", s.video_total_pixels)
    max_pixels = max(min(s.video_max_pixels, total_pixels / nframes * s.frame_factor), int(min_pixels * 1.05))
    max_pixels_supposed = ele.get("max_pixels", max_pixels)
    if max_pixels_supposed > max_pixels:
        logger.debug("The given max_pixels[%s] exceeds limit[%s].", max_pixels_supposed, max_pixels)
    return min_pixels, min(max_pixels_supposed, max_pixels)


def _output_size(ele: Mapping[str, Any], s: QwenSettings, nframes: int, height: int, width: int,
                 path: Optional[str]) -> Tuple[int, int]:
    qwen3 = s.version != "0.0.11"
    if "resized_height" in ele and "resized_width" in ele:
        return smart_resize(ele["resized_height"], ele["resized_width"], s.factor, s.image_min_pixels,
                            s.image_max_pixels, s.max_ratio, check_order=qwen3, path=path)
    min_pixels, max_pixels = _budget(ele, s, nframes)
    return smart_resize(height, width, s.factor, min_pixels, max_pixels, s.max_ratio, check_order=qwen3, path=path)


def _plan(ele: Mapping[str, Any], s: QwenSettings, total_frames: int, video_fps: float, height: int, width: int,
          path: Optional[str]) -> _Plan:
    start, end, total = frame_range(ele, total_frames, video_fps, path)
    n = smart_nframes(ele, total, video_fps, s, path)
    h, w = _output_size(ele, s, n, height, width, path)
    return _Plan(start, end, total, n, linspace_indices(start, end, n), n / max(total, 1e-6) * video_fps, h, w)


# -- the two ways of asking the worker ---------------------------------------------------------

def _integral(value: Any, low: float, high: float) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return float(value).is_integer() and low <= value <= high


def _direct_request(ele: Mapping[str, Any], s: QwenSettings, path: str) -> Optional[Dict[str, Any]]:
    """Options for one ``video`` call in which the worker's own Qwen rule gives what
    qwen-vl-utils gives, or None when it cannot (a time range, settings outside what the worker's
    rule expresses): then the client probes the clip and asks for exact frames and size."""
    if ele.get("video_start") is not None or ele.get("video_end") is not None:
        return None
    if s.max_ratio != _WORKER_MAX_RATIO or not _integral(s.frame_factor, 1, 1024) or not _integral(s.factor, 1, 4096):
        return None
    opts: Dict[str, Any] = {"rotate": s.rotate, "frame_factor": int(s.frame_factor), "factor": int(s.factor)}
    if "nframes" in ele:
        if not _integral(ele["nframes"], 1, _WORKER_MAX_FRAMES):
            return None
        opts["frames"] = int(ele["nframes"])
    else:
        fps = ele.get("fps", s.fps)
        min_frames = ele.get("min_frames", s.fps_min_frames)
        max_frames = ele.get("max_frames", s.fps_max_frames)
        if (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 1e-6 <= fps <= _WORKER_MAX_FPS
                or not _integral(min_frames, 1, _WORKER_MAX_FRAMES) or not _integral(max_frames, 1, _WORKER_MAX_FRAMES)
                or min_frames > max_frames):
            return None
        opts.update(fps=float(fps), min_frames=int(min_frames), max_frames=int(max_frames))
    if "resized_height" in ele and "resized_width" in ele:
        h, w = smart_resize(ele["resized_height"], ele["resized_width"], s.factor, s.image_min_pixels,
                            s.image_max_pixels, s.max_ratio, check_order=s.version != "0.0.11", path=path)
        if not (_integral(h, 1, 65536) and _integral(w, 1, 65536)):
            return None
        opts.update(width=int(w), height=int(h))
        return opts
    min_pixels = ele.get("min_pixels", s.video_min_pixels)
    total_pixels = ele.get("total_pixels", s.video_total_pixels)
    cap = s.video_max_pixels
    user_max = ele.get("max_pixels")
    requested_max = cap if user_max is None else min(user_max, cap)
    # The worker computes max(min(768·28², total/n·ff), int(min·1.05)) and then takes the smaller
    # of that and max_pixels; with max_pixels = min(user max, cap) this is qwen's value whenever
    # int(min·1.05) ≤ cap ≤ 768·28² (and every value is an integer it accepts).
    if not (_integral(min_pixels, 1, 1 << 40) and _integral(total_pixels, 1, 1 << 50)
            and _integral(requested_max, 1, 1 << 40) and _integral(cap, 1, 1 << 40)):
        return None
    if not (int(min_pixels * 1.05) <= cap <= _WORKER_FRAME_CAP and min_pixels <= requested_max):
        return None
    opts.update(min_pixels=int(min_pixels), max_pixels=int(requested_max), total_pixels=int(total_pixels))
    return opts


def _stream_info(source: Mapping[str, Any], path: str, rotate: bool) -> Tuple[int, float, int, int]:
    """(frame count, fps, height, width) of a probe's or a result's ``source``; the size upright
    when `rotate` (a display matrix of ±90° swaps the sides), else as stored."""
    try:
        total = int(source["frame_count"])
        fps = float(source["fps"])
        height, width = int(source["height"]), int(source["width"])
    except (KeyError, TypeError, ValueError):
        raise ClipUnsupported("unsupported", path, f"{path}: no video stream with a frame count and a frame rate "
                                                   f"(probe: {dict(source)})") from None
    if rotate and int(source.get("rotation") or 0) % 180 == 90:
        height, width = width, height
    return total, fps, height, width


_warned: Set[Tuple[str, str]] = set()
_warned_lock = threading.Lock()


def _warn_once(path: str, kind: str, message: str) -> None:
    with _warned_lock:
        if (path, kind) in _warned:
            return
        _warned.add((path, kind))
    logger.warning("%s", message)


def _decode_planned(client: Client, path: str, ele: Mapping[str, Any], s: QwenSettings,
                    deadline: Optional[float]) -> Tuple[Video, _Plan, float]:
    """Probe, compute qwen's plan here, then ask for exactly those frames at exactly that size."""
    probe = client.probe(path, deadline=deadline)
    source = probe.get("source")
    if not isinstance(source, dict):
        source = {}
    total_frames, fps, height, width = _stream_info(source, path, s.rotate)
    plan = _plan(ele, s, total_frames, fps, height, width, path)
    opts: Dict[str, Any] = {"frames": plan.nframes, "frame_factor": 1, "rotate": s.rotate,
                            "width": plan.width, "height": plan.height}
    # qwen's range is by frame index (time = index / fps); the worker's is [start, end) seconds
    # over the frames' own times. Half a frame either side maps one onto the other exactly for
    # streams whose frames are 1/fps apart; the result's indices are checked below.
    if plan.start_frame > 0:
        opts["start"] = (plan.start_frame - 0.5) / fps
    if plan.end_frame < total_frames - 1:
        opts["end"] = (plan.end_frame + 0.5) / fps
    video = client.video(path, deadline=deadline, **opts)
    got = [int(i) for i in video.indices]
    if got != plan.indices and len(got) == plan.nframes:
        _warn_once(path, "range", f"{path}: frame times are not 1/fps apart; the video_start/video_end range gave "
                                  f"frames {got[0]}..{got[-1]} where qwen-vl-utils' index arithmetic gives "
                                  f"{plan.indices[0]}..{plan.indices[-1]}")
    return video, plan, fps


def _decode(client: Client, path: str, ele: Mapping[str, Any], s: QwenSettings,
            deadline: Optional[float]) -> Tuple[Video, _Plan, float]:
    opts = _direct_request(ele, s, path)
    if opts is None:
        return _decode_planned(client, path, ele, s, deadline)
    try:
        video = client.video(path, deadline=deadline, **opts)
    except (ClipIncompatible, InvalidRequest):
        # The clip cannot give what was asked (too few frames, an extreme aspect ratio): the
        # planned path computes qwen-vl-utils' own error (or, should the worker have been wrong,
        # decodes anyway).
        return _decode_planned(client, path, ele, s, deadline)
    total_frames, fps, height, width = _stream_info(video.source, path, s.rotate)
    if video.frames_in_range is not None:
        total_frames = int(video.frames_in_range)
    plan = _plan(ele, s, total_frames, fps, height, width, path)
    got = [int(i) for i in video.indices]
    if got != plan.indices or (video.height, video.width) != (plan.height, plan.width):
        differ = [(g, w) for g, w in zip(got, plan.indices) if g != w]
        _warn_once(path, "plan", f"{path}: the worker sampled {len(got)} frames at {video.width}x{video.height} where "
                                 f"qwen-vl-utils' rules give {plan.nframes} at {plan.width}x{plan.height}"
                                 + (f"; {len(differ)} indices differ, e.g. {differ[0][0]} for {differ[0][1]}"
                                    if differ else ""))
    return video, plan, fps


# -- fetch_video -------------------------------------------------------------------------------

_torch_checked = False
_torch: Any = None


def _torch_module() -> Any:
    global _torch_checked, _torch
    if not _torch_checked:
        try:
            _torch = importlib.import_module("torch")
        except ImportError:
            _torch = None
        _torch_checked = True
    return _torch


def _as_float(frames: np.ndarray) -> Any:
    torch = _torch_module()
    if torch is None:
        return frames.astype(np.float32)
    return torch.from_numpy(frames).to(torch.float32)


_original: Optional[Callable[..., Any]] = None


def _is_ours(function: Any) -> bool:
    return function is fetch_video or getattr(function, "__module__", None) == __name__


def _original_fetch_video() -> Optional[Callable[..., Any]]:
    """qwen-vl-utils' own fetch_video: saved by :func:`patch`, else whichever of
    ``qwen_vl_utils.vision_process.fetch_video`` and ``qwen_vl_utils.fetch_video`` was not swapped."""
    if _original is not None:
        return _original
    for name in ("qwen_vl_utils.vision_process", "qwen_vl_utils"):
        function = getattr(sys.modules.get(name), "fetch_video", None)
        if function is not None and not _is_ours(function):
            return function
    return None


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://|data:)")  # http://..., s3://..., data:...


def _local_path(video: Any) -> Optional[str]:
    """The local path of ``ele["video"]``, or None for what clipvisor does not decode."""
    if isinstance(video, os.PathLike):
        video = os.fspath(video)
    if not isinstance(video, str):
        return None
    if video.startswith("file://"):
        return video[len("file://"):]
    if _URL.match(video):
        return None
    return video


def fetch_video(ele: Dict[str, Any], image_factor: Any = _UNSET, return_video_sample_fps: Any = _UNSET,
                return_video_metadata: Any = _UNSET, *, image_patch_size: Any = _UNSET,
                client: Optional[Client] = None, deadline: Optional[float] = None) -> Any:
    """qwen-vl-utils' ``fetch_video``, decoded by clipvisor.

    Args:
        ele: ``{"video": path or "file://" URL, "fps" or "nframes", "min_frames", "max_frames",
            "video_start", "video_end", "min_pixels", "max_pixels", "total_pixels",
            "resized_height", "resized_width"}`` as in qwen-vl-utils.
        image_factor: the resize factor (0.0.11's signature; default 28).
        return_video_sample_fps: also return ``sample_fps``.
        return_video_metadata: (0.0.14) also return ``{"fps", "frames_indices",
            "total_num_frames", "video_backend"}``.
        image_patch_size: (0.0.14, keyword) factor = image_patch_size × 2; selects 0.0.14's
            constants.
        client: the :class:`~clipvisor.Client` to use (default: :func:`clipvisor.compat.default_client`).
        deadline: per-clip deadline in seconds (default: the client's).

    Returns:
        ``video`` (float32 ``(T, 3, H, W)``: a torch tensor, or numpy without torch), then
        ``(video, metadata)`` with ``return_video_metadata``, then ``(that, sample_fps)`` with
        ``return_video_sample_fps`` — as qwen-vl-utils.

    Raises:
        ClipSkipped: the clip could not be decoded (a subclass per reason).
        QwenValueError: qwen-vl-utils' ValueErrors (too few frames, empty range, aspect ratio).
        NotImplementedError: an http(s) URL or a list of frames while qwen-vl-utils' own
            fetch_video is not reachable (when it is, such inputs are handed to it).
    """
    given = {k: v for k, v in (("image_factor", image_factor), ("return_video_sample_fps", return_video_sample_fps),
                               ("return_video_metadata", return_video_metadata),
                               ("image_patch_size", image_patch_size)) if v is not _UNSET}
    want_fps = bool(given.get("return_video_sample_fps", False))
    want_meta = bool(given.get("return_video_metadata", False))
    qwen3 = "image_patch_size" in given or want_meta
    path = _local_path(ele["video"])
    if path is None:
        original = _original_fetch_video()
        if original is not None:
            return original(ele, **given)
        raise NotImplementedError(
            f"clipvisor.compat.qwen.fetch_video decodes local files (a path or a file:// URL); got "
            f"{type(ele['video']).__name__} {str(ele['video'])[:200]!r}. Lists of frames and http(s) URLs are handed "
            f"to qwen-vl-utils' own fetch_video when it is imported (clipvisor.compat.qwen.patch() keeps it).")
    if "fps" in ele and "nframes" in ele:
        raise AssertionError("Only accept either `fps` or `nframes`")
    s = settings(image_factor=given.get("image_factor"), image_patch_size=given.get("image_patch_size"),
                 qwen3=qwen3)
    path = os.path.abspath(path)
    video, plan, fps = _decode(client or default_client(), path, ele, s, deadline)
    if len(video) != plan.nframes:
        raise ClipCorrupt("decode_error", path,
                          f"{path}: only {len(video)} of the {plan.nframes} frames qwen-vl-utils samples decoded",
                          detail=video.partial_detail)
    if video.partial:
        _warn_once(path, "partial", f"{path}: decoded with damage: {video.partial_detail}")
    result: Any = _as_float(video.frames)
    if want_meta:
        result = (result, {"fps": fps, "frames_indices": [int(i) for i in video.indices],
                           "total_num_frames": plan.total, "video_backend": "clipvisor"})
    if want_fps:
        return result, plan.sample_fps
    return result


# -- swapping it in ----------------------------------------------------------------------------

def patch() -> None:
    """Makes qwen-vl-utils use :func:`fetch_video`: sets ``qwen_vl_utils.vision_process.fetch_video``
    (what ``process_vision_info`` calls) and ``qwen_vl_utils.fetch_video`` (what ms-swift's
    templates import), keeping the original for inputs clipvisor does not decode (lists of
    frames, URLs). Idempotent."""
    global _original
    package: Any = importlib.import_module("qwen_vl_utils")
    module: Any = importlib.import_module("qwen_vl_utils.vision_process")
    if _original is None:
        for candidate in (getattr(module, "fetch_video", None), getattr(package, "fetch_video", None)):
            if candidate is not None and not _is_ours(candidate):
                _original = candidate
                break
    module.fetch_video = fetch_video
    package.fetch_video = fetch_video


def unpatch() -> None:
    """Puts qwen-vl-utils' own fetch_video back (after :func:`patch`)."""
    global _original
    if _original is None:
        return
    for name in ("qwen_vl_utils.vision_process", "qwen_vl_utils"):
        module: Any = sys.modules.get(name)
        if module is not None and _is_ours(getattr(module, "fetch_video", None)):
            module.fetch_video = _original
    _original = None
