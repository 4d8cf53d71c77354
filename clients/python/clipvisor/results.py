"""Decoded results: :class:`Video`, :class:`Audio` and :class:`Clip` (both, aligned).

Arrays are plain numpy arrays owned by the caller (the block's memfd is already closed).
``to_torch`` imports torch lazily, so everything else works without torch installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from .block import Allocator, read_block_fd
from .errors import ProtocolError
from .gpu import default_uploader, is_cuda
from .slabs import BlockRef, SlabLease

__all__ = ["Video", "Audio", "Clip", "Result", "to_torch", "build_result", "result_of_answer"]


def to_torch(array: np.ndarray, pin_memory: bool = False, device: Any = None, stream: Any = None) -> Any:
    """A torch tensor of `array`.

    - No options: ``torch.from_numpy``, sharing `array`'s memory (no copy).
    - ``pin_memory``: a copy in page-locked memory (for your own asynchronous copies).
    - ``device`` a CUDA device: the bytes go through a page-locked staging slot that is reused
      (:func:`clipvisor.gpu.default_uploader`) and the copy to the device is queued with
      ``non_blocking=True`` on ``stream`` (default: the current stream), so the call returns
      before the copy ends and the next clip is read meanwhile. ``array`` may change at once.
      With a ``stream`` of your own, make the stream that uses the tensor wait for it
      (``torch.cuda.current_stream().wait_stream(stream)``).
    - ``device`` another device: moved there (``tensor.to(device)``).

    Use ``pin_memory``/``device`` in the main process only: CUDA cannot be initialised in forked
    DataLoader workers (there, use ``DataLoader(pin_memory=True)``)."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("to_torch() needs PyTorch: pip install torch (or 'clipvisor[torch]')") from exc
    if is_cuda(device):
        return default_uploader(device).upload(array, stream=stream)
    if stream is not None:
        raise ValueError(f"to_torch(stream=...) is for CUDA devices, not device={device!r}")
    tensor = torch.from_numpy(array)
    if pin_memory:
        tensor = tensor.pin_memory()
    if device is not None:
        tensor = tensor.to(device, non_blocking=pin_memory)
    return tensor


def _common(result: Mapping[str, Any]) -> Dict[str, Any]:
    source = result.get("source")
    warnings = result.get("warnings")
    detail = result.get("partial_detail")
    return {
        "path": str(result.get("path", "")),
        "source": dict(source) if isinstance(source, dict) else {},
        "partial": bool(result.get("partial", False)),
        "partial_detail": detail if isinstance(detail, str) else None,
        "warnings": list(warnings) if isinstance(warnings, list) else [],
        "decode_seconds": float(result.get("decode_seconds") or 0.0),
    }


@dataclass
class Video:
    """Video frames, uint8 RGB: ``(T, 3, H, W)`` for layout TCHW, ``(T, H, W, 3)`` for THWC.

    ``pts`` are the presentation times (seconds from the start of the media, first frame = 0)
    of the frames actually returned, ``indices`` their indices among all frames of the stream,
    ``sample_fps`` the rate they represent (Qwen's ``sample_fps``).
    """

    frames: np.ndarray
    pts: np.ndarray
    indices: np.ndarray
    sample_fps: float
    layout: str
    width: int
    height: int
    path: str = ""
    partial: bool = False
    partial_detail: Optional[str] = None
    source: Dict[str, Any] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    rotation_applied: int = 0
    frames_in_range: Optional[int] = None
    access: Optional[str] = None
    decode_seconds: float = 0.0
    result: Dict[str, Any] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    def to_torch(self, pin_memory: bool = False, device: Any = None, stream: Any = None) -> Any:
        """The frames as a torch uint8 tensor (see :func:`to_torch`)."""
        return to_torch(self.frames, pin_memory, device, stream)

    @classmethod
    def from_result(cls, result: Mapping[str, Any], frames: np.ndarray) -> "Video":
        video = _tensor_metadata(result, "video", frames)
        pts = np.asarray(video.get("pts") or [], dtype=np.float64)
        indices = np.asarray(video.get("indices") or [], dtype=np.int64)
        if len(pts) != frames.shape[0]:
            raise ProtocolError(f"{len(pts)} pts for {frames.shape[0]} frames")
        layout = str(video.get("layout") or "TCHW")
        h, w = (frames.shape[2], frames.shape[3]) if layout == "TCHW" else (frames.shape[1], frames.shape[2])
        return cls(
            frames=frames,
            pts=pts,
            indices=indices,
            sample_fps=float(video.get("sample_fps") or 0.0),
            layout=layout,
            width=int(video.get("width") or w),
            height=int(video.get("height") or h),
            rotation_applied=int(video.get("rotation_applied") or 0),
            frames_in_range=video.get("frames_in_range"),
            access=video.get("access"),
            result=dict(result),
            **_common(result),
        )


def _tensor_metadata(result: Mapping[str, Any], key: str, array: np.ndarray) -> Dict[str, Any]:
    """The result's metadata of one tensor, checked against the tensor the block carried."""
    meta = result.get(key)
    if not isinstance(meta, dict):
        raise ProtocolError(f"a result without its '{key}' metadata")
    shape = meta.get("shape")
    if shape is not None and list(shape) != list(array.shape):
        raise ProtocolError(f"{key} shape {shape} in the result differs from the block's {list(array.shape)}")
    return meta


@dataclass
class Audio:
    """Audio samples, float32 planar ``(channels, n)`` at ``sample_rate``; ``start`` is the time
    of the first sample (seconds from the start of the media)."""

    samples: np.ndarray
    sample_rate: int
    channels: int
    start: float = 0.0
    offset_from_first_frame: Optional[float] = None
    path: str = ""
    partial: bool = False
    partial_detail: Optional[str] = None
    source: Dict[str, Any] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    decode_seconds: float = 0.0
    result: Dict[str, Any] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration(self) -> float:
        return self.samples.shape[1] / self.sample_rate if self.sample_rate else 0.0

    def to_torch(self, pin_memory: bool = False, device: Any = None, stream: Any = None) -> Any:
        """The samples as a torch float32 tensor (see :func:`to_torch`)."""
        return to_torch(self.samples, pin_memory, device, stream)

    @classmethod
    def from_result(cls, result: Mapping[str, Any], samples: np.ndarray) -> "Audio":
        audio = _tensor_metadata(result, "audio", samples)
        offset = audio.get("offset_from_first_frame")
        return cls(
            samples=samples,
            sample_rate=int(audio.get("sample_rate") or 0),
            channels=int(audio.get("channels") or samples.shape[0]),
            start=float(audio.get("start") or 0.0),
            offset_from_first_frame=float(offset) if isinstance(offset, (int, float)) else None,
            result=dict(result),
            **_common(result),
        )


@dataclass
class Clip:
    """Video and audio of one clip, decoded together (audio-in-video). ``audio`` is None when
    the clip has no audio and ``audio_optional`` was asked; ``video`` is None when no video
    was asked."""

    video: Optional[Video]
    audio: Optional[Audio]
    path: str = ""
    partial: bool = False
    partial_detail: Optional[str] = None
    source: Dict[str, Any] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    result: Dict[str, Any] = field(default_factory=dict, repr=False)

    def to_torch(self, pin_memory: bool = False, device: Any = None, stream: Any = None) -> Tuple[Any, Any]:
        """``(frames, samples)`` as torch tensors (None where absent)."""
        return (
            self.video.to_torch(pin_memory, device, stream) if self.video is not None else None,
            self.audio.to_torch(pin_memory, device, stream) if self.audio is not None else None,
        )


#: What a decode returns.
Result = Union[Video, Audio, Clip]


def build_result(kind: str, result: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> Result:
    """The result object of a decode of `kind` (``video``, ``audio`` or ``clip``)."""
    video = audio = None
    if "video" in tensors:
        video = Video.from_result(result, tensors["video"])
    elif isinstance(result.get("video"), dict):
        raise ProtocolError("the result describes video but the block has no video tensor")
    if "audio" in tensors:
        audio = Audio.from_result(result, tensors["audio"])
    elif isinstance(result.get("audio"), dict):
        raise ProtocolError("the result describes audio but the block has no audio tensor")
    if kind == "video":
        if video is None:
            raise ProtocolError("a video decode answered without a video tensor")
        return video
    if kind == "audio":
        if audio is None:
            raise ProtocolError("an audio decode answered without an audio tensor")
        return audio
    return Clip(video=video, audio=audio, result=dict(result), **{
        k: v for k, v in _common(result).items() if k != "decode_seconds"})


def result_of_answer(kind: str, reply: Mapping[str, Any], fd: "Optional[BlockRef]", path: str,
                     allocator: Optional[Allocator] = None, threads: int = 1) -> Result:
    """The result of an ``ok`` answer and its block: the fd that came with it (read, then
    closed) or its slab (read, then released), its tensors decompressed into what
    ``allocator`` returns (default: new arrays), on up to ``threads`` threads."""
    if fd is None:
        raise ProtocolError(f"{path}: the supervisor answered ok without a block")
    if isinstance(fd, SlabLease):
        block = fd.read(allocator, threads)
    else:
        block = read_block_fd(fd, allocator=allocator, threads=threads)  # closes fd, unmaps before returning
    result = reply.get("result")
    if not isinstance(result, dict):
        result = block.result
    return build_result(kind, result, block.tensors)
