"""Clip options: from the Python calls' keyword arguments to the protocol's fields.

:class:`~clipvisor.Client`'s methods take Python-shaped options (``rotate=False``, ``deadline``
in seconds, ``video={"fps": 1}`` dicts, ``options={...}`` of raw protocol keys); the protocol
(docs/protocol.md) takes flat fields (``no_rotate``, ``deadline_ms``). Everything here is pure:
no connection, no I/O, so the mapping is tested without a supervisor. The supervisor validates
every value (and answers :class:`~clipvisor.InvalidRequest` naming the field); the client only
refuses what it cannot map (an unknown Python keyword: ``TypeError``; a sample item without a
path: ``ValueError``).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Union

__all__ = [
    "PathLike",
    "ClipSpec",
    "SELECTION_KEYS",
    "default_tag",
    "absolute_path",
    "ms",
    "protocol_fields",
    "expand_sides",
    "video_options",
    "sample_specs",
    "deadline_seconds",
    "clip_deadline_seconds",
]

PathLike = Union[str, "os.PathLike[str]"]

#: The three ways of selecting frames; one given in a narrower place replaces the others.
SELECTION_KEYS = ("fps", "frames", "timestamps")

# Python option names that are protocol keys as they are.
_DIRECT_KEYS = {
    "fps", "frames", "timestamps", "start", "end", "min_frames", "max_frames", "frame_factor", "width",
    "height", "max_pixels", "min_pixels", "total_pixels", "factor", "layout", "sample_rate", "channels",
    "threads", "level", "max_source_pixels", "max_output_bytes", "audio_optional", "tag",
}

#: The supervisor's default deadline when its hello does not say (docs/protocol.md).
_FALLBACK_DEADLINE_S = 30.0


class ClipSpec(NamedTuple):
    """One clip of a request: the result kind (``video``, ``audio`` or ``clip``), the absolute
    path, and the protocol fields (without ``path``)."""

    kind: str
    path: str
    fields: Dict[str, Any]


def default_tag() -> Optional[str]:
    """The job id of the scheduler this runs under, for the skip log: ``slurm-$SLURM_JOB_ID``
    or ``torchelastic-$TORCHELASTIC_RUN_ID``."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{job}" + (f"-{task}" if task else "")
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if run:
        return f"torchelastic-{run}"
    return None


def absolute_path(path: PathLike) -> str:
    """The path the supervisor is sent: absolute (it does not share our working directory),
    with a ``file://`` prefix removed."""
    p = os.fspath(path)
    if isinstance(p, bytes):  # pragma: no cover - typing says str
        p = os.fsdecode(p)
    if p.startswith("file://"):
        p = p[len("file://"):]
    return os.path.abspath(p)


def ms(seconds: float) -> int:
    """Seconds as the protocol's whole milliseconds, at least 1 (0 would mean no time at all)."""
    return max(1, int(round(seconds * 1000)))


def protocol_fields(options: Mapping[str, Any]) -> Dict[str, Any]:
    """Protocol keys for Python-side clip options (``rotate=False`` → ``no_rotate``, ``video=False``
    → ``no_video``, ``deadline`` seconds → ``deadline_ms``; ``None`` values left out)."""
    out: Dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            continue
        if key in _DIRECT_KEYS:
            out[key] = list(value) if key == "timestamps" else value
        elif key == "rotate":
            if not value:
                out["no_rotate"] = True
        elif key == "video":
            if not value:
                out["no_video"] = True
        elif key == "audio":
            if value:
                out["audio"] = True
        elif key == "deadline":
            out["deadline_ms"] = ms(float(value))
        elif key == "deadline_ms":
            out["deadline_ms"] = int(value)
        elif key == "options":
            out.update(value)
        elif key in ("path", "pass_fd"):
            pass
        else:
            raise TypeError(f"unknown clip option {key!r}")
    return out


def expand_sides(options: Mapping[str, Any]) -> Dict[str, Any]:
    """Options with ``video``/``audio`` dicts (as :meth:`Client.clip` takes them, e.g.
    ``video={"fps": 1, "max_pixels": 200704}``) flattened: the dict's options join the others and
    the side becomes ``True``. A frame selection inside ``video`` replaces one outside it."""
    out = dict(options)
    for side in ("video", "audio"):
        value = out.get(side)
        if isinstance(value, Mapping):
            inner = dict(value)
            if side == "video" and any(k in inner for k in SELECTION_KEYS):
                for k in SELECTION_KEYS:
                    out.pop(k, None)
            out[side] = True
            out.update(inner)
    return out


def video_options(fps: Optional[float], frames: Optional[int], timestamps: Optional[Sequence[float]],
                  **rest: Any) -> Dict[str, Any]:
    """The options of a video request: ``fps`` has a default, so it is sent only when no other
    selection was asked for."""
    opts: Dict[str, Any] = dict(rest)
    if frames is not None:
        opts["frames"] = frames
    elif timestamps is not None:
        opts["timestamps"] = timestamps
    else:
        opts["fps"] = fps
    return opts


def sample_specs(clips: Sequence[Union[PathLike, Mapping[str, Any]]], defaults: Mapping[str, Any]) -> List[ClipSpec]:
    """The clips of :meth:`Client.sample`: each item (a path, or a dict with ``path`` and the
    options of :meth:`Client.video`, ``video``/``audio`` as for :meth:`Client.clip`) over the
    keyword `defaults`; a clip's own frame selection replaces the default's."""
    specs: List[ClipSpec] = []
    base = expand_sides(defaults)
    for item in clips:
        opts: Dict[str, Any] = dict(base)
        if isinstance(item, Mapping):
            own = expand_sides(item)
            if any(k in own for k in SELECTION_KEYS):
                for k in SELECTION_KEYS:
                    opts.pop(k, None)
            opts.update(own)
            path = opts.get("path")
            if path is None:
                raise ValueError("every clip of a sample needs a 'path'")
        else:
            path = item
        want_video = opts.get("video", True) is not False
        want_audio = bool(opts.get("audio", False))
        kind = "clip" if (want_video and want_audio) else ("audio" if want_audio else "video")
        if kind == "audio":
            for k in SELECTION_KEYS:
                opts.pop(k, None)
        elif "frames" not in opts and "timestamps" not in opts:
            opts.setdefault("fps", 2.0)
        specs.append(ClipSpec(kind, absolute_path(path), protocol_fields(opts)))
    return specs


def deadline_seconds(deadline: Optional[float], hello: Mapping[str, Any]) -> float:
    """A request's deadline in seconds: `deadline`, else the supervisor's default (its hello's
    ``deadline_ms_default``, else 30 s), capped at its ``deadline_ms_max``."""
    if deadline is None:
        default_ms = hello.get("deadline_ms_default")
        deadline = (default_ms / 1000.0) if isinstance(default_ms, (int, float)) and default_ms > 0 \
            else _FALLBACK_DEADLINE_S
    max_ms = hello.get("deadline_ms_max")
    if isinstance(max_ms, (int, float)) and max_ms > 0:
        deadline = min(deadline, max_ms / 1000.0)
    return float(deadline)


def clip_deadline_seconds(fields: Mapping[str, Any], hello: Mapping[str, Any]) -> float:
    """The deadline in seconds a clip of a sample asks for itself (0 when it does not)."""
    value = fields.get("deadline_ms")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return deadline_seconds(value / 1000.0, hello)
    return 0.0
