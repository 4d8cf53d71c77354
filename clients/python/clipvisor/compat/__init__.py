"""Drop-in replacements for the media loaders of existing training code (docs/compat.md).

- :mod:`clipvisor.compat.qwen`: ``fetch_video`` with the input and output of qwen-vl-utils'
  ``fetch_video`` (Qwen2.5-VL, 0.0.11; Qwen3-VL, 0.0.14), decoded by clipvisor::

      import clipvisor.compat.qwen
      clipvisor.compat.qwen.patch()      # or: vision_process.fetch_video = clipvisor.compat.qwen.fetch_video

- :mod:`clipvisor.compat.audio`: ``load_audio`` (ms-swift's ``load_audio``: what
  ``librosa.load(path, sr=16000, mono=True)[0]`` gives) and a librosa-shaped ``load``.

These functions share one process-wide :class:`~clipvisor.Client`, made when this package is
imported: it connects on its first call, and a spawning client made in the main process fixes the
private supervisor's slot before DataLoader workers fork (docs/python-client.md), so the workers
share one supervisor instead of each starting its own. :func:`set_client` replaces it (another
socket, a default deadline, ``spawn=False``).

Unlike the loaders they replace, a clip that cannot be decoded raises
:class:`~clipvisor.ClipSkipped` (a timeout, a crash, a corrupt or missing file) instead of
hanging or killing the worker; :class:`clipvisor.torch.SkippingDataset` turns that into a
dropped sample.
"""

from __future__ import annotations

import threading
from typing import Optional

from ..client import Client

__all__ = ["default_client", "set_client"]

_lock = threading.Lock()
_client: Optional[Client] = None


def default_client() -> Client:
    """The client the compat functions use (made on first use, or by importing this package)."""
    global _client
    client = _client
    if client is None:
        with _lock:
            if _client is None:
                _client = Client()
            client = _client
    return client


def set_client(client: Optional[Client]) -> None:
    """Makes the compat functions use `client` (``None``: a default :class:`Client` on next use).

    Call it in the main process, before a DataLoader starts its workers, so that they inherit it.
    """
    global _client
    with _lock:
        _client = client


# Made at import (no connection, nothing started): importing happens in the main process in the
# documented set-up, which is where a spawning Client must be made (see the module docstring).
default_client()
