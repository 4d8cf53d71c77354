"""Open-Sora's bucket rules (``opensora/datasets/bucket.py``, v1.2 ``Bucket.get_bucket_id``), so
that a scan says which bucket each clip lands in, which fit none and why, and which buckets hold
fewer samples than one global batch.

The config is Open-Sora's ``bucket_config``: resolution name → {frame count: (keep probability,
batch size)}; a keep probability may be a pair ``(keep, frame-bucket probability)``. The rules:
resolutions are tried from the largest pixel budget down, a clip qualifies for one when
``H × W ≥ 0.8 × budget``; in it, frame buckets from the longest down, the first with
``T > t × frame_interval`` (a 1-frame clip only goes to a ``1`` bucket); it stays there with the
keep probability, else tries the next smaller resolution; the aspect-ratio bucket is the closest
ratio key to ``H / W``. The draws use ``numpy.random.default_rng(seed)`` with Open-Sora's sampler
seeds, ``seed + epoch + index × num_bucket`` plus the (resolution, frames) bucket's number, so the
assignment is the one epoch ``epoch`` of a training run makes.
"""

from __future__ import annotations

import ast
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

__all__ = ["BucketConfig", "BucketError", "load_bucket_config", "RESOLUTIONS", "Assignment"]

# Pixel budgets of Open-Sora's resolution names (opensora/datasets/aspect.py, v1.2).
_VIDEO_RATIOS = ["0.38", "0.43", "0.48", "0.50", "0.53", "0.54", "0.56", "0.62", "0.67", "0.75", "1.00",
                 "1.33", "1.50", "1.78", "1.89", "2.00", "2.08"]
_PIXART_RATIOS = ["0.25", "0.26", "0.27", "0.28", "0.32", "0.33", "0.35", "0.4", "0.42", "0.48", "0.5", "0.52",
                  "0.57", "0.6", "0.68", "0.72", "0.78", "0.82", "0.88", "0.94", "1.0", "1.07", "1.13", "1.21",
                  "1.29", "1.38", "1.46", "1.67", "1.75", "2.0", "2.09", "2.4", "2.5", "2.89", "3.0", "3.11",
                  "3.62", "3.75", "3.88", "4.0"]
_BUDGETS = {"144p": (36864, _VIDEO_RATIOS), "240p": (102240, _VIDEO_RATIOS), "360p": (230400, _VIDEO_RATIOS),
            "480p": (409920, _VIDEO_RATIOS), "720p": (921600, _VIDEO_RATIOS), "1080p": (2073600, _VIDEO_RATIOS),
            "2k": (3686400, _VIDEO_RATIOS), "4k": (8294400, _VIDEO_RATIOS),
            "256": (65536, _PIXART_RATIOS), "512": (262144, _PIXART_RATIOS), "1024": (1048576, _PIXART_RATIOS),
            "2048": (4194304, _PIXART_RATIOS), "2880": (8294400, _PIXART_RATIOS)}


def _target_hw(ratio: float, pixels: int) -> Tuple[int, int]:
    """An even (H, W) near `pixels` with H / W ≈ `ratio` (Open-Sora's get_h_w rule; its tables
    were made this way, and a few entries were adjusted by hand: the size is shown, never used to
    assign)."""
    h = (pixels * ratio) ** 0.5 + 1e-4
    h = math.ceil(h) if math.ceil(h) % 2 == 0 else math.floor(h)
    w = h / ratio + 1e-4
    w = math.ceil(w) if math.ceil(w) % 2 == 0 else math.floor(w)
    return int(h), int(w)


def _resolution(name: str, pixels: int, ratios: Any) -> Tuple[int, "OrderedDict[str, Tuple[int, int]]"]:
    table: "OrderedDict[str, Tuple[int, int]]" = OrderedDict()
    if isinstance(ratios, Mapping):
        for k, v in ratios.items():
            table[str(k)] = (int(v[0]), int(v[1]))
    else:
        for k in ratios:
            table[str(k)] = _target_hw(float(k), pixels)
    return pixels, table


RESOLUTIONS: Dict[str, Tuple[int, "OrderedDict[str, Tuple[int, int]]"]] = {
    name: _resolution(name, px, keys) for name, (px, keys) in _BUDGETS.items()}


class BucketError(ValueError):
    """A bucket config that cannot be used: names the file and what is wrong."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass
class Assignment:
    """Where one clip goes: ``bucket`` (resolution, frames, ratio) or ``reason`` when nowhere."""

    bucket: Optional[Tuple[str, int, str]]
    reason: Optional[str] = None


@dataclass
class BucketConfig:
    """A parsed bucket config: the probabilities and batch sizes in Open-Sora's order."""

    probs: "OrderedDict[str, OrderedDict[int, Any]]"
    batch_sizes: "OrderedDict[str, OrderedDict[int, Optional[int]]]"
    resolutions: Dict[str, Tuple[int, "OrderedDict[str, Tuple[int, int]]"]]
    frame_interval: int = 1
    seed: int = 0
    epoch: int = 0
    source: str = ""
    bucket_ids: Dict[Tuple[str, int], int] = field(default_factory=dict)
    num_bucket: int = 0

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], resolutions: Optional[Mapping[str, Any]] = None,
                  source: str = "<config>", **kw: Any) -> "BucketConfig":
        table = dict(RESOLUTIONS)
        for name, spec in (resolutions or {}).items():
            try:
                table[str(name)] = _resolution(str(name), int(spec["pixels"]), spec["ratios"])
            except (KeyError, TypeError, ValueError, IndexError):
                raise BucketError(source, f"resolution {name!r} needs {{\"pixels\": N, \"ratios\": [...] or "
                                          f"{{ratio: [h, w]}}}}") from None
        if not isinstance(config, Mapping) or not config:
            raise BucketError(source, "the bucket config must be a non-empty mapping of "
                                      "resolution → {frames: (prob, batch size)}")
        for name in config:
            if str(name) not in table:
                raise BucketError(source, f"unknown resolution {name!r} (known: {', '.join(sorted(table))}; "
                                          f"or define it under \"resolutions\")")
        probs: "OrderedDict[str, OrderedDict[int, Any]]" = OrderedDict()
        sizes: "OrderedDict[str, OrderedDict[int, Optional[int]]]" = OrderedDict()
        for name in sorted((str(n) for n in config), key=lambda n: table[n][0], reverse=True):
            frames = config[name] if name in config else config[int(name)]  # type: ignore[index]
            if not isinstance(frames, Mapping):
                raise BucketError(source, f"{name}: expected {{frames: (keep probability, batch size)}}, "
                                          f"got {frames!r}")
            p: "OrderedDict[int, Any]" = OrderedDict()
            b: "OrderedDict[int, Optional[int]]" = OrderedDict()
            for t in sorted(frames, key=lambda x: int(x), reverse=True):
                entry = frames[t]
                if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                    raise BucketError(source, f"{name}[{t}]: expected (keep probability, batch size), got {entry!r}")
                prob, bs = entry
                p[int(t)] = tuple(prob) if isinstance(prob, list) else prob
                b[int(t)] = None if bs is None else int(bs)
            probs[name], sizes[name] = p, b
        self = cls(probs, sizes, table, source=source, **kw)
        n = 0
        count = 0
        for name, p in probs.items():
            for t in p:
                self.bucket_ids[(name, t)] = n
                n += 1
                count += len(table[name][1])
        self.num_bucket = count
        return self

    # -- Open-Sora's get_bucket_id, with the reason when nothing fits ---------------------------

    def assign(self, T: int, H: int, W: int, index: int) -> Assignment:
        import numpy as np

        seed = self.seed + self.epoch + index * self.num_bucket
        resolution = H * W
        qualified = False
        frames_fit = False
        chosen: Optional[Tuple[str, int]] = None
        for hw_id, t_probs in self.probs.items():
            if resolution < self.resolutions[hw_id][0] * 0.8:
                continue
            qualified = True
            if T == 1:
                if 1 in t_probs:
                    frames_fit = True
                    rng = np.random.default_rng(seed + self.bucket_ids[(hw_id, 1)])
                    if rng.random() < t_probs[1]:
                        chosen = (hw_id, 1)
                        break
                continue
            t_found = False
            t_id, prob = 0, 0.0
            rng = np.random.default_rng(seed)
            for t_id, prob in t_probs.items():
                rng = np.random.default_rng(seed + self.bucket_ids[(hw_id, t_id)])
                if isinstance(prob, tuple):
                    if rng.random() > prob[1]:
                        continue
                if T > t_id * self.frame_interval and t_id != 1:
                    t_found = True
                    break
            if not t_found:
                continue
            frames_fit = True
            keep = prob[0] if isinstance(prob, tuple) else prob
            if keep >= 1 or rng.random() < keep:
                chosen = (hw_id, t_id)
                break
        if chosen is None:
            return Assignment(None, self._why(T, H, W, qualified, frames_fit))
        hw_id, t_id = chosen
        ratio = H / W
        ar_id = min(self.resolutions[hw_id][1].keys(), key=lambda r: abs(float(r) - ratio))
        return Assignment((hw_id, t_id, ar_id))

    def _why(self, T: int, H: int, W: int, qualified: bool, frames_fit: bool) -> str:
        if not qualified:
            smallest = min(self.probs, key=lambda n: self.resolutions[n][0])
            px = self.resolutions[smallest][0]
            return (f"too small: {W}x{H} = {H * W} pixels, below 0.8 × {smallest} ({px} pixels) = {int(px * 0.8)}, "
                    f"the smallest resolution configured")
        if not frames_fit:
            if T == 1:
                return "a single frame, and no resolution it qualifies for has a 1-frame bucket"
            ts = [t for p in self.probs.values() for t in p if t != 1]
            if not ts:
                return f"{T} frames, but only 1-frame buckets are configured"
            shortest = min(ts)
            return (f"too short: {T} frames; the shortest frame bucket ({shortest}) needs more than "
                    f"{shortest * self.frame_interval} (frame_interval {self.frame_interval})")
        return "dropped by the keep probabilities of every bucket it fits (a seeded draw, as in training)"

    def batch_size(self, hw_id: str, t_id: int) -> Optional[int]:
        return self.batch_sizes[hw_id][t_id]

    def target_hw(self, hw_id: str, ar_id: str) -> Tuple[int, int]:
        return self.resolutions[hw_id][1][ar_id]

    def describe(self) -> Dict[str, Any]:
        return {"source": self.source, "frame_interval": self.frame_interval, "seed": self.seed, "epoch": self.epoch,
                "num_bucket": self.num_bucket,
                "config": {n: {str(t): [list(p) if isinstance(p, tuple) else p, self.batch_sizes[n][t]]
                               for t, p in ps.items()} for n, ps in self.probs.items()}}


def _literal(text: str, path: str) -> Any:
    """A JSON document, a Python literal, or a Python config file with ``bucket_config = {...}``
    (an Open-Sora training config can be given as it is)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as e:
        raise BucketError(path, f"neither JSON nor Python: {e.msg} at line {e.lineno}") from None
    def literal(node: ast.AST, what: str) -> Any:
        try:
            return ast.literal_eval(node)
        except ValueError:
            raise BucketError(path, f"{what} is not a literal (line {getattr(node, 'lineno', '?')}); "
                                    f"the file is read, never run") from None

    if len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr):
        return literal(tree.body[0].value, "the expression")
    found: Dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id in ("bucket_config", "resolutions", "frame_interval"):
                    found[target.id] = literal(node.value, target.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if node.target.id == "bucket_config" and node.value is not None:
                found["bucket_config"] = literal(node.value, "bucket_config")
    if "bucket_config" not in found:
        # Open-Sora's training configs assign it at the top level; a config that passes it as a
        # keyword (dataset = dict(..., bucket_config={...})) is read from the first such keyword.
        for sub in ast.walk(tree):
            if isinstance(sub, ast.keyword) and sub.arg == "bucket_config":
                found["bucket_config"] = literal(sub.value, "bucket_config")
                break
    if "bucket_config" not in found:
        raise BucketError(path, "no bucket_config in this Python file")
    return found


def load_bucket_config(path: str, *, frame_interval: Optional[int] = None, seed: int = 0,
                       epoch: int = 0) -> BucketConfig:
    """Reads a bucket config: JSON or a Python literal of Open-Sora's ``bucket_config``, or
    ``{"bucket_config": ..., "resolutions": {...}, "frame_interval": N}``, or an Open-Sora Python
    config file holding ``bucket_config = {...}``."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise BucketError(path, e.strerror or str(e)) from None
    data = _literal(text, path)
    resolutions = None
    interval = 1
    if isinstance(data, Mapping) and "bucket_config" in data:
        resolutions = data.get("resolutions")
        interval = int(data.get("frame_interval", 1))
        data = data["bucket_config"]
    return BucketConfig.from_dict(data, resolutions, source=os.path.abspath(path),
                                  frame_interval=frame_interval if frame_interval is not None else interval,
                                  seed=seed, epoch=epoch)


def summarize(counts: Mapping[Tuple[str, int, str], int], config: BucketConfig, ranks: int) -> List[Dict[str, Any]]:
    """Per-bucket rows: samples, batch size, batches per rank (Open-Sora pads a bucket to a
    multiple of the ranks, then each rank cuts its share into batches), and whether it is a
    minority bucket (fewer samples than one global batch: batch size × ranks)."""
    out = []
    def order(kv: Tuple[Tuple[str, int, str], int]) -> Tuple[int, int, float]:
        (hw, t, ar), _ = kv
        return -config.resolutions[hw][0], -t, float(ar)

    for (hw, t, ar), n in sorted(counts.items(), key=order):
        bs = config.batch_size(hw, t)
        per_rank = math.ceil(n / ranks)
        batches = math.ceil(per_rank / bs) if bs else None
        out.append({"resolution": hw, "frames": t, "aspect_ratio": ar, "target": list(config.target_hw(hw, ar)),
                    "samples": n, "batch_size": bs, "batches_per_rank": batches,
                    "minority": bool(bs) and n < bs * ranks})  # type: ignore[operator]
    return out
