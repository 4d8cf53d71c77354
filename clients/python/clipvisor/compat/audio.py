"""Audio loaders with the shape of the ones training frameworks call (docs/compat.md).

- :func:`load_audio` is ms-swift's ``load_audio(audio, sampling_rate, return_sr=False)``: what
  ``librosa.load(path, sr=sampling_rate, mono=True)[0]`` returns, a float32 1-D numpy array.
- :func:`load` has the signature of ``librosa.load`` (``sr``, ``mono``, ``offset``,
  ``duration``, ``dtype``) and returns ``(y, sr)``, for code that calls ``librosa.load`` (e.g.
  LLaMA-Factory's ``mm_plugin``).

Both decode in a clipvisor worker (FFmpeg, every channel resampled by libswresample) under the
client's deadline, and average the channels here for ``mono`` as librosa does: a file that would
hang audioread's ffmpeg pipe raises :class:`~clipvisor.ClipTimeout` instead. Samples are not
bit-identical to librosa's, which resamples with soxr_hq; see docs/compat.md.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple, Union

import numpy as np

from ..client import Client
from ..errors import ClipUnsupported
from . import default_client

__all__ = ["load_audio", "load"]

PathLike = Union[str, "os.PathLike[str]"]


def _path(audio: Any, caller: str) -> str:
    if isinstance(audio, os.PathLike):
        audio = os.fspath(audio)
    if isinstance(audio, str) and not audio.startswith(("http://", "https://", "data:")):
        return audio[len("file://"):] if audio.startswith("file://") else audio
    shown = audio[:200] if isinstance(audio, str) else type(audio).__name__
    raise NotImplementedError(f"clipvisor.compat.audio.{caller} decodes local files (a path or a file:// URL), "
                              f"not {shown!r}")


def _audio_stream(client: Client, path: str, deadline: Optional[float]) -> Tuple[int, int]:
    """(sample rate, channels) of the file's audio stream, probed by a worker."""
    probe = client.probe(path, deadline=deadline)
    source = probe.get("source")
    if not isinstance(source, dict):
        source = {}
    rate, channels = source.get("audio_sample_rate"), source.get("audio_channels")
    if not isinstance(rate, (int, float)) or rate <= 0 or not isinstance(channels, int) or channels <= 0:
        raise ClipUnsupported("unsupported", path, f"{path}: no audio stream")
    return int(rate), channels


def load(path: PathLike, *, sr: Optional[float] = 22050, mono: bool = True, offset: float = 0.0,
         duration: Optional[float] = None, dtype: Any = np.float32, client: Optional[Client] = None,
         deadline: Optional[float] = None) -> Tuple[np.ndarray, int]:
    """``librosa.load`` for a local file: ``(y, sr)``.

    ``y`` is 1-D with ``mono=True`` or for a mono file, else ``(channels, n)``; ``sr=None`` keeps
    the file's rate. ``offset``/``duration`` in seconds select a part (from the start of the
    media). As librosa, ``mono`` averages the channels (FFmpeg's own downmix, the worker's
    ``channels=1``, weighs a stereo pair 0.707 each instead of 0.5): the worker decodes every
    channel, resampled, and the mean is taken here. Raises :class:`~clipvisor.ClipSkipped` for a
    file that cannot be decoded (``ClipUnsupported`` when it has no audio).
    """
    name = os.path.abspath(_path(path, "load"))
    client = client or default_client()
    native_rate, channels = _audio_stream(client, name, deadline)
    rate = native_rate if sr is None else int(round(sr))
    start = float(offset) if offset else None
    end = (float(offset or 0.0) + float(duration)) if duration is not None else None
    audio = client.audio(name, sample_rate=rate, channels=channels, start=start, end=end, deadline=deadline)
    samples = audio.samples
    if samples.shape[0] == 1:
        y = samples.reshape(-1)
    elif mono:
        y = samples.mean(axis=0, dtype=np.float32)
    else:
        y = samples
    if np.dtype(dtype) != y.dtype:
        y = y.astype(dtype)
    return y, rate


def load_audio(audio: PathLike, sampling_rate: int = 16000, return_sr: bool = False, *,
               client: Optional[Client] = None, deadline: Optional[float] = None) -> Any:
    """ms-swift's ``load_audio``: ``librosa.load(audio, sr=sampling_rate, mono=True)[0]``
    (``(y, sr)`` with ``return_sr``), decoded by clipvisor. ``y`` is float32 and 1-D.

    Raises :class:`~clipvisor.ClipSkipped` (a timeout, a corrupt or missing file, no audio
    stream: ``ClipUnsupported``) instead of hanging.
    """
    y, sr = load(_path(audio, "load_audio"), sr=sampling_rate, mono=True, client=client, deadline=deadline)
    return (y, sr) if return_sr else y
