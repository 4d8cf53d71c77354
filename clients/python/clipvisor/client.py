"""The clipvisor client: ask the supervisor for clips, get numpy arrays back.

:class:`Client` is the public surface: decoding (:meth:`Client.video`, :meth:`Client.audio`,
:meth:`Client.clip`, :meth:`Client.sample`) and the other operations. The work is done by
:mod:`clipvisor.session` (the connection and the requests multiplexed on it, fork safety,
``overloaded`` back-off), :mod:`clipvisor.options` (Python options → protocol fields) and
:mod:`clipvisor.sample` (many clips at once).
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from . import spawn as _spawn
from ._version import __version__
from .block import Allocator
from .errors import ClipSkipped, ProtocolError, skip_from_error
from .options import (
    ClipSpec,
    PathLike,
    absolute_path,
    deadline_seconds,
    default_tag,
    ms,
    protocol_fields,
    sample_specs,
    video_options,
)
from .results import Audio, Clip, Result, Video, result_of_answer
from .sample import run_sample, run_sample_with_fds
from .session import Multiplexer, close_fd, error_of, open_for_passing, retry_pause
from .slabs import DEFAULT_SLABS, BlockRef

__all__ = ["Client", "default_tag", "__version__"]


class Client:
    """A connection to a clipvisor supervisor.

    Args:
        socket: the supervisor's socket; by default found as docs/protocol.md says
            (``$CLIPVISOR_SOCKET``, the system service, the per-user service).
        deadline: default per-clip deadline in seconds (default: the supervisor's).
        spawn: when no supervisor answers, start a private one (``clipvisor serve`` from
            ``$CLIPVISOR_BIN`` or PATH) shared by this process and its forked children,
            stopped when the program exits.
        margin: seconds added to a request's deadline before the client gives up on an
            answer. It covers time queued for a worker, which the supervisor bounds itself
            (answering ``overloaded``), so by default it is that bound (``queue_wait_ms`` of
            the hello; ``queue.wait_limit_ms`` of ``status`` from supervisors that do not send
            it there) plus 10 s, or 70 s if the supervisor does not say. Only a wedged
            supervisor ever makes it count.
        connect_timeout: bound on connecting, the hello exchange and starting a private
            supervisor.
        tag: default ``tag`` of requests, recorded in the skip log (default: the SLURM or
            torchelastic job id, when set).
        allocator: where tensors are decompressed to by default (e.g. ``ReusedBuffers``).
        decompress_threads: threads that copy a large tensor (4 MiB or more) out of its block
            at once (default 1). More help a single caller, whose thread waits for each
            clip, and GPU delivery, where this copy sets the pace (docs/python-client.md,
            "GPU delivery"); in DataLoader workers, which already fill the cores, keep 1.
        slabs: block slabs to ask the supervisor for (0 to 16, docs/protocol.md "Block
            slabs"): blocks are then written into shared memory this process maps once,
            instead of a fresh memfd mapped and freed per clip (on a VM that costs more
            than copying the frames). 0: a fresh sealed memfd per block.
    """

    def __init__(
        self,
        socket: Optional[PathLike] = None,
        deadline: Optional[float] = None,
        spawn: bool = True,
        *,
        margin: Optional[float] = None,
        connect_timeout: float = 10.0,
        tag: Optional[str] = None,
        allocator: Optional[Allocator] = None,
        slabs: int = DEFAULT_SLABS,
        decompress_threads: int = 1,
    ):
        if not isinstance(slabs, int) or isinstance(slabs, bool) or not 0 <= slabs <= 16:
            raise ValueError(f"slabs must be an integer from 0 to 16, got {slabs!r}")
        if not isinstance(decompress_threads, int) or isinstance(decompress_threads, bool) \
                or not 1 <= decompress_threads <= 64:
            raise ValueError(f"decompress_threads must be an integer from 1 to 64, got {decompress_threads!r}")
        self.socket_path = os.fspath(socket) if socket is not None else None
        self.deadline = deadline
        self.spawn = spawn
        self.margin = margin
        self.connect_timeout = connect_timeout
        self.tag = tag if tag is not None else default_tag()
        self.allocator = allocator
        self.slabs = slabs
        self.decompress_threads = decompress_threads
        self._mux = Multiplexer(self.socket_path, spawn, margin, connect_timeout, slabs)
        if spawn and socket is None:
            _spawn.private_supervisor()  # fix the private slot now, before any fork

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Closes the connection (requests in flight fail). The client reconnects if used again."""
        self._mux.close("the client was closed")

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self._mux.close_quietly()
        except Exception:
            pass

    def __getstate__(self) -> Dict[str, Any]:
        # Pickled into spawn/forkserver DataLoader workers: resolve the socket first, so that
        # children use this supervisor (a private one included) instead of starting their own.
        path = self.socket_path
        if path is None:
            path = self._mux.session().conn.path
        return {"socket": path, "deadline": self.deadline, "spawn": False, "margin": self.margin,
                "connect_timeout": self.connect_timeout, "tag": self.tag, "allocator": self.allocator,
                "slabs": self.slabs, "decompress_threads": self.decompress_threads}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    @property
    def server(self) -> Dict[str, Any]:
        """The supervisor's hello (connects if needed): version, pid, deadline bounds."""
        return dict(self._mux.session().hello)

    # -- decode --------------------------------------------------------------------------------

    def _deadline(self, deadline: Optional[float]) -> Optional[float]:
        return deadline if deadline is not None else self.deadline

    def _decode(self, kind: str, path: PathLike, options: Dict[str, Any], deadline: Optional[float],
                tag: Optional[str], pass_fd: bool, allocator: Optional[Allocator]) -> Result:
        fields = protocol_fields(options)
        tag = tag if tag is not None else self.tag
        if tag is not None:
            fields["tag"] = tag
        reply, block_fd, name = self._clip_request("decode", path, fields, deadline, pass_fd)
        return result_of_answer(kind, reply, block_fd, name, allocator if allocator is not None else self.allocator,
                                self.decompress_threads)

    def _clip_request(self, op: str, path: PathLike, fields: Dict[str, Any], deadline: Optional[float],
                      pass_fd: bool) -> Tuple[Dict[str, Any], Optional[BlockRef], str]:
        """One clip request (``decode`` or ``probe``): retried with back-off while the supervisor
        answers ``overloaded`` and the deadline allows. Returns the ok answer with the fd that came
        with it and the clip's name; raises the clip's :class:`ClipSkipped` (or, when not about
        the clip, :class:`InvalidRequest`, :class:`ClipCancelled`, :class:`Overloaded`) otherwise."""
        name = absolute_path(path)
        start = time.monotonic()
        attempt = 0
        while True:
            s = self._mux.session()
            dl = deadline_seconds(self._deadline(deadline), s.hello)
            message: Dict[str, Any] = {"op": op, "path": name, **fields, "deadline_ms": ms(dl)}
            fd = None
            if pass_fd:
                fd = open_for_passing(name)
                message["fd"] = True
            reply, got = self._mux.exchange(s, message, fd, time.monotonic() + dl + s.margin)
            if reply.get("ok") is True:
                return reply, got, name
            close_fd(got)
            error = error_of(reply)
            if error.get("reason") == "overloaded":
                time.sleep(retry_pause(error, attempt, start, dl, name))
                attempt += 1
                continue
            raise skip_from_error(error, path=name, elapsed_ms=reply.get("elapsed_ms"))

    def video(
        self,
        path: PathLike,
        *,
        fps: float = 2.0,
        frames: Optional[int] = None,
        timestamps: Optional[Sequence[float]] = None,
        start: Optional[float] = None,
        end: Optional[float] = None,
        min_frames: int = 4,
        max_frames: int = 768,
        frame_factor: int = 2,
        width: Optional[int] = None,
        height: Optional[int] = None,
        max_pixels: Optional[int] = None,
        min_pixels: Optional[int] = None,
        total_pixels: Optional[int] = None,
        factor: int = 28,
        layout: str = "TCHW",
        rotate: bool = True,
        deadline: Optional[float] = None,
        tag: Optional[str] = None,
        pass_fd: bool = False,
        options: Optional[Mapping[str, Any]] = None,
        allocator: Optional[Allocator] = None,
    ) -> Video:
        """Decodes video frames to uint8 RGB.

        Frame selection: ``fps`` (the Qwen2.5-VL rule, bounded by ``min_frames``/``max_frames``
        and rounded to ``frame_factor``), or ``frames`` (a count), or ``timestamps`` (seconds).
        Size: ``width``+``height``, or a Qwen pixel budget (``max_pixels``, ``min_pixels``,
        ``total_pixels``, ``factor``). ``start``/``end`` bound the range in seconds. ``deadline``
        in seconds; ``pass_fd`` opens the file here and passes the fd (containers).
        ``options`` holds raw protocol keys (e.g. ``{"level": 3}``). ``allocator`` (default:
        the client's) says where the frames are decompressed (:class:`ReusedBuffers`, pinned
        memory; docs/python-client.md, "Decoding into your own buffers").

        Raises :class:`ClipSkipped` (a subclass per reason) or :class:`ClipvisorError`.
        """
        opts = video_options(
            fps, frames, timestamps, start=start, end=end, min_frames=min_frames, max_frames=max_frames,
            frame_factor=frame_factor, width=width, height=height, max_pixels=max_pixels, min_pixels=min_pixels,
            total_pixels=total_pixels, factor=factor, layout=layout, rotate=rotate, options=options)
        return self._decode("video", path, opts, deadline, tag, pass_fd, allocator)  # type: ignore[return-value]

    def audio(
        self,
        path: PathLike,
        *,
        sample_rate: int = 16000,
        channels: int = 1,
        start: Optional[float] = None,
        end: Optional[float] = None,
        deadline: Optional[float] = None,
        tag: Optional[str] = None,
        pass_fd: bool = False,
        options: Optional[Mapping[str, Any]] = None,
        allocator: Optional[Allocator] = None,
    ) -> Audio:
        """Decodes the best audio stream to float32 ``(channels, n)`` at ``sample_rate``."""
        opts = dict(video=False, audio=True, sample_rate=sample_rate, channels=channels, start=start, end=end,
                    options=options)
        return self._decode("audio", path, opts, deadline, tag, pass_fd, allocator)  # type: ignore[return-value]

    def clip(
        self,
        path: PathLike,
        *,
        video: Union[bool, Mapping[str, Any]] = True,
        audio: Union[bool, Mapping[str, Any]] = True,
        audio_optional: bool = False,
        start: Optional[float] = None,
        end: Optional[float] = None,
        deadline: Optional[float] = None,
        tag: Optional[str] = None,
        pass_fd: bool = False,
        options: Optional[Mapping[str, Any]] = None,
        allocator: Optional[Allocator] = None,
    ) -> Clip:
        """Decodes video and audio of one clip together, on the same time origin (audio-in-video).

        ``video``/``audio``: True, False, or a dict of that side's options (as for
        :meth:`video` / :meth:`audio`, e.g. ``video={"fps": 1, "max_pixels": 200704}``).
        ``audio_optional``: a clip without audio decodes anyway, with ``audio=None``.
        """
        if not video and not audio:
            raise ValueError("clip() needs video, audio or both")
        opts: Dict[str, Any] = {"start": start, "end": end, "options": options}
        if video:
            vopts = dict(video) if isinstance(video, Mapping) else {}
            opts.update(video_options(vopts.pop("fps", 2.0), vopts.pop("frames", None), vopts.pop("timestamps", None),
                                       **vopts))
        else:
            opts["video"] = False
        if audio:
            opts["audio"] = True
            if isinstance(audio, Mapping):
                opts.update(audio)
            if audio_optional:
                opts["audio_optional"] = True
        return self._decode("clip", path, opts, deadline, tag, pass_fd, allocator)  # type: ignore[return-value]

    # -- sample --------------------------------------------------------------------------------

    def sample(
        self,
        clips: Sequence[Union[PathLike, Mapping[str, Any]]],
        *,
        all_or_nothing: bool = True,
        deadline: Optional[float] = None,
        tag: Optional[str] = None,
        pass_fd: bool = False,
        allocator: Optional[Allocator] = None,
        **defaults: Any,
    ) -> List[Union[Result, ClipSkipped]]:
        """Decodes a list of clips (one training sample: a conversation with many videos) in
        parallel across the pool, each under its own deadline; results in order.

        Each item is a path or a dict: ``{"path": ..., <options of video()>}``; add
        ``"audio": True`` for video+audio (a :class:`Clip`), ``"video": False, "audio": True``
        for audio only; as for :meth:`clip`, ``video``/``audio`` may be dicts of that side's
        options (``"audio": {"sample_rate": 16000}``). A clip's ``deadline`` may exceed the
        sample's: the client waits for the longest. ``defaults`` (keyword options) apply to
        every clip.

        With ``all_or_nothing`` (default) the first failure cancels the other clips and is
        raised (its ``clip`` attribute is the index). Without it, skipped clips appear in the
        list as :class:`ClipSkipped` instances (not raised); what is not about one clip
        (:class:`InvalidRequest`, :class:`ClipCancelled`, :class:`Overloaded`, any
        :class:`ClipvisorError`) raises. A sample the supervisor refuses as a whole raises in
        both modes, except ``overloaded``, which is retried (module :mod:`clipvisor.sample`).
        ``allocator`` (default: the client's) receives every clip's tensors; it must hand out
        memory that stays valid for the whole sample, so allocators that hand the same memory out
        again (:class:`ReusedBuffers`, a :class:`~clipvisor.gpu.CudaUploader`'s) are refused.
        """
        allocator = allocator if allocator is not None else self.allocator
        if getattr(allocator, "reuses_memory", False):
            owner = type(getattr(allocator, "__self__", allocator)).__name__
            raise ValueError(f"{owner} hands the same memory out again, so a sample's clips would overwrite each "
                             "other: pass allocator=None to sample(), or an allocator that hands out fresh memory")
        if len(clips) == 0:
            return []
        specs = sample_specs(clips, defaults)
        tag = tag if tag is not None else self.tag
        if pass_fd:
            def decode_one(spec: ClipSpec) -> Result:
                return self._decode(spec.kind, spec.path, {"options": spec.fields}, deadline, tag, True, allocator)

            return run_sample_with_fds(self._mux, specs, all_or_nothing=all_or_nothing,
                                       deadline=self._deadline(deadline), tag=tag, decode_one=decode_one)
        return run_sample(self._mux, specs, all_or_nothing=all_or_nothing, deadline=self._deadline(deadline), tag=tag,
                          allocator=allocator, threads=self.decompress_threads)

    # -- other operations ----------------------------------------------------------------------

    def probe(self, path: PathLike, *, deadline: Optional[float] = None, tag: Optional[str] = None,
              pass_fd: bool = False) -> Dict[str, Any]:
        """What the file holds (container, duration, streams...), probed by a worker under the
        deadline. Raises :class:`ClipSkipped` like a decode; ``tag`` (default: the client's) is
        recorded in the skip log when the clip is skipped."""
        tag = tag if tag is not None else self.tag
        reply, fd, _ = self._clip_request("probe", path, {} if tag is None else {"tag": tag}, deadline, pass_fd)
        close_fd(fd)
        probe = reply.get("probe")
        return dict(probe) if isinstance(probe, dict) else {}

    def status(self) -> Dict[str, Any]:
        """The supervisor's status: pid, uptime, version, workers, queue, counters."""
        reply = self._mux.simple({"op": "status"})
        if reply.get("ok") is not True:
            raise ProtocolError(f"status failed: {reply.get('error')}")
        status = reply.get("status")
        return dict(status) if isinstance(status, dict) else {}

    def skips(
        self,
        *,
        reason: Optional[str] = None,
        since: Optional[float] = None,
        path_glob: Optional[str] = None,
        tag: Optional[str] = None,
        limit: Optional[int] = None,
    ) -> Dict[str, Any]:
        """Recent skips from the supervisor's skip log: ``{"skips": [records], "counts": {reason: n}}``.
        ``since`` is in seconds before now."""
        op: Dict[str, Any] = {"op": "skips"}
        if reason is not None:
            op["reason"] = reason
        if since is not None:
            op["since_s"] = since
        if path_glob is not None:
            op["path_glob"] = path_glob
        if tag is not None:
            op["tag"] = tag
        if limit is not None:
            op["limit"] = limit
        reply = self._mux.simple(op)
        if reply.get("ok") is not True:
            error = error_of(reply)
            if error.get("reason") == "invalid_request":
                raise skip_from_error(error)
            raise ProtocolError(f"skips failed: {error or reply}")
        return {"skips": list(reply.get("skips") or []), "counts": dict(reply.get("counts") or {})}
