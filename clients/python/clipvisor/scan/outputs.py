"""The scan's files: ``scan.jsonl`` (every clip, the record that ``--resume`` and ``merge`` read),
then, derived from it, ``scan.csv`` (Open-Sora's columns first), ``scan.parquet`` (with pyarrow)
and ``report.html``.

``scan.jsonl`` is written one sample at a time with a single ``write`` on an ``O_APPEND`` file, so
an interrupted scan (Ctrl-C, a killed job) leaves whole samples, at worst followed by one torn line,
which ``--resume`` drops. Samples are written as they complete, in any order; :func:`sort_rows`
puts the file in sample order before the derived files are written, holding only (sample, clip,
offset) per row.
"""

from __future__ import annotations

import csv
import heapq
import json
import math
import os
from array import array
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

__all__ = ["OPEN_SORA_COLUMNS", "COLUMNS", "SAMPLE_COLUMNS", "RowLog", "read_rows", "sort_rows", "write_csv",
           "write_samples_csv", "write_parquet", "merge_row_files", "DoneSet"]

OPEN_SORA_COLUMNS = ["path", "num_frames", "fps", "height", "width", "aspect_ratio", "resolution"]
COLUMNS = OPEN_SORA_COLUMNS + [
    "sample", "sample_id", "clip", "sample_clips", "kind", "status", "reason", "detail",
    "container", "video_stream", "video_codec", "pixel_format", "rotation", "stored_width", "stored_height",
    "header_frames", "frame_count_source", "frames_disagree", "duration", "video_duration", "start_time",
    "bit_rate", "video_bit_rate", "has_video", "has_audio", "audio_codec", "audio_sample_rate", "audio_channels",
    "audio_duration", "size_bytes", "mtime",
    "verify", "verify_frames", "verify_break_frame", "verify_break_s", "verify_reason", "verify_detail",
    "qwen_frames", "qwen_height", "qwen_width", "qwen_sample_fps", "qwen_tokens", "qwen_sample_tokens", "qwen_error",
    "bucket_resolution", "bucket_frames", "bucket_aspect_ratio", "bucket_reason", "note",
]
_INT = {"num_frames", "height", "width", "resolution", "sample", "clip", "sample_clips", "rotation", "stored_width",
        "stored_height", "video_stream", "header_frames", "bit_rate", "video_bit_rate", "audio_sample_rate",
        "audio_channels",
        "size_bytes", "verify_frames", "verify_break_frame", "qwen_frames", "qwen_height", "qwen_width", "qwen_tokens",
        "qwen_sample_tokens", "bucket_frames"}
_FLOAT = {"fps", "aspect_ratio", "duration", "video_duration", "start_time", "audio_duration", "mtime",
          "verify_break_s", "qwen_sample_fps"}
_BOOL = {"frames_disagree", "has_video", "has_audio"}


class DoneSet:
    """Which sample numbers are complete, one bit each (1 M samples: 125 kB)."""

    def __init__(self) -> None:
        self.bits = bytearray()
        self.count = 0

    def add(self, i: int) -> None:
        byte = i >> 3
        if byte >= len(self.bits):
            self.bits.extend(b"\0" * (byte + 1 - len(self.bits) + 4096))
        if not self.bits[byte] & (1 << (i & 7)):
            self.bits[byte] |= 1 << (i & 7)
            self.count += 1

    def __contains__(self, i: int) -> bool:
        byte = i >> 3
        return byte < len(self.bits) and bool(self.bits[byte] & (1 << (i & 7)))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _dump(row: Mapping[str, Any]) -> bytes:
    """One JSON line; a NaN or infinity (which JSON cannot hold) is written as null."""
    try:
        text = json.dumps(row, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(dict(row)), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return (text + "\n").encode()


class RowLog:
    """``scan.jsonl``, appended one whole sample per ``write``."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def write_sample(self, rows: Sequence[Mapping[str, Any]]) -> None:
        data = b"".join(_dump(r) for r in rows)
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_rows(path: str) -> Iterator[Dict[str, Any]]:
    """The rows of a ``scan.jsonl``; a torn last line (an interrupted write) is ignored."""
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                return
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def recover(path: str) -> DoneSet:
    """Prepares ``scan.jsonl`` for ``--resume``: drops a torn last line and the rows of samples
    that are incomplete (interrupted between their clips), and returns the complete samples."""
    done = DoneSet()
    if not os.path.exists(path):
        return done
    counts: Dict[int, int] = {}
    need: Dict[int, int] = {}
    good_end = 0
    with open(path, "rb") as f:
        offset = 0
        for line in f:
            if not line.endswith(b"\n"):
                break
            offset += len(line)
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            good_end = offset
            s = int(row["sample"])
            counts[s] = counts.get(s, 0) + 1
            need[s] = int(row.get("sample_clips") or 1)
            if counts[s] == need[s]:
                done.add(s)
                del counts[s], need[s]
    incomplete = set(counts)
    if incomplete or good_end != os.path.getsize(path):
        tmp = path + ".tmp"
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            read = 0
            for line in src:
                read += len(line)
                if read > good_end:
                    break
                try:
                    if int(json.loads(line)["sample"]) in incomplete:
                        continue
                except (json.JSONDecodeError, KeyError, ValueError):
                    continue
                dst.write(line)
        os.replace(tmp, path)
    return done


def _key(row: Mapping[str, Any]) -> Tuple[int, int]:
    return int(row.get("sample", 0)), int(row.get("clip", 0))


def sort_rows(path: str) -> None:
    """Puts ``scan.jsonl`` in (sample, clip) order if a resume appended out of order; memory is
    three integers per row."""
    last = (-1, -1)
    ordered = True
    for row in read_rows(path):
        k = _key(row)
        if k < last:
            ordered = False
            break
        last = k
    if ordered:
        return
    samples, clips, offsets = array("q"), array("q"), array("q")
    with open(path, "rb") as f:
        offset = 0
        for line in f:
            if line.endswith(b"\n"):
                s, c = _key(json.loads(line))
                samples.append(s)
                clips.append(c)
                offsets.append(offset)
            offset += len(line)
    order = sorted(range(len(offsets)), key=lambda i: (samples[i], clips[i]))
    tmp = path + ".tmp"
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        for i in order:
            src.seek(offsets[i])
            dst.write(src.readline())
    os.replace(tmp, path)


def _cell(column: str, value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and column in _FLOAT:
        return repr(value)
    return value


def usable(row: Mapping[str, Any]) -> bool:
    """A clip a training run can read: probed, a video stream with frames, not failed by ``--verify``."""
    return (row.get("status") == "ok" and bool(row.get("has_video")) and (row.get("num_frames") or 0) > 0
            and row.get("verify") != "failed")


def write_csv(rows: Iterable[Mapping[str, Any]], path: str) -> int:
    """Open-Sora's CSV (``path, num_frames, fps, height, width, aspect_ratio, resolution``) plus
    clipvisor's columns, for the clips a training run can read (failed clips are in the JSONL, the
    report and the skip log). Returns the row count."""
    n = 0
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for row in rows:
            if not usable(row):
                continue
            w.writerow([_cell(c, row.get(c)) for c in COLUMNS])
            n += 1
    os.replace(tmp, path)
    return n


SAMPLE_COLUMNS = ["sample", "sample_id", "clips", "usable_clips", "failed_clips", "damaged_clips", "status", "reasons",
                  "duration", "num_frames", "qwen_sample_tokens", "paths"]


def _sample_row(rows: List[Mapping[str, Any]]) -> List[Any]:
    failed = [r for r in rows if r.get("status") != "ok"]
    damaged = [r for r in rows if r.get("verify") in ("partial", "failed")]
    ok = sum(1 for r in rows if usable(r) or (r.get("status") == "ok" and not r.get("has_video")
                                               and r.get("verify") != "failed"))
    status = "ok" if not failed and not damaged else "failed" if failed or any(
        r.get("verify") == "failed" for r in damaged) else "partial"
    reasons = sorted({str(r.get("reason")) for r in failed} | {f"verify:{r.get('verify')}" for r in damaged})
    duration = sum(float(r.get("duration") or 0) for r in rows)
    frames = sum(int(r.get("num_frames") or 0) for r in rows)
    first = rows[0]
    return [first.get("sample"), first.get("sample_id"), len(rows), ok, len(failed), len(damaged), status,
            " ".join(reasons), repr(duration), frames, _cell("qwen_sample_tokens", first.get("qwen_sample_tokens")),
            " ".join(str(r.get("path")) for r in rows)]


def write_samples_csv(rows: Iterable[Mapping[str, Any]], path: str) -> int:
    """``samples.csv``: one row per sample (a conversation with several clips is one row): its clips,
    how many are usable, failed or damaged, ``ok`` / ``partial`` / ``failed``, the reasons, total
    duration and frames, and its Qwen visual tokens. Rows must come in sample order."""
    n = 0
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(SAMPLE_COLUMNS)
        group: List[Mapping[str, Any]] = []
        for row in rows:
            if group and row.get("sample") != group[0].get("sample"):
                w.writerow(_sample_row(group))
                n += 1
                group = []
            group.append(row)
        if group:
            w.writerow(_sample_row(group))
            n += 1
    os.replace(tmp, path)
    return n


def write_parquet(rows: Iterable[Mapping[str, Any]], path: str, batch: int = 8192) -> Optional[int]:
    """Every clip (failed ones too, with ``status``) as Parquet; None when pyarrow is missing."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return None
    fields = []
    for c in COLUMNS:
        t = pa.int64() if c in _INT else pa.float64() if c in _FLOAT else pa.bool_() if c in _BOOL else pa.string()
        fields.append(pa.field(c, t))
    schema = pa.schema(fields)
    tmp = path + ".tmp"
    n = 0
    writer = pq.ParquetWriter(tmp, schema)
    try:
        chunk: Dict[str, List[Any]] = {c: [] for c in COLUMNS}

        def flush() -> None:
            if chunk["path"]:
                writer.write_table(pa.table({c: pa.array(chunk[c], type=schema.field(c).type) for c in COLUMNS},
                                            schema=schema))
                for c in COLUMNS:
                    chunk[c].clear()

        for row in rows:
            for c in COLUMNS:
                v = row.get(c)
                if v is not None and c not in _INT | _FLOAT | _BOOL and not isinstance(v, str):
                    v = str(v)
                chunk[c].append(v)
            n += 1
            if len(chunk["path"]) >= batch:
                flush()
        flush()
    finally:
        writer.close()
    os.replace(tmp, path)
    return n


def merge_row_files(paths: Sequence[str], out: str) -> int:
    """Merges sorted ``scan.jsonl`` files (shards) into one, in sample order, streaming."""
    n = 0
    tmp = out + ".tmp"
    with open(tmp, "wb") as dst:
        for row in heapq.merge(*(read_rows(p) for p in paths), key=_key):
            dst.write(_dump(row))
            n += 1
    os.replace(tmp, out)
    return n
