"""clipvisor: decode video and audio for training loops without hangs, crashes or leaks.

Decoding runs in supervised worker processes under a hard per-clip deadline; this package asks
the supervisor for clips and returns numpy arrays (torch tensors on request)::

    import clipvisor

    client = clipvisor.Client()
    try:
        video = client.video("/data/a.mp4", fps=2.0, max_pixels=448 * 448)
    except clipvisor.ClipSkipped as skip:      # timeout, crash, corrupt file... (never the caller's mistake)
        print("skipping", skip.path, skip.reason)
    else:
        frames = video.frames                  # uint8 (T, 3, H, W)

See docs/python-client.md.
"""

from .block import Allocator, Block, read_block, read_block_fd, read_block_file, validate_block
from .buffers import RecycledArrays, ReusedBuffers
from .client import Client, __version__, default_tag
from .errors import (
    BlockFormatError,
    ClipCancelled,
    ClipCorrupt,
    ClipCrashed,
    ClipIncompatible,
    ClipNotFound,
    ClipOutOfMemory,
    ClipPermission,
    ClipQuarantined,
    ClipSkipped,
    ClipTimeout,
    ClipTooLarge,
    ClipUnsupported,
    ClipvisorError,
    InvalidRequest,
    Overloaded,
    ProtocolError,
    SupervisorTimeout,
    SupervisorUnavailable,
)
from .gpu import CudaUploader
from .results import Audio, Clip, Video
from .spawn import ClipvisorWarning

__all__ = [
    "Client",
    "Allocator",
    "ReusedBuffers",
    "RecycledArrays",
    "CudaUploader",
    "Video",
    "Audio",
    "Clip",
    "ClipvisorError",
    "SupervisorUnavailable",
    "SupervisorTimeout",
    "ProtocolError",
    "Overloaded",
    "BlockFormatError",
    "ClipSkipped",
    "ClipTimeout",
    "ClipCrashed",
    "ClipOutOfMemory",
    "ClipCorrupt",
    "ClipUnsupported",
    "ClipTooLarge",
    "ClipNotFound",
    "ClipPermission",
    "ClipQuarantined",
    "ClipIncompatible",
    "ClipCancelled",
    "InvalidRequest",
    "ClipvisorWarning",
    "Block",
    "read_block",
    "read_block_fd",
    "read_block_file",
    "validate_block",
    "default_tag",
    "__version__",
]
