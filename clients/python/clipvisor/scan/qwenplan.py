"""What qwen-vl-utils would make of each clip: frames sampled, output size, visual tokens.

The rules are :mod:`clipvisor.compat.qwen`'s (qwen-vl-utils 0.0.11 for Qwen2.5-VL, 0.0.14 for
Qwen3-VL, with ms-swift's environment variables), applied to the probed frame count, frame rate and
upright size, so a plan equals what ``fetch_video`` returns for the clip. Visual tokens follow the
Qwen-VL processors: frames are grouped by ``temporal_patch_size`` (2; an odd count is padded with
its last frame), and each group of ``factor × factor`` pixels (patch × spatial merge) is one token:
``ceil(n / 2) × (h / factor) × (w / factor)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from ..compat import qwen as _qwen

__all__ = ["QwenPlanner"]

TEMPORAL_PATCH_SIZE = 2


@dataclass
class QwenPlanner:
    """Plans clips with one set of qwen-vl-utils settings and the per-video ``ele`` options
    (``fps``, ``min_frames``, ``max_frames``, ``min_pixels``, ``max_pixels``, ``total_pixels``)."""

    settings: _qwen.QwenSettings
    element: Dict[str, Any]
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE

    @classmethod
    def create(cls, version: str = "2.5", **element: Any) -> "QwenPlanner":
        qwen3 = version.startswith("3")
        s = _qwen.settings(image_patch_size=16 if qwen3 else None, qwen3=qwen3)
        return cls(s, {k: v for k, v in element.items() if v is not None})

    def describe(self) -> Dict[str, Any]:
        s = self.settings
        return {"version": s.version, "factor": s.factor, "fps": self.element.get("fps", s.fps),
                "min_frames": self.element.get("min_frames", s.fps_min_frames),
                "max_frames": self.element.get("max_frames", s.fps_max_frames),
                "min_pixels": self.element.get("min_pixels", s.video_min_pixels),
                "max_pixels": self.element.get("max_pixels", s.video_max_pixels),
                "total_pixels": self.element.get("total_pixels", s.video_total_pixels)}

    def plan(self, row: Mapping[str, Any]) -> Dict[str, Any]:
        """``qwen_frames``, ``qwen_height``, ``qwen_width``, ``qwen_tokens`` for a probed clip row,
        or ``qwen_error`` with qwen-vl-utils' own message when it would raise."""
        path = row.get("path")
        try:
            total = int(row["num_frames"])
            fps = float(row["fps"])
            height, width = int(row["height"]), int(row["width"])
        except (KeyError, TypeError, ValueError):
            return {"qwen_error": "no video stream with a frame count, a frame rate and a size"}
        if not self.settings.rotate:
            height, width = int(row.get("stored_height") or height), int(row.get("stored_width") or width)
        try:
            p = _qwen._plan(self.element, self.settings, total, fps, height, width, path)
        except (ValueError, AssertionError, ZeroDivisionError) as e:
            return {"qwen_error": str(e)}
        return {"qwen_frames": p.nframes, "qwen_height": p.height, "qwen_width": p.width,
                "qwen_sample_fps": p.sample_fps, "qwen_tokens": self.tokens(p.nframes, p.height, p.width)}

    def tokens(self, frames: int, height: int, width: int) -> int:
        f = self.settings.factor
        return math.ceil(frames / self.temporal_patch_size) * (height // f) * (width // f)


def sample_tokens(rows: Any) -> Optional[int]:
    """Visual tokens of a sample: the sum over its clips, None when any clip has no plan."""
    total = 0
    for r in rows:
        t = r.get("qwen_tokens")
        if t is None:
            return None
        total += int(t)
    return total
