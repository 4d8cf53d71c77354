"""A Ray Data datasource that decodes one row per clip through the node-local supervisor."""

from __future__ import annotations

import os
import random
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask
from ray.data.extensions import ArrowTensorArray

from clipvisor import Client, Clip, ClipSkipped, SupervisorUnavailable, Video

from . import _node

#: The extensions ``ray.data.read_videos`` reads by default (the same list).
VIDEO_EXTENSIONS: List[str] = [
    "mp4", "mkv", "mov", "avi", "wmv", "flv", "webm", "m4v", "3gp", "mpeg", "mpg", "ts", "ogv", "rm", "rmvb",
    "vob", "asf", "f4v", "m2ts", "mts", "divx", "xvid", "mxf",
]

#: Options of :meth:`clipvisor.Client.video` that a read passes through unchanged.
VIDEO_OPTION_NAMES = (
    "fps", "frames", "timestamps", "start", "end", "min_frames", "max_frames", "frame_factor", "width", "height",
    "max_pixels", "min_pixels", "total_pixels", "factor", "layout", "rotate", "options",
)


class ClipvisorVideoDatasource(Datasource):
    """Ray Data datasource: one row per clip, decoded by the node's clipvisor supervisor.

    Built on the public ``Datasource.get_read_tasks`` / ``ReadTask`` API. The driver lists the
    files (``os.stat`` only: it never opens them); each read task sends its clips to the
    supervisor of the node it runs on and never opens or decodes a file itself, so a FIFO, a
    stalled mount or a clip that hangs the decoder costs that clip's deadline and nothing more.
    """

    def __init__(
        self,
        paths: Sequence[str],
        *,
        video: Mapping[str, Any],
        audio: Union[bool, Mapping[str, Any]] = False,
        deadline: Optional[float] = None,
        tag: Optional[str] = None,
        on_skip: str = "drop",
        include_paths: bool = True,
        partitioning: Any = None,
        supervisor: Optional[str] = None,
        binary: Optional[str] = None,
        serve_args: Sequence[str] = (),
        prefetch: int = 2,
    ) -> None:
        super().__init__()
        if on_skip not in ("drop", "row"):
            raise ValueError(f"on_skip must be 'drop' or 'row', not {on_skip!r}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, not {prefetch}")
        self._paths = list(paths)
        self._plan = _ReadPlan(
            video=dict(video), audio=audio, deadline=deadline, tag=tag, on_skip=on_skip, include_paths=include_paths,
            partitioning=partitioning, supervisor=supervisor, binary=binary, serve_args=list(serve_args),
            prefetch=prefetch)

    def get_name(self) -> str:
        return "ClipvisorVideo"

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return None  # decoded size depends on the request, not on the file size

    def get_read_tasks(self, parallelism: int, per_task_row_limit: Optional[int] = None,
                       data_context: Any = None) -> List[ReadTask]:
        paths = self._paths
        count = max(1, min(parallelism, len(paths)))
        tasks: List[ReadTask] = []
        for chunk in np.array_split(np.arange(len(paths)), count):
            if len(chunk) == 0:
                continue
            group = [paths[i] for i in chunk]
            meta = BlockMetadata(num_rows=len(group) if self._plan.on_skip == "row" else None, size_bytes=None,
                                 exec_stats=None, input_files=tuple(group))
            tasks.append(ReadTask(_read_fn(self._plan, group), meta, per_task_row_limit=per_task_row_limit))
        return tasks


class _ReadPlan:
    """What every read task needs (pickled into each task; no paths)."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)
        self.video: Dict[str, Any]
        self.audio: Union[bool, Mapping[str, Any]]
        self.deadline: Optional[float]
        self.tag: Optional[str]
        self.on_skip: str
        self.include_paths: bool
        self.partitioning: Any
        self.supervisor: Optional[str]
        self.binary: Optional[str]
        self.serve_args: List[str]
        self.prefetch: int


def _read_fn(plan: _ReadPlan, paths: List[str]) -> Callable[[], Iterable[pa.Table]]:
    def read() -> Iterator[pa.Table]:
        yield from _read_clips(plan, paths)
    return read


# -- in the read task --------------------------------------------------------------------------

_clients: Dict[str, Client] = {}
_clients_lock = threading.Lock()


def node_socket(supervisor: Optional[str] = None, binary: Optional[str] = None, serve_args: Sequence[str] = ()) -> str:
    """The socket of the supervisor serving the Ray node this runs on (call it inside a Ray task).

    ``supervisor``: None (the first of ``$CLIPVISOR_SOCKET``, the system service and the
    per-user socket that answers, else the node's private supervisor), ``"private"``, or a
    socket path. The node's private supervisor is started if nothing answers in its slot
    (clipvisor/ray/_node.py): one per node, however many tasks and processes ask at once.
    """
    if supervisor not in (None, "private"):
        return str(supervisor)
    if supervisor is None:
        for path in _node.shared_candidates():
            if _node.answers(path):
                return path
    node_id = ray.get_runtime_context().get_node_id()
    slot = _node.NodeSupervisor(node_id, cpus=_node.node_cpus(node_id), binary=binary, serve_args=serve_args)
    return slot.ensure()


def _client(plan: _ReadPlan, broken: Optional[Client] = None) -> Client:
    """This worker process's client of the node's supervisor (one per process, shared by its tasks
    and their threads). With `broken`, that client is replaced, unless another thread already did."""
    key = repr((plan.supervisor, plan.binary, plan.serve_args))
    with _clients_lock:
        client = _clients.get(key)
        if client is not None and (broken is None or client is not broken):
            return client
        if client is not None:
            client.close()
        socket_path = node_socket(plan.supervisor, plan.binary, plan.serve_args)
        client = Client(socket=socket_path, spawn=False, tag=plan.tag)
        _clients[key] = client
        return client


def _decode(plan: _ReadPlan, path: str) -> Tuple[Any, Optional[ClipSkipped]]:
    """(result, None) or (None, skip). A supervisor that went away is looked for (or started) again once."""
    broken: Optional[Client] = None
    for attempt in (0, 1):
        client = _client(plan, broken)
        try:
            result: Union[Clip, Video]
            if plan.audio:
                result = client.clip(path, video=plan.video, audio=plan.audio, audio_optional=True,
                                     deadline=plan.deadline)
            else:
                result = client.video(path, deadline=plan.deadline, **plan.video)
            return result, None
        except ClipSkipped as skip:
            return None, skip
        except SupervisorUnavailable:
            if attempt == 1:
                raise
            broken = client
    raise AssertionError("unreachable")


def _read_clips(plan: _ReadPlan, paths: List[str]) -> Iterator[pa.Table]:
    parser = None
    if plan.partitioning is not None:
        from ray.data.datasource import PathPartitionParser

        parser = PathPartitionParser(plan.partitioning)
    # A small window of clips in flight per task, so the worker decodes the next clip while
    # this task copies the last one out of its block and builds its row.
    with ThreadPoolExecutor(max_workers=plan.prefetch, thread_name_prefix="clipvisor-read") as pool:
        pending: List[Tuple[str, Future]] = []
        index = 0
        while index < len(paths) or pending:
            while index < len(paths) and len(pending) < plan.prefetch:
                pending.append((paths[index], pool.submit(_decode, plan, paths[index])))
                index += 1
            path, future = pending.pop(0)
            result, skip = future.result()
            if skip is not None and plan.on_skip == "drop":
                continue
            yield _row_table(plan, path, result, skip, parser(path) if parser else {})


def _row_table(plan: _ReadPlan, path: str, result: Any, skip: Optional[ClipSkipped],
               partitions: Mapping[str, Any]) -> pa.Table:
    """One row: a decoded clip, or (``on_skip="row"``) a skipped one with no frames."""
    video = result.video if plan.audio and result is not None else result
    layout = plan.video.get("layout", "TCHW")
    columns: Dict[str, Any] = {}
    if plan.include_paths:
        columns["path"] = pa.array([path], pa.string())
    if video is not None:
        frames = video.frames
        pts, indices, fps = video.pts, video.indices, float(video.sample_fps)
    else:
        frames = np.zeros((0, 3, 0, 0) if layout == "TCHW" else (0, 0, 0, 3), np.uint8)
        pts, indices, fps = np.zeros(0), np.zeros(0, np.int64), None
    columns["frames"] = ArrowTensorArray.from_numpy([frames])
    columns["pts"] = pa.array([np.asarray(pts, np.float64)], pa.list_(pa.float64()))
    columns["indices"] = pa.array([np.asarray(indices, np.int64)], pa.list_(pa.int64()))
    columns["sample_fps"] = pa.array([fps], pa.float64())
    if plan.audio:
        audio = result.audio if result is not None else None
        channels = int(plan.audio.get("channels", 1)) if isinstance(plan.audio, Mapping) else 1
        samples = audio.samples if audio is not None else np.zeros((channels, 0), np.float32)
        columns["audio"] = ArrowTensorArray.from_numpy([samples])
        columns["sample_rate"] = pa.array([audio.sample_rate if audio is not None else None], pa.int64())
    columns["partial"] = pa.array([bool(result.partial) if result is not None else False], pa.bool_())
    if plan.on_skip == "row":
        columns["skip_reason"] = pa.array([skip.reason if skip is not None else None], pa.string())
        columns["skip_detail"] = pa.array([skip.message if skip is not None else None], pa.string())
    for key, value in partitions.items():
        columns[key] = pa.array([value])
    return pa.table(columns)


# -- listing, in the driver --------------------------------------------------------------------

def expand_paths(paths: Union[str, Sequence[str]], *, filesystem: Any = None, file_extensions: Optional[Sequence[str]],
                 ignore_missing_paths: bool = False, partition_filter: Any = None,
                 shuffle: Optional[str] = None) -> List[str]:
    """The files a read covers, as ``ray.data.read_videos`` lists them, without opening any.

    Directories are walked (names starting with ``.`` or ``_`` are skipped, as Ray does);
    anything else that exists is taken as it is, FIFOs included (the supervisor deals with
    them). Only local paths (a node-local disk or a shared mount with the same path on every
    node): the supervisor opens files by path.
    """
    if filesystem is not None:
        import pyarrow.fs as pafs

        if not isinstance(filesystem, pafs.LocalFileSystem):
            raise ValueError(
                f"clipvisor.ray.read_videos reads local paths only (the node's supervisor opens files by path; "
                f"use a shared mount for remote data), not {type(filesystem).__name__}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [os.fspath(paths)]
    if not paths:
        raise ValueError("clipvisor.ray.read_videos: no paths given")
    extensions = {e.lower().lstrip(".") for e in file_extensions} if file_extensions else None
    out: List[str] = []
    for raw in paths:
        text = os.fspath(raw)
        for prefix in ("local://", "file://"):
            if text.startswith(prefix):
                text = text[len(prefix):]
        if "://" in text:
            raise ValueError(f"{text}: clipvisor.ray.read_videos reads local paths only (a shared mount), not URLs")
        path = os.path.abspath(text)
        if os.path.isdir(path):
            found = []
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
                found += [os.path.join(root, f) for f in sorted(files) if not f.startswith((".", "_"))]
            out += [f for f in found if extensions is None or _extension(f) in extensions]
        elif os.path.lexists(path):
            if extensions is None or _extension(path) in extensions:
                out.append(path)
        elif not ignore_missing_paths:
            raise FileNotFoundError(f"{path}: no such file or directory (pass ignore_missing_paths=True to skip it)")
    if partition_filter is not None:
        out = list(partition_filter(out))
    if not out:
        raise ValueError(f"clipvisor.ray.read_videos: no files found under {list(paths)[:5]}"
                         + (f" with extensions {sorted(extensions)}" if extensions else ""))
    if shuffle == "files":
        random.shuffle(out)
    elif shuffle is not None:
        raise ValueError(f"shuffle must be None or 'files', not {shuffle!r}")
    return out


def _extension(path: str) -> str:
    return os.path.splitext(path)[1].lower().lstrip(".")
