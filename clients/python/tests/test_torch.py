"""to_torch(): runs where torch is installed, skipped cleanly where it is not."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from clipvisor.results import Audio, Clip, Video

HAVE_TORCH = importlib.util.find_spec("torch") is not None


def make_video() -> Video:
    frames = np.arange(2 * 3 * 4 * 5, dtype=np.uint8).reshape(2, 3, 4, 5)
    return Video(frames=frames, pts=np.array([0.0, 0.5]), indices=np.array([0, 15]), sample_fps=2.0,
                 layout="TCHW", width=5, height=4)


def make_audio() -> Audio:
    return Audio(samples=np.ones((1, 16000), dtype=np.float32), sample_rate=16000, channels=1)


def test_numpy_path_needs_no_torch() -> None:
    v = make_video()
    assert v.frames.sum() > 0 and len(v) == 2 and make_audio().duration == 1.0


@pytest.mark.skipif(HAVE_TORCH, reason="torch is installed")
def test_to_torch_without_torch_says_how_to_get_it() -> None:
    with pytest.raises(ImportError, match="pip install torch"):
        make_video().to_torch()


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed (optional: pip install 'clipvisor[torch]')")
def test_to_torch_shares_memory_and_dtypes() -> None:
    import torch

    v, a = make_video(), make_audio()
    t = v.to_torch()
    assert t.dtype == torch.uint8 and tuple(t.shape) == (2, 3, 4, 5)
    t[0, 0, 0, 0] = 99
    assert v.frames[0, 0, 0, 0] == 99  # zero-copy
    assert a.to_torch().dtype == torch.float32
    vt, at = Clip(video=v, audio=a).to_torch()
    assert vt.shape == t.shape and at.shape == (1, 16000)
    assert Clip(video=v, audio=None).to_torch()[1] is None


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed")
def test_to_torch_pinned_and_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    v = make_video()
    pinned = v.to_torch(pin_memory=True)
    assert pinned.is_pinned()
    on_gpu = v.to_torch(pin_memory=True, device="cuda")
    torch.cuda.synchronize()
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), torch.from_numpy(v.frames))
