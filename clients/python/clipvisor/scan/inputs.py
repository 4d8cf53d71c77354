"""What to scan: a directory, a list file, or a dataset manifest, read as a stream of samples.

A *sample* is what a training loader reads as one item: one clip for a directory, a list file or
an Open-Sora CSV row; the clips of one conversation for ms-swift / LLaMA-Factory / Qwen JSON(L)
rows (``videos``, ``audios``, or ``messages`` with ``{"type": "video", "video": ...}`` items).
Samples are numbered in input order (the Open-Sora CSV row number is its ``id``); relative paths
are taken against the manifest's directory unless ``base`` says otherwise.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Optional, Tuple

__all__ = ["Sample", "ClipRef", "InputError", "read_samples", "MEDIA_EXTENSIONS"]

MEDIA_EXTENSIONS = frozenset(
    ".mp4 .m4v .mov .mkv .webm .avi .flv .wmv .mpg .mpeg .ts .m2ts .mts .3gp .ogv .vob .gif .mxf .asf .y4m .ivf "
    ".h264 .264 .hevc .265 .mp3 .wav .flac .m4a .aac .ogg .opus .wma .aiff .aif".split())
AUDIO_EXTENSIONS = frozenset(".mp3 .wav .flac .m4a .aac .ogg .opus .wma .aiff .aif".split())


class InputError(ValueError):
    """An input that cannot be read as a dataset: names the file and the reason."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class ClipRef:
    """One clip of a sample: its absolute path and whether the manifest calls it audio."""

    path: str
    kind: str = "video"  # "video" or "audio"


@dataclass
class Sample:
    """One training item: its number in the input, an id, and its clips."""

    index: int
    id: str
    clips: List[ClipRef] = field(default_factory=list)


def _resolve(path: str, base: str) -> str:
    path = os.path.expanduser(path)
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(base, path))


def _walk(root: str) -> Iterator[str]:
    """Media files under `root`, recursively, in a stable order (names sorted per directory, files
    before subdirectories), one directory at a time: a flat directory of 1 M clips holds 1 M names
    (about 100 MB) while it is listed, never DirEntry objects or other directories' listings."""
    stack = [root]
    while stack:
        d = stack.pop()
        files: List[str] = []
        subdirs: List[str] = []
        try:
            with os.scandir(d) as it:
                for entry in it:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            subdirs.append(entry.name)
                            continue
                    except OSError:
                        pass
                    if os.path.splitext(entry.name)[1].lower() in MEDIA_EXTENSIONS:
                        files.append(entry.name)
        except OSError as e:
            print(f"clipvisor scan: cannot list {d}: {e.strerror}", file=sys.stderr)
            continue
        files.sort()
        for name in files:
            yield os.path.join(d, name)
        del files
        stack.extend(os.path.join(d, name) for name in sorted(subdirs, reverse=True))


PATH_COLUMNS = ("path", "video", "video_path", "file", "filename", "filepath", "clip", "media", "audio", "audio_path")


def _csv_samples(path: str, base: str, delimiter: str) -> Iterator[Tuple[str, List[ClipRef]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = [h.strip() for h in (reader.fieldnames or [])]
        column = next((c for c in PATH_COLUMNS if c in header), None)
        if column is None:
            raise InputError(path, f"no path column (looked for {', '.join(PATH_COLUMNS)}; the header is {header})")
        kind = "audio" if column.startswith("audio") else "video"
        for row in reader:
            value = (row.get(column) or "").strip()
            if not value:
                yield "", []
                continue
            yield value, [ClipRef(_resolve(value, base), kind)]


def _media_of(value: Any) -> List[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):  # {"video": "a.mp4", "fps": 2} (qwen-vl-utils element)
        for key in ("video", "audio", "path", "url"):
            if isinstance(value.get(key), str):
                return [value[key]]
        return []
    if isinstance(value, (list, tuple)):
        # A video given as a list of frame images is not a clip file; skip such entries.
        if value and all(isinstance(v, str) for v in value) and all(
                os.path.splitext(v)[1].lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp") for v in value):
            return []
        out: List[str] = []
        for v in value:
            out.extend(_media_of(v))
        return out
    return []


def _json_clips(record: Any, base: str) -> List[ClipRef]:
    """The clips of one ms-swift / LLaMA-Factory / Qwen record."""
    if not isinstance(record, dict):
        return []
    clips: List[ClipRef] = []
    for key, kind in (("videos", "video"), ("video", "video"), ("audios", "audio"), ("audio", "audio")):
        for p in _media_of(record.get(key)):
            clips.append(ClipRef(_resolve(p, base), kind))
    for message in record.get("messages") or record.get("conversations") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for item in content:
            if not isinstance(item, dict):
                continue
            item_kind = item.get("type")
            if item_kind == "video" or item_kind == "audio":
                for p in _media_of(item.get(item_kind)):
                    clips.append(ClipRef(_resolve(p, base), str(item_kind)))
    return clips


def _record_id(record: Any, index: int) -> str:
    if isinstance(record, dict):
        for key in ("id", "sample_id", "uid"):
            if isinstance(record.get(key), (str, int)):
                return str(record[key])
    return str(index)


def _json_records(path: str) -> Iterator[Any]:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if path.endswith(".jsonl") or not head.startswith(b"["):
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(path, f"line {number} is not JSON: {e.msg}") from None
        return
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(path, f"not JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(data, list):
        raise InputError(path, "a JSON manifest must be a list of records")
    yield from data


def read_samples(source: str, base: Optional[str] = None) -> Iterator[Sample]:
    """The samples of `source` (a directory, a media file, a list file, a CSV/TSV or JSON/JSONL
    manifest), in input order. Raises :class:`InputError` for an input that cannot be read."""
    if not os.path.exists(source):
        raise InputError(source, "no such file or directory")
    if os.path.isdir(source):
        for i, p in enumerate(_walk(os.path.abspath(source))):
            yield Sample(i, p, [ClipRef(p, "audio" if os.path.splitext(p)[1].lower() in AUDIO_EXTENSIONS else "video")])
        return
    ext = os.path.splitext(source)[1].lower()
    root = base if base is not None else os.path.dirname(os.path.abspath(source))
    if ext in MEDIA_EXTENSIONS:
        yield Sample(0, os.path.abspath(source), [ClipRef(os.path.abspath(source))])
        return
    try:
        if ext in (".csv", ".tsv"):
            for i, (value, clips) in enumerate(_csv_samples(source, root, "\t" if ext == ".tsv" else ",")):
                yield Sample(i, value or str(i), clips)
        elif ext in (".json", ".jsonl"):
            for i, record in enumerate(_json_records(source)):
                yield Sample(i, _record_id(record, i), _json_clips(record, root))
        else:  # a list file: one path per line, '#' comments
            with open(source, encoding="utf-8") as f:
                i = 0
                for line in f:
                    line = line.strip()
                    if not line or line.startswith("#"):
                        continue
                    p = _resolve(line, root)
                    yield Sample(i, line, [ClipRef(p)])
                    i += 1
    except UnicodeDecodeError:
        raise InputError(source, "not a text manifest (expected a directory, a list file, CSV/TSV or "
                                 "JSON/JSONL)") from None
    except OSError as e:
        raise InputError(source, e.strerror or str(e)) from None
