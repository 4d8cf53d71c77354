"""clipvisor.compat.audio against an independent decode by the ffmpeg CLI.

The reference for ``load_audio(path, 16000)`` (librosa.load(path, sr=16000, mono=True)[0]) is
``ffmpeg -i path -vn -ar 16000 -ac <the file's channels> -f f32le -`` averaged over the channels
(librosa's mono is the mean of the channels; ``-ac 1`` would be FFmpeg's own downmix, which
weighs a stereo pair 0.707 each). Bound: the same length and at most MAX_ABS_DIFF apart per
sample — both resample with libswresample's defaults, so only the order of float operations
differs. librosa itself (soxr_hq) is compared where it is installed, at MIN_SNR_DB.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import tempfile
import time
from typing import Iterator

import numpy as np
import pytest

import clipvisor
import clipvisor.compat
from clipvisor.compat import audio
from test_integration import BINARY, Supervisor, media

MAX_ABS_DIFF = 1e-6
MIN_SNR_DB = 30.0  # against librosa's soxr_hq resampler; measured 34.6 dB (22.05 kHz snare) to 124 dB

pytestmark = pytest.mark.skipif(not os.path.exists(BINARY), reason=f"no clipvisor binary at {BINARY}")

# Audio-only files and containers whose audio starts with the media (no video-first offset).
FILES = [
    "librosa__test_audio.flac",                 # 44.1 kHz stereo FLAC
    "hf-datasets__test_audio_44100.wav",        # 44.1 kHz stereo s16
    "librosa__snare-accelerate.ogg",            # 22.05 kHz mono Vorbis, 30 s
    "hf-datasets__test_audio_48000.opus",       # 48 kHz mono Opus
    "hf-datasets__test_audio_16000.mp3",        # 16 kHz stereo MP3: no resampling
    "audiowaveform__test_file_stereo.flac",     # 16 kHz stereo
    "decord__flipping_a_pancake.mkv",           # H.264 + Opus in Matroska
    "go-mediainfo__sample.avi",                 # MPEG-4 + MP3 in AVI
    "libavg__44.1kHz_24bit_stereo.aif",         # 24-bit big-endian AIFF
]


def ffmpeg_reference(path: str, rate: int = 16000) -> np.ndarray:
    channels = int(subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries", "stream=channels", "-of", "csv=p=0",
         path],
        capture_output=True, text=True, check=True).stdout.strip())
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", path, "-vn", "-ar", str(rate), "-ac", str(channels),
                          "-f", "f32le", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, dtype=np.float32).reshape(-1, channels).mean(axis=1, dtype=np.float32)


@pytest.fixture(scope="module")
def cv() -> Iterator[clipvisor.Client]:
    if subprocess.run(["ffmpeg", "-version"], capture_output=True).returncode != 0:
        pytest.skip("no ffmpeg CLI for the reference decode")
    workdir = tempfile.mkdtemp(prefix="cva-", dir="/tmp")
    s = Supervisor(workdir)
    s.start()
    c = clipvisor.Client(s.path, spawn=False, margin=15.0, tag="pytest-compat-audio")
    yield c
    c.close()
    s.stop()
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("name", FILES)
def test_load_audio_matches_ffmpeg(cv: clipvisor.Client, name: str) -> None:
    path = media(name)
    y = audio.load_audio(path, 16000, client=cv)
    ref = ffmpeg_reference(path)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.ndim == 1 and y.flags["C_CONTIGUOUS"]
    assert y.shape == ref.shape
    assert float(np.abs(y - ref).max()) <= MAX_ABS_DIFF
    assert float(np.abs(ref).max()) > 0.01  # real sound, not silence


def test_signatures(cv: clipvisor.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    path = media("librosa__test_audio.flac")  # 44.1 kHz stereo, 5.19 s
    y, sr = audio.load_audio(path, 8000, return_sr=True, client=cv)
    assert sr == 8000 and y.shape == ffmpeg_reference(path, 8000).shape
    # librosa.load's signature: native rate, both channels, a part
    both, sr = audio.load(path, sr=None, mono=False, client=cv)
    assert sr == 44100 and both.shape[0] == 2 and both.dtype == np.float32
    mono, _ = audio.load(path, sr=None, client=cv)
    assert np.allclose(mono, both.mean(axis=0), atol=1e-7)
    part, sr = audio.load(path, sr=16000, offset=1.0, duration=2.0, client=cv)
    assert sr == 16000 and abs(part.shape[0] - 32000) <= 1
    full = ffmpeg_reference(path)
    assert float(np.abs(part[1000:30000] - full[17000:46000]).max()) < 1e-3
    as64, _ = audio.load("file://" + path, sr=16000, dtype=np.float64, client=cv)
    assert as64.dtype == np.float64 and as64.shape == full.shape
    # the shared default client
    monkeypatch.setattr(clipvisor.compat, "_client", cv)
    assert audio.load_audio(path).shape == full.shape


def test_bad_inputs(cv: clipvisor.Client) -> None:
    d = tempfile.mkdtemp(prefix="cva-bad-", dir="/tmp")
    try:
        with pytest.raises(clipvisor.ClipNotFound):
            audio.load_audio(os.path.join(d, "missing.wav"), client=cv)
        with pytest.raises(clipvisor.ClipUnsupported):  # a video without audio
            audio.load_audio(media("jcodec__big_buck_bunny_160x90_ltr.mp4"), client=cv)
        with pytest.raises(NotImplementedError, match="local files"):
            audio.load_audio("https://example.com/a.wav", client=cv)
        with pytest.raises(NotImplementedError):
            audio.load_audio(b"RIFF....", client=cv)  # type: ignore[arg-type]
        fifo = os.path.join(d, "hang.wav")
        os.mkfifo(fifo)
        t0 = time.monotonic()
        with pytest.raises(clipvisor.ClipTimeout) as info:
            audio.load_audio(fifo, client=cv, deadline=1.0)
        assert time.monotonic() - t0 < 2.0 and info.value.path == fifo
    finally:
        import shutil

        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(importlib.util.find_spec("librosa") is None, reason="librosa is not installed")
@pytest.mark.parametrize("name", ["librosa__test_audio.flac", "hf-datasets__test_audio_44100.wav",
                                  "hf-datasets__test_audio_16000.mp3", "librosa__snare-accelerate.ogg"])
def test_close_to_librosa(cv: clipvisor.Client, name: str) -> None:
    import librosa

    path = media(name)
    theirs, sr = librosa.load(path, sr=16000, mono=True)
    ours = audio.load_audio(path, 16000, client=cv)
    assert sr == 16000 and ours.dtype == theirs.dtype == np.float32
    assert abs(len(ours) - len(theirs)) <= 2
    n = min(len(ours), len(theirs))
    noise = float(np.sum((ours[:n] - theirs[:n]) ** 2))
    snr = 10 * np.log10(float(np.sum(theirs[:n] ** 2)) / max(noise, 1e-30))
    assert snr >= MIN_SNR_DB, snr
