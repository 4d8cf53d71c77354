"""`clipvisor-scan` against a real supervisor, on a dataset made here with the ffmpeg CLI (known
sizes, a rotation, frame rates, a VFR clip, a wrong header frame count, a truncated MP4, corrupt,
missing and FIFO entries) plus files of ../shared/corpus/real. Facts are checked against ffprobe,
Qwen plans against qwen-vl-utils' own functions, buckets against a copy of Open-Sora's rules.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from html.parser import HTMLParser
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import pytest

import clipvisor
from clipvisor.scan import cli
from clipvisor.scan.buckets import BucketConfig, load_bucket_config, summarize
from test_integration import BINARY, CORPUS, Supervisor

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.path.exists(BINARY), reason=f"no clipvisor binary at {BINARY} (swift build)"),
]

CORPUS_FILES = ["decord__video_90.mov", "imageio-test_images__realshort.mp4", "jcodec__big_buck_bunny_160x90_ltr.mp4",
                "decord__corrupted.mp4", "go-mediainfo__sample.avi", "decord__flipping_a_pancake.mkv",
                # Packets that are not frames: edit-list preroll (87 packets, 82 frames shown), and
                # packets before the first keyframe of a raw H.264 stream (97 packets, 70 frames).
                "hf-datasets__test_video_66x50.mov", "openh264__BA_MW_D_IDR_LOST.264"]
FIFO_DEADLINE = 2.0


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True, timeout=120)


def natural(size: str, rate: int, seconds: float) -> List[str]:
    """lavfi input that looks like video (noise and motion), not a flat test pattern."""
    return ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={seconds},noise=alls=25:allf=t"]


def rotate_mp4(path: str, out: str) -> None:
    """Writes a display matrix of 90° into the video track's tkhd (FFmpeg 5.1's CLI cannot)."""
    b = bytearray(open(path, "rb").read())
    p = b.find(b"tkhd") - 4
    off = p + (48 if b[p + 8] == 0 else 60)
    struct.pack_into(">9I", b, off, 0, 0x10000, 0, (-0x10000) & 0xFFFFFFFF, 0, 0, 0, 0, 0x40000000)
    open(out, "wb").write(b)


@pytest.fixture(scope="module")
def dataset() -> Iterator[Dict[str, Any]]:
    root = tempfile.mkdtemp(prefix="cvscan-", dir="/tmp")
    d = os.path.join(root, "data")
    os.makedirs(os.path.join(d, "sub"))
    ffmpeg(*natural("320x240", 25, 2), "-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-c:v", "libx264",
           "-preset", "ultrafast", "-c:a", "aac", "-shortest", os.path.join(d, "a.mp4"))
    ffmpeg(*natural("640x360", 30, 1.2), "-c:v", "libx264", "-preset", "ultrafast", os.path.join(d, "sub", "wide.mp4"))
    ffmpeg(*natural("320x180", 30, 1), "-c:v", "libx264", "-preset", "ultrafast", os.path.join(root, "plain.mp4"))
    rotate_mp4(os.path.join(root, "plain.mp4"), os.path.join(d, "rot.mp4"))
    ffmpeg(*natural("256x144", 30, 2), "-vf", "setpts='if(lt(N,20),N*3,60+(N-20))/30/TB'", "-fps_mode", "passthrough",
           "-c:v", "libx264", "-preset", "ultrafast", os.path.join(d, "vfr.mkv"))
    ffmpeg(*natural("320x240", 24, 1.5), "-c:v", "mpeg4", os.path.join(root, "clean.avi"))
    b = bytearray(open(os.path.join(root, "clean.avi"), "rb").read())
    struct.pack_into("<I", b, b.find(b"strh") + 40, 80)  # strh dwLength: the header claims 80 frames, 36 exist
    open(os.path.join(d, "header.avi"), "wb").write(b)
    ffmpeg(*natural("320x240", 25, 4), "-c:v", "libx264", "-preset", "ultrafast", "-movflags", "+faststart",
           os.path.join(root, "whole.mp4"))
    whole = open(os.path.join(root, "whole.mp4"), "rb").read()
    open(os.path.join(d, "truncated.mp4"), "wb").write(whole[: len(whole) // 2])
    junk = np.random.default_rng(1).integers(0, 256, 50_000, np.uint8).tobytes()
    open(os.path.join(d, "corrupt.mp4"), "wb").write(junk)
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=300:duration=1", os.path.join(d, "tone.wav"))
    os.mkfifo(os.path.join(d, "sub", "hang.mp4"))
    for name in CORPUS_FILES:
        if os.path.exists(os.path.join(CORPUS, name)):
            os.symlink(os.path.join(CORPUS, name), os.path.join(d, "corpus-" + name))
    workdir = tempfile.mkdtemp(prefix="cvs-", dir="/tmp")
    sup = Supervisor(workdir)
    sup.start()
    info = {"root": root, "data": d, "sup": sup}
    yield info
    sup.stop()
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(workdir, ignore_errors=True)


def run_scan(ds: Dict[str, Any], out: str, *extra: str, inputs: Optional[List[str]] = None) -> int:
    args = (inputs or [ds["data"]]) + ["--out", out, "--socket", ds["sup"].path, "--deadline", str(FIFO_DEADLINE),
                                        "--no-progress", *extra]
    return cli.main(args)


def rows_of(out: str) -> List[Dict[str, Any]]:
    with open(os.path.join(out, "scan.jsonl")) as f:
        return [json.loads(line) for line in f]


BUCKETS = {"bucket_config": {"360p": {16: (1.0, 2), 32: (1.0, 1)}, "240p": {16: (1.0, 4), 48: (0.5, 2)},
                             "144p": {1: (1.0, 8), 16: (1.0, 8)}}}


@pytest.fixture(scope="module")
def full(dataset: Dict[str, Any]) -> Dict[str, Any]:
    out = os.path.join(dataset["root"], "full")
    bfile = os.path.join(dataset["root"], "buckets.py")
    with open(bfile, "w") as f:  # an Open-Sora training config, as it is
        f.write("num_frames = None\nbucket_config = " + repr(BUCKETS["bucket_config"]) + "\ngrad_checkpoint = True\n")
    t0 = time.monotonic()
    code = run_scan(dataset, out, "--verify", "--qwen", "--buckets", bfile, "--global-batch", "2")
    elapsed = time.monotonic() - t0
    assert code == 0
    rows = rows_of(out)
    return {"out": out, "rows": rows, "by": {os.path.basename(r["path"]): r for r in rows}, "elapsed": elapsed,
            "buckets": bfile}


def ffprobe(path: str, count_frames: bool = False) -> Dict[str, Any]:
    r = subprocess.run(["ffprobe", "-v", "error", "-count_packets", *(["-count_frames"] if count_frames else []),
                        "-show_streams", "-show_format", "-of", "json", path],
                       capture_output=True, text=True, timeout=60)
    return json.loads(r.stdout)


def _rate(text: str) -> float:
    n, d = text.split("/")
    return int(n) / int(d) if int(d) else 0.0


# -- facts ----------------------------------------------------------------------------------------

def test_facts_equal_ffprobe(full: Dict[str, Any]) -> None:
    checked = 0
    exceptions = set()
    for row in full["rows"]:
        if row["status"] != "ok" or not row.get("has_video"):
            continue
        info = ffprobe(row["path"])
        v = next(s for s in info["streams"] if s["index"] == row["video_stream"])
        rotation = next((int(sd["rotation"]) for sd in v.get("side_data_list", []) if "rotation" in sd), 0)
        w, h = int(v["width"]), int(v["height"])
        if abs(rotation) % 180 == 90:
            w, h = h, w
        name = os.path.basename(row["path"])
        assert (row["width"], row["height"]) == (w, h), name
        assert row["rotation"] == (-rotation) % 360, name
        assert row["video_codec"] == v["codec_name"] and row["pixel_format"] == v["pix_fmt"], name
        if row["num_frames"] != int(v["nb_read_packets"]):
            # Only where some packets are not frames: then the count is what decoding every frame gives.
            decoded = next(s for s in ffprobe(row["path"], True)["streams"] if s["index"] == row["video_stream"])
            assert row["num_frames"] == int(decoded["nb_read_frames"]) < int(v["nb_read_packets"]), name
            exceptions.add(name)
        if "nb_frames" in v:
            assert row["header_frames"] == int(v["nb_frames"]), name
        else:
            assert row.get("header_frames") is None, name
        assert row["frames_disagree"] == ("nb_frames" in v and int(v["nb_frames"]) != row["num_frames"]), name
        assert math.isclose(row["fps"], _rate(v["avg_frame_rate"]) or _rate(v["r_frame_rate"]), rel_tol=1e-3), name
        if "duration" in info["format"]:
            assert math.isclose(row["duration"], float(info["format"]["duration"]), abs_tol=0.002), name
        else:  # a raw elementary stream: no container duration
            assert row.get("duration") is None, name
        assert row["size_bytes"] == os.path.getsize(row["path"]) and row["mtime"] == os.stat(row["path"]).st_mtime
        assert row["aspect_ratio"] == h / w and row["resolution"] == h * w
        a = [s for s in info["streams"] if s["codec_type"] == "audio"]
        assert row["has_audio"] == bool(a), name
        if a:
            assert row["audio_sample_rate"] == int(a[0]["sample_rate"]) and row["audio_channels"] == a[0]["channels"]
        checked += 1
    assert checked >= 12
    known = {"corpus-hf-datasets__test_video_66x50.mov", "corpus-openh264__BA_MW_D_IDR_LOST.264"}
    assert exceptions <= known, exceptions
    by = full["by"]
    assert by["corpus-hf-datasets__test_video_66x50.mov"]["frames_disagree"] is True  # 87 in the header, 82 shown
    assert (by["rot.mp4"]["width"], by["rot.mp4"]["height"], by["rot.mp4"]["rotation"]) == (180, 320, 90)
    assert by["header.avi"]["num_frames"] == 36 and by["header.avi"]["header_frames"] == 80
    assert by["header.avi"]["frames_disagree"] is True
    assert by["truncated.mp4"]["header_frames"] == 100 and by["truncated.mp4"]["num_frames"] < 100
    assert by["truncated.mp4"]["frames_disagree"] is True
    assert by["vfr.mkv"]["num_frames"] == 60 and by["a.mp4"]["frames_disagree"] is False


def test_bad_entries_are_rows_with_reasons_and_in_the_skip_log(full: Dict[str, Any], dataset: Dict[str, Any]) -> None:
    by = full["by"]
    assert by["hang.mp4"]["status"] == "failed" and by["hang.mp4"]["reason"] == "timeout"
    assert by["corrupt.mp4"]["reason"] in ("decode_error", "unsupported")
    assert "corrupt.mp4" in by["corrupt.mp4"]["detail"]
    tone = by["tone.wav"]
    assert tone["status"] == "ok" and tone["has_video"] is False and tone["verify"] == "clean"
    # A FIFO costs its deadline, not the scan: everything else ran beside it.
    assert full["elapsed"] < FIFO_DEADLINE + 25, full["elapsed"]
    with clipvisor.Client(dataset["sup"].path, spawn=False) as c:
        skips = c.skips(tag="scan")["skips"]
    paths = {r["path"]: r for r in skips}
    hang = paths[by["hang.mp4"]["path"]]
    assert hang["reason"] == "timeout" and hang["tag"] == "scan"
    assert hang["deadline_ms"] == FIFO_DEADLINE * 1000 and hang["elapsed_ms"] < hang["deadline_ms"] + 1000, hang
    assert by["corrupt.mp4"]["path"] in paths


def test_verify(full: Dict[str, Any]) -> None:
    by = full["by"]
    for name in ("a.mp4", "rot.mp4", "vfr.mkv", "wide.mp4", "corpus-jcodec__big_buck_bunny_160x90_ltr.mp4"):
        assert by[name]["verify"] == "clean", (name, by[name].get("verify_detail"))
        assert by[name]["verify_frames"] == by[name]["num_frames"], name
    broken = by["corpus-decord__corrupted.mp4"]
    assert broken["verify"] == "partial" and broken["verify_frames"] == 49 and broken["verify_break_frame"] == 30
    assert math.isclose(broken["verify_break_s"], 3.0, abs_tol=1e-6)
    cut = by["truncated.mp4"]
    assert cut["verify"] == "partial" and cut["verify_detail"]
    # CSV: Open-Sora's columns first, only clips a training run can read.
    with open(os.path.join(full["out"], "scan.csv"), newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[:7] == ["path", "num_frames", "fps", "height", "width", "aspect_ratio", "resolution"]
    listed = {os.path.basename(r["path"]) for r in table}
    assert "a.mp4" in listed and "corrupt.mp4" not in listed and "hang.mp4" not in listed and "tone.wav" not in listed
    row = next(r for r in table if r["path"].endswith("/a.mp4"))
    assert int(row["num_frames"]) == 50 and float(row["fps"]) == 25.0 and int(row["height"]) == 240
    pq = pytest.importorskip("pyarrow.parquet")
    t = pq.read_table(os.path.join(full["out"], "scan.parquet"))
    assert t.num_rows == len(full["rows"]) and t.column("num_frames").type == "int64"


# -- Qwen -----------------------------------------------------------------------------------------

def test_qwen_plans_equal_qwen_vl_utils(full: Dict[str, Any]) -> None:
    vp = pytest.importorskip("qwen_vl_utils.vision_process")
    checked = 0
    for row in full["rows"]:
        if row.get("qwen_frames") is None:
            continue
        total, fps, h, w = row["num_frames"], row["fps"], row["height"], row["width"]
        n = vp.smart_nframes({}, total_frames=total, video_fps=fps)
        min_pixels, total_pixels = vp.VIDEO_MIN_PIXELS, vp.VIDEO_TOTAL_PIXELS
        max_pixels = max(min(vp.VIDEO_MAX_PIXELS, total_pixels / n * vp.FRAME_FACTOR), int(min_pixels * 1.05))
        rh, rw = vp.smart_resize(h, w, factor=vp.IMAGE_FACTOR, min_pixels=min_pixels, max_pixels=max_pixels)
        assert (row["qwen_frames"], row["qwen_height"], row["qwen_width"]) == (n, rh, rw), row["path"]
        assert row["qwen_tokens"] == math.ceil(n / 2) * (rh // 28) * (rw // 28)
        assert row["qwen_sample_tokens"] == row["qwen_tokens"]  # one clip per sample here
        checked += 1
    assert checked >= 8


def test_qwen3_plans_follow_qwen_vl_utils_0_0_14(full: Dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Qwen3-VL (qwen-vl-utils 0.0.14): patch 16 × merge 2 = factor 32, pixel limits in tokens."""
    for var in ("FPS", "FPS_MAX_FRAMES", "VIDEO_MAX_PIXELS", "VIDEO_MIN_PIXELS", "VIDEO_MAX_TOKEN_NUM",
                "VIDEO_MIN_TOKEN_NUM", "MODEL_SEQ_LEN", "VIDEO_TOTAL_PIXELS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delitem(sys.modules, "qwen_vl_utils.vision_process", raising=False)  # 0.0.11's constants
    from clipvisor.scan.qwenplan import QwenPlanner

    planner = QwenPlanner.create("3")
    checked = 0
    for row in full["rows"]:
        if row.get("status") != "ok" or not row.get("num_frames") or row["num_frames"] < 2:
            continue
        plan = planner.plan(row)
        total, fps, h, w = row["num_frames"], row["fps"], row["height"], row["width"]
        # 0.0.14's smart_nframes and fetch_video budget, written out here.
        n = min(min(max(total / fps * 2.0, 4), math.floor(min(768, total) / 2) * 2), total)
        n = math.floor(n / 2) * 2
        min_px = 128 * 32 * 32
        max_px = max(min(768 * 32 * 32, 128000 * 32 * 32 * 0.9 / n * 2), int(min_px * 1.05))
        hb, wb = max(32, round(h / 32) * 32), max(32, round(w / 32) * 32)
        if hb * wb > max_px:
            beta = math.sqrt(h * w / max_px)
            hb, wb = math.floor(h / beta / 32) * 32, math.floor(w / beta / 32) * 32
        elif hb * wb < min_px:
            beta = math.sqrt(min_px / (h * w))
            hb, wb = math.ceil(h * beta / 32) * 32, math.ceil(w * beta / 32) * 32
        if max(h, w) / min(h, w) > 200:
            assert "aspect ratio" in plan["qwen_error"]
            continue
        assert (plan["qwen_frames"], plan["qwen_height"], plan["qwen_width"]) == (n, hb, wb), row["path"]
        assert plan["qwen_tokens"] == math.ceil(n / 2) * (hb // 32) * (wb // 32)
        checked += 1
    assert checked >= 8


def test_manifests_samples_and_token_totals(dataset: Dict[str, Any], full: Dict[str, Any]) -> None:
    d = dataset["data"]
    manifest = os.path.join(dataset["root"], "train.jsonl")
    with open(manifest, "w") as f:
        f.write(json.dumps({"id": "conv-1", "videos": ["data/a.mp4", "data/rot.mp4"], "messages": []}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": [
            {"type": "video", "video": os.path.join(d, "vfr.mkv")}, {"type": "text", "text": "?"}]}]}) + "\n")
        f.write(json.dumps({"id": "lost", "videos": ["data/missing.mp4"]}) + "\n")
        f.write(json.dumps({"id": "text-only", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    listing = os.path.join(dataset["root"], "clips.txt")
    with open(listing, "w") as f:
        f.write("# a list file: one path per line\n\ndata/tone.wav\n" + os.path.join(d, "gone.mkv") + "\n")
    opensora = os.path.join(dataset["root"], "meta.csv")
    with open(opensora, "w") as f:
        f.write("path,text\ndata/a.mp4,a clip\ndata/corrupt.mp4,bad\n")
    out = os.path.join(dataset["root"], "manifest-out")
    assert run_scan(dataset, out, "--qwen", inputs=[manifest, opensora, listing]) == 0
    rows = rows_of(out)
    assert [(r["sample"], r["clip"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (2, 0), (3, 0), (4, 0), (5, 0), (6, 0),
                                                        (7, 0)]
    assert rows[7]["path"].endswith("data/tone.wav") and rows[7]["status"] == "ok" and rows[7]["has_video"] is False
    assert rows[8]["reason"] == "not_found" and "gone.mkv" in rows[8]["detail"]
    conv = [r for r in rows if r["sample_id"] == "conv-1"]
    both = conv[0]["qwen_tokens"] + conv[1]["qwen_tokens"]
    assert conv[0]["qwen_sample_tokens"] == both == conv[1]["qwen_sample_tokens"]
    by = full["by"]
    assert conv[0]["qwen_tokens"] == by["a.mp4"]["qwen_tokens"]
    assert conv[1]["qwen_tokens"] == by["rot.mp4"]["qwen_tokens"]
    assert rows[3]["reason"] == "not_found" and rows[3]["path"].endswith("data/missing.mp4")
    assert rows[4]["reason"] == "no_media"
    assert rows[5]["sample_id"] == "data/a.mp4" and rows[5]["status"] == "ok"
    assert rows[6]["status"] == "failed"
    with open(os.path.join(out, "samples.csv"), newline="") as f:
        samples = list(csv.DictReader(f))
    assert [s["sample_id"] for s in samples] == ["conv-1", "1", "lost", "text-only", "data/a.mp4", "data/corrupt.mp4",
                                                 "data/tone.wav", os.path.join(d, "gone.mkv")]
    assert samples[0]["clips"] == "2" and samples[0]["status"] == "ok"
    assert int(samples[0]["qwen_sample_tokens"]) == conv[0]["qwen_sample_tokens"]
    assert samples[2]["status"] == "failed" and samples[2]["reasons"] == "not_found"
    assert samples[3]["reasons"] == "no_media" and samples[5]["status"] == "failed"


# -- buckets ------------------------------------------------------------------------------------

class OpenSoraBucket:
    """A test copy of Open-Sora v1.2's Bucket (opensora/datasets/bucket.py) with its own
    aspect-ratio table lookups replaced by the same names → (pixels, ratio keys)."""

    def __init__(self, bucket_config: Dict[str, Any], table: Dict[str, Any]):
        names = sorted(bucket_config, key=lambda x: table[x][0], reverse=True)
        self.bucket_probs: Dict[str, Dict[int, Any]] = {}
        self.bucket_id: Dict[str, Dict[int, int]] = {}
        self.hw_criteria = {k: table[k][0] for k in names}
        self.ar_criteria: Dict[str, Dict[int, Any]] = {}
        n = cnt = 0
        for k in names:
            ts = sorted(bucket_config[k], reverse=True)
            self.bucket_probs[k] = {t: bucket_config[k][t][0] for t in ts}
            self.bucket_id[k], self.ar_criteria[k] = {}, {}
            for t in ts:
                self.bucket_id[k][t] = cnt
                cnt += 1
                self.ar_criteria[k][t] = table[k][1]
                n += len(table[k][1])
        self.num_bucket = n

    def get_bucket_id(self, T: int, H: int, W: int, frame_interval: int = 1, seed: int = 0) -> Any:
        resolution = H * W
        fail = True
        for hw_id, t_criteria in self.bucket_probs.items():
            if resolution < self.hw_criteria[hw_id] * 0.8:
                continue
            if T == 1:
                if 1 in t_criteria:
                    rng = np.random.default_rng(seed + self.bucket_id[hw_id][1])
                    if rng.random() < t_criteria[1]:
                        fail = False
                        t_id = 1
                        break
                else:
                    continue
            t_fail = True
            for t_id, prob in t_criteria.items():
                rng = np.random.default_rng(seed + self.bucket_id[hw_id][t_id])
                if isinstance(prob, tuple):
                    if rng.random() > prob[1]:
                        continue
                if T > t_id * frame_interval and t_id != 1:
                    t_fail = False
                    break
            if t_fail:
                continue
            if isinstance(prob, tuple):
                prob = prob[0]
            if prob >= 1 or rng.random() < prob:
                fail = False
                break
        if fail:
            return None
        ratio = H / W
        return hw_id, t_id, min(self.ar_criteria[hw_id][t_id], key=lambda r: abs(float(r) - ratio))


def test_bucket_assignment_equals_open_sora_on_a_grid() -> None:
    config = {"1080p": {51: (0.5, 1)}, "720p": {51: ((0.7, 0.5), 2), 102: (0.3, 1), 1: (0.4, 30)},
              "480p": {51: (0.6, 6), 102: (1.0, 3), 204: ((0.8, 0.6), 1)}, "240p": {16: (1.0, 12), 1: (1.0, 64)},
              "144p": {1: (0.9, 128), 51: (1.0, 20)}}
    ours = BucketConfig.from_dict(config, frame_interval=2, seed=7, epoch=3)
    theirs = OpenSoraBucket(config, {k: (v[0], list(v[1])) for k, v in ours.resolutions.items()})
    assert ours.num_bucket == theirs.num_bucket
    index = 0
    fits = misses = 0
    for T in (1, 2, 17, 33, 52, 103, 205, 409, 500):
        for H, W in ((90, 160), (144, 256), (200, 200), (240, 426), (360, 640), (480, 854), (640, 480), (720, 1280),
                     (1280, 720), (1080, 1920), (1920, 1080), (2160, 3840), (100, 2000), (64, 64)):
            for _ in range(3):
                expect = theirs.get_bucket_id(T, H, W, 2, 7 + 3 + index * theirs.num_bucket)
                got = ours.assign(T, H, W, index)
                assert got.bucket == expect, (T, H, W, index)
                if expect is None:
                    assert got.reason, (T, H, W)
                    misses += 1
                else:
                    fits += 1
                index += 1
    assert fits > 100 and misses > 20
    assert ours.assign(16, 50, 50, 0).reason.startswith("too small")
    assert ours.assign(3, 720, 1280, 0).reason.startswith("too short")


def test_bucket_config_forms(tmp_path: Any) -> None:
    forms = {"plain.json": '{"240p": {"16": [1.0, 2]}}',
             "literal.txt": "{'240p': {16: (1.0, 2)}}",
             "wrapped.json": '{"bucket_config": {"240p": {"16": [1.0, 2]}}, "frame_interval": 3, "resolutions": '
                             '{"240p": {"pixels": 100000, "ratios": {"0.5": [220, 440], "1.0": [316, 316]}}}}',
             "keyword.py": "dataset = dict(type='VariableVideoTextDataset', bucket_config={'240p': {16: (1.0, 2)}})\n"}
    for name, text in forms.items():
        (tmp_path / name).write_text(text)
        cfg = load_bucket_config(str(tmp_path / name))
        assert list(cfg.probs) == ["240p"] and cfg.batch_size("240p", 16) == 2, name
    wrapped = load_bucket_config(str(tmp_path / "wrapped.json"))
    assert wrapped.frame_interval == 3 and wrapped.num_bucket == 2 and wrapped.target_hw("240p", "0.5") == (220, 440)
    (tmp_path / "code.py").write_text("bucket_config = build_buckets()\n")
    with pytest.raises(ValueError, match="code.py: bucket_config is not a literal"):
        load_bucket_config(str(tmp_path / "code.py"))


def test_bucket_report_in_scan(full: Dict[str, Any]) -> None:
    cfg = load_bucket_config(full["buckets"])
    for row in full["rows"]:
        if row.get("status") != "ok" or not row.get("has_video") or row.get("verify") == "failed":
            continue
        a = cfg.assign(row["num_frames"], row["height"], row["width"], row["sample"])
        assert (row.get("bucket_resolution"), row.get("bucket_frames"), row.get("bucket_aspect_ratio")) == (
            a.bucket if a.bucket else (None, None, None)), row["path"]
        assert row.get("bucket_reason") == a.reason
    assert any(r.get("bucket_reason", "").startswith("too short") for r in full["rows"])  # 3-frame corpus clips
    assert any(r.get("bucket_resolution") == "360p" for r in full["rows"])
    # Per bucket: samples, batches per rank, and minority buckets (fewer than batch size × 2 ranks).
    counts: Dict[Any, int] = {}
    for r in full["rows"]:
        if r.get("bucket_resolution"):
            k = (r["bucket_resolution"], r["bucket_frames"], r["bucket_aspect_ratio"])
            counts[k] = counts.get(k, 0) + 1
    table = summarize(counts, cfg, 2)
    assert sum(t["samples"] for t in table) == sum(counts.values()) and len(table) == len(counts)
    for t in table:
        bs = BUCKETS["bucket_config"][t["resolution"]][t["frames"]][1]
        assert t["batch_size"] == bs and t["minority"] == (t["samples"] < bs * 2)
        assert t["batches_per_rank"] == math.ceil(math.ceil(t["samples"] / 2) / bs)
    assert any(t["minority"] for t in table)


# -- report ---------------------------------------------------------------------------------------

class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: Dict[str, str] = {}
        self.svg = 0
        self.external: List[str] = []
        self.stack: List[str] = []

    def handle_starttag(self, tag: str, attrs: List[Any]) -> None:
        a = dict(attrs)
        if tag == "svg":
            self.svg += 1
        if "id" in a and tag in ("div", "table"):
            self.ids[a["id"]] = tag
        for key in ("src", "href"):
            if a.get(key) and not str(a[key]).startswith("#"):
                self.external.append(a[key])


def test_report_parses_with_its_plots(full: Dict[str, Any]) -> None:
    with open(os.path.join(full["out"], "report.html"), encoding="utf-8") as f:
        page = f.read()
    p = _Page()
    p.feed(page)
    for plot in ("duration", "fps", "aspect", "resolution", "tokens-clip", "tokens-sample", "buckets"):
        assert f"plot-{plot}" in p.ids, plot
    assert p.svg >= 7 and not p.external  # self-contained: nothing fetched
    for table in ("bad", "partial", "disagree", "bucket-table", "unbucketed"):
        assert table in p.ids, table
    assert "hang.mp4" in page and "timeout" in page and "header.avi" in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None,
                    reason="chromium is not installed (apt-get install chromium; scripts/setup.sh does)")
def test_report_renders_in_headless_chromium(full: Dict[str, Any], tmp_path: Any) -> None:
    shot = str(tmp_path / "report.png")
    report = os.path.join(full["out"], "report.html")
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
                        "--window-size=1200,2400", f"--screenshot={shot}", "file://" + report],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    console = [line for line in r.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    import matplotlib.image

    img = matplotlib.image.imread(shot)
    assert img.shape[0] >= 2000 and img.shape[1] >= 1100
    rgb = img[..., :3]
    # Not blank: many distinct colours (text, plot bars, the heat map), and ink on much of the page.
    assert len(np.unique((rgb.reshape(-1, 3) * 255).astype(np.uint8), axis=0)) > 50
    assert (rgb.mean(axis=2) < 0.9).mean() > 0.01
    # The page's script ran (so no script error stopped it): dump the DOM.
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'p2'}",
                          "--dump-dom", "file://" + report], capture_output=True, text=True, timeout=120)
    assert 'data-ready="1"' in dom.stdout


# -- resume, shards, Ctrl-C ----------------------------------------------------------------------

def _comparable(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Rows as facts: a failed clip's message names the worker that was killed (a pid), and a clip
    that timed out in two scans is quarantined: later scans are answered at once, `quarantined`."""
    out = []
    for r in rows:
        r = dict(r)
        if r.get("status") == "failed":
            r.pop("detail", None)
            if r.get("reason") == "quarantined":
                r["reason"] = "timeout"
        out.append(r)
    return out


def test_shards_and_merge_equal_one_run(dataset: Dict[str, Any], full: Dict[str, Any]) -> None:
    outs = []
    for i in range(2):
        out = os.path.join(dataset["root"], f"shard{i}")
        assert run_scan(dataset, out, "--verify", "--qwen", "--buckets", full["buckets"], "--global-batch", "2",
                        "--shard", f"{i}/2") == 0
        outs.append(out)
    assert {r["sample"] % 2 for r in rows_of(outs[1])} == {1}
    merged = os.path.join(dataset["root"], "merged")
    assert cli.main(["merge", merged, *outs]) == 0
    assert _comparable(rows_of(merged)) == _comparable(full["rows"])
    with open(os.path.join(merged, "scan.csv")) as a, open(os.path.join(full["out"], "scan.csv")) as b:
        assert a.read() == b.read()


def test_resume_after_a_torn_write_equals_one_run(dataset: Dict[str, Any], full: Dict[str, Any]) -> None:
    out = os.path.join(dataset["root"], "resumed")
    os.makedirs(out)
    shutil.copy(os.path.join(full["out"], "scan.meta.json"), out)
    with open(os.path.join(full["out"], "scan.jsonl"), "rb") as f:
        lines = f.readlines()
    keep = lines[2:7] + [lines[9]]  # samples out of order, as after an interrupted run
    with open(os.path.join(out, "scan.jsonl"), "wb") as f:
        f.writelines(keep)
        f.write(lines[10][:25])  # a torn line
    assert run_scan(dataset, out, "--verify", "--qwen", "--buckets", full["buckets"], "--global-batch", "2") == 2
    assert run_scan(dataset, out, "--verify", "--qwen", "--buckets", full["buckets"], "--global-batch", "2",
                    "--resume") == 0
    assert _comparable(rows_of(out)) == _comparable(full["rows"])
    # Options that change the rows are refused on resume.
    assert run_scan(dataset, out, "--resume") == 2


def test_ctrl_c_leaves_a_valid_resumable_output(dataset: Dict[str, Any], full: Dict[str, Any]) -> None:
    d = dataset["data"]
    fifo = os.path.join(dataset["root"], f"stuck-{os.getpid()}.mp4")  # new: never timed out, not quarantined
    os.mkfifo(fifo)
    listing = os.path.join(dataset["root"], "interrupt.txt")
    clips = [os.path.join(d, n) for n in ("a.mp4", "rot.mp4", "vfr.mkv", "sub/wide.mp4")]
    clips += [fifo, os.path.join(d, "tone.wav")]
    with open(listing, "w") as f:
        f.write("\n".join(clips) + "\n")
    out = os.path.join(dataset["root"], "interrupted")
    options = ["--verify", "--qwen", "--buckets", full["buckets"], "--global-batch", "2"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "clipvisor.scan", listing, "--out", out, "--socket", dataset["sup"].path,
           "--deadline", "30", "--jobs", "1", "--no-progress", *options]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    rows_path = os.path.join(out, "scan.jsonl")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # four clips, then the FIFO holds the scan
        if os.path.exists(rows_path) and sum(1 for _ in open(rows_path)) >= 4:
            break
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "--resume" in err
    got = rows_of(out)
    assert [r["path"] for r in got] == clips[:4]
    with open(os.path.join(out, "scan.csv"), newline="") as f:
        assert len(list(csv.DictReader(f))) == 4  # the derived files are written for what was scanned
    assert os.path.exists(os.path.join(out, "report.html"))
    assert run_scan(dataset, out, *options, "--resume", inputs=[listing]) == 0
    resumed = {r["path"]: r for r in rows_of(out)}
    assert list(resumed) == clips
    assert resumed[fifo]["reason"] == "timeout"
    same = ("num_frames", "fps", "height", "width", "verify", "verify_frames", "qwen_tokens", "header_frames")
    for path in clips[:4] + clips[5:]:
        mine = full["by"][os.path.basename(path)]
        assert {k: resumed[path].get(k) for k in same} == {k: mine.get(k) for k in same}, path


def test_an_error_of_the_scan_on_one_clip_is_a_row(dataset: Dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    d = dataset["data"]
    real = cli.probe_clip

    def flaky(client: Any, path: str, **kw: Any) -> Dict[str, Any]:
        if path.endswith("rot.mp4"):
            raise RuntimeError("an unexpected probe answer")
        return real(client, path, **kw)

    monkeypatch.setattr(cli, "probe_clip", flaky)
    out = os.path.join(dataset["root"], "scan-error")
    assert run_scan(dataset, out, inputs=[os.path.join(d, "a.mp4"), os.path.join(d, "rot.mp4")]) == 0
    rows = rows_of(out)
    assert rows[0]["status"] == "ok"
    assert rows[1]["reason"] == "scan_error" and "rot.mp4" in rows[1]["detail"] and "RuntimeError" in rows[1]["detail"]


def test_progress_bar_shows_rate_and_eta(dataset: Dict[str, Any]) -> None:
    listing = os.path.join(dataset["root"], "progress.txt")
    with open(listing, "w") as f:
        f.write("data/a.mp4\ndata/rot.mp4\ndata/vfr.mkv\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = os.path.join(dataset["root"], "progress")
    r = subprocess.run([sys.executable, "-m", "clipvisor.scan", listing, "--out", out, "--socket", dataset["sup"].path,
                        "--progress"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    bar = r.stderr.replace("\r", "\n")
    assert "3/3" in bar and "sample/s" in bar and "100%" in bar and "bad=0" in bar, bar


def test_bad_arguments_name_the_file(dataset: Dict[str, Any], capsys: Any) -> None:
    out = os.path.join(dataset["root"], "bad-args")
    assert run_scan(dataset, out, inputs=[os.path.join(dataset["root"], "nope")]) == 2
    assert "nope: no such file" in capsys.readouterr().err
    bad = os.path.join(dataset["root"], "bad.json")
    with open(bad, "w") as f:
        f.write('{"999p": {"16": [1.0, 2]}}')
    assert run_scan(dataset, out, "--buckets", bad) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "999p" in err
    csvfile = os.path.join(dataset["root"], "nopath.csv")
    with open(csvfile, "w") as f:
        f.write("text,num_frames\nx,1\n")
    assert run_scan(dataset, os.path.join(dataset["root"], "bad-csv"), inputs=[csvfile]) == 2
    assert "nopath.csv" in capsys.readouterr().err
