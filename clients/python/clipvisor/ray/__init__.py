"""Ray Data integration: ``clipvisor.ray.read_videos``, one row per clip, decoded by the node's supervisor.

Like ``ray.data.read_videos`` (same call shape: paths, extension filtering, ``concurrency``,
``num_cpus``, ``ray_remote_args``, ``override_num_blocks``...), but:

- one row per clip (``path``, ``frames``, ``pts``, ``indices``, ``sample_fps``, ``partial``;
  ``audio``/``sample_rate`` with ``audio=``), frames selected and resized as
  :meth:`clipvisor.Client.video` does;
- a clip that cannot be decoded (corrupt, truncated, a FIFO, a hang, a crash) is dropped
  (``on_skip="drop"``) or kept as a row with ``skip_reason``/``skip_detail`` and no frames
  (``on_skip="row"``), and is in that node's skip log; the read finishes;
- decoding runs in the node-local supervisor (the system service when it runs, else one private
  supervisor per Ray node), never in the Ray task.

See docs/ray.md. Needs ``ray[data]`` (``pip install 'clipvisor[ray]'``).
"""

from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

try:
    import ray  # noqa: F401
    import ray.data
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("clipvisor.ray needs Ray Data: pip install 'ray[data]'") from exc

from ._datasource import VIDEO_EXTENSIONS, ClipvisorVideoDatasource, expand_paths, node_socket
from ._scan import scan

__all__ = ["read_videos", "scan", "ClipvisorVideoDatasource", "VIDEO_EXTENSIONS", "node_socket"]


def read_videos(
    paths: Union[str, Sequence[str]],
    *,
    fps: Optional[float] = 2.0,
    frames: Optional[int] = None,
    timestamps: Optional[Sequence[float]] = None,
    start: Optional[float] = None,
    end: Optional[float] = None,
    min_frames: int = 4,
    max_frames: int = 768,
    frame_factor: int = 2,
    width: Optional[int] = None,
    height: Optional[int] = None,
    resize: Optional[Tuple[int, int]] = None,
    max_pixels: Optional[int] = None,
    min_pixels: Optional[int] = None,
    total_pixels: Optional[int] = None,
    factor: int = 28,
    layout: str = "TCHW",
    rotate: bool = True,
    audio: Union[bool, Mapping[str, Any]] = False,
    deadline: Optional[float] = None,
    tag: Optional[str] = None,
    options: Optional[Mapping[str, Any]] = None,
    on_skip: str = "drop",
    include_paths: bool = True,
    filesystem: Any = None,
    partition_filter: Optional[Callable[[List[str]], List[str]]] = None,
    partitioning: Any = None,
    ignore_missing_paths: bool = False,
    file_extensions: Optional[List[str]] = VIDEO_EXTENSIONS,
    shuffle: Optional[str] = None,
    supervisor: Optional[str] = None,
    binary: Optional[str] = None,
    serve_args: Sequence[str] = (),
    prefetch: int = 2,
    **ray_read_args: Any,
) -> "ray.data.Dataset":
    """Reads video files into a Ray Dataset with one row per clip.

    Frame selection and size are those of :meth:`clipvisor.Client.video`: ``fps`` (the
    Qwen2.5-VL rule with ``min_frames``/``max_frames``/``frame_factor``), ``frames`` (a count)
    or ``timestamps``; ``width``+``height`` (or Ray's ``resize=(height, width)``) or a pixel
    budget (``max_pixels``...). ``audio=True`` (16 kHz mono) or a dict (``{"sample_rate": 8000,
    "channels": 2}``) adds ``audio`` (float32 ``(channels, n)``; empty for a clip without
    audio) and ``sample_rate``. ``deadline`` (seconds) bounds each clip.

    ``on_skip="drop"`` leaves undecodable clips out; ``"row"`` keeps them as rows with
    ``skip_reason`` (``timeout``, ``decode_error``, ``crashed``...), ``skip_detail`` (the message,
    naming the file) and zero frames. Either way they are in the node's skip log.

    ``supervisor``: None (the system service or ``$CLIPVISOR_SOCKET`` when one answers on the
    node, else the node's private supervisor), ``"private"`` (always the node's private one), or
    a socket path. ``serve_args`` are extra ``clipvisor serve`` flags for a private supervisor
    (used by the task that starts it). ``prefetch``: clips in flight per read task.

    Listing (``paths``, directories, ``file_extensions``, ``partition_filter``,
    ``ignore_missing_paths``, ``shuffle="files"``) happens in the driver and never opens a file.
    Every other keyword (``concurrency``, ``num_cpus``, ``ray_remote_args``,
    ``override_num_blocks``, ``memory``...) goes to ``ray.data.read_datasource``.
    """
    if sum(x is not None for x in (frames, timestamps)) > 1:
        raise ValueError("give frames or timestamps, not both")
    if resize is not None:
        if width is not None or height is not None:
            raise ValueError("give resize=(height, width) or width and height, not both")
        if len(resize) != 2:
            raise ValueError(f"resize must be (height, width), not {resize!r}")
        height, width = int(resize[0]), int(resize[1])
    if (width is None) != (height is None):
        raise ValueError("give width and height together")
    if layout not in ("TCHW", "THWC"):
        raise ValueError(f"layout must be 'TCHW' or 'THWC', not {layout!r}")
    if on_skip not in ("drop", "row"):
        raise ValueError(f"on_skip must be 'drop' or 'row', not {on_skip!r}")
    video: dict = dict(min_frames=min_frames, max_frames=max_frames, frame_factor=frame_factor, factor=factor,
                       layout=layout, rotate=rotate)
    if frames is not None:
        video["frames"] = frames
    elif timestamps is not None:
        video["timestamps"] = list(timestamps)
    elif fps is not None:
        video["fps"] = fps
    else:
        raise ValueError("give fps, frames or timestamps")
    for key, value in (("start", start), ("end", end), ("width", width), ("height", height),
                       ("max_pixels", max_pixels), ("min_pixels", min_pixels), ("total_pixels", total_pixels),
                       ("options", options)):
        if value is not None:
            video[key] = value
    if tag is None:
        tag = _default_tag()
    files = expand_paths(paths, filesystem=filesystem, file_extensions=file_extensions,
                         ignore_missing_paths=ignore_missing_paths, partition_filter=partition_filter, shuffle=shuffle)
    datasource = ClipvisorVideoDatasource(
        files, video=video, audio=audio, deadline=deadline, tag=tag, on_skip=on_skip, include_paths=include_paths,
        partitioning=partitioning, supervisor=supervisor, binary=binary, serve_args=serve_args, prefetch=prefetch)
    return ray.data.read_datasource(datasource, **ray_read_args)


def _default_tag() -> Optional[str]:
    """``ray-<job id>`` when Ray is initialised (the skip log then names the Ray job), else the client's default."""
    from clipvisor import default_tag

    try:
        if ray.is_initialized():
            return f"ray-{ray.get_runtime_context().get_job_id()}"
    except Exception:  # noqa: BLE001 - a tag is a convenience
        pass
    return default_tag()
