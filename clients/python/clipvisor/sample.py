""":meth:`Client.sample`: many clips of one training sample, decoded in parallel.

Two ways, as docs/protocol.md says: one ``sample`` request (the supervisor decodes the clips
across its pool and answers each as it completes, then a final ``done``), or, for clients
passing fds, one ``decode`` per clip, all in flight at once on the connection, with
all-or-nothing applied here.

What comes back and what raises (docs/python-client.md): results in order; with
``all_or_nothing`` the first failure is raised (its ``clip`` is the index); without it a clip
that was skipped is listed as its :class:`~clipvisor.ClipSkipped`, and what is not about one
clip (:class:`~clipvisor.InvalidRequest`, :class:`~clipvisor.ClipCancelled`,
:class:`~clipvisor.Overloaded`...) raises. A sample refused as a whole comes as the final answer
alone, ``done`` without ``clip``: raised (naming the clip of a ``clips[i].field`` detail), or
sent again, whole, when ``overloaded``. Clips answered ``overloaded`` one by one are sent again
as a smaller sample, with the back-off of :func:`~clipvisor.session.retry_pause`.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Union

from .block import Allocator
from .errors import ClipFailure, ClipSkipped, ProtocolError, SupervisorTimeout, skip_from_error
from .options import ClipSpec, clip_deadline_seconds, deadline_seconds, ms
from .results import Audio, Clip, Result, Video, result_of_answer
from .session import Multiplexer, close_fd, error_of, open_for_passing, retry_pause

__all__ = ["run_sample", "run_sample_with_fds"]

Outcome = Union[Result, ClipSkipped]


def _is_clip_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _clip_from_detail(detail: Any) -> Optional[int]:
    """The clip index of an invalid_request detail such as ``clips[1].height``."""
    if isinstance(detail, str) and detail.startswith("clips["):
        try:
            return int(detail[6:detail.index("]")])
        except ValueError:
            return None
    return None


def run_sample(mux: Multiplexer, specs: Sequence[ClipSpec], *, all_or_nothing: bool, deadline: Optional[float],
               tag: Optional[str], allocator: Optional[Allocator] = None, threads: int = 1) -> List[Outcome]:
    """One ``sample`` request for `specs` (sent again for the clips answered ``overloaded``)."""
    results: List[Optional[Union[Result, ClipFailure]]] = [None] * len(specs)
    todo = list(range(len(specs)))
    start = time.monotonic()
    attempt = 0
    while True:
        s = mux.session()
        dl = deadline_seconds(deadline, s.hello)
        message: Dict[str, Any] = {
            "op": "sample", "all_or_nothing": all_or_nothing, "deadline_ms": ms(dl),
            "clips": [dict(specs[i].fields, path=specs[i].path) for i in todo],
        }
        if tag is not None:
            message["tag"] = tag
        # A clip's own deadline may exceed the sample's: wait for the longest one.
        wait = max([dl] + [clip_deadline_seconds(specs[i].fields, s.hello) for i in todo])
        s, rid = mux.send(s, message)
        overloaded: List[int] = []
        last_error: Dict[str, Any] = {}
        final: Optional[Dict[str, Any]] = None
        unanswered = len(todo)
        try:
            while final is None:
                # Each answer restarts the clock: clips finish one by one, each within its
                # own deadline once a worker takes it.
                _, reply, fd = mux.next(s, [rid], time.monotonic() + wait + s.margin)
                if reply.get("done") is True or ("clip" not in reply and reply.get("ok") is False):
                    # The end of the sample; or its refusal as a whole (overloaded,
                    # invalid_request, shutting down): `done` without `clip` (docs/protocol.md),
                    # or, from supervisors before 0.1.0, neither `done` nor `clip`.
                    close_fd(fd)
                    final = reply
                    break
                local = reply.get("clip")
                if not isinstance(local, int) or isinstance(local, bool) or not 0 <= local < len(todo):
                    close_fd(fd)
                    raise ProtocolError(f"sample answer for an unknown clip {local!r}")
                index = todo[local]
                kind, name, _ = specs[index]
                unanswered -= 1
                if reply.get("ok") is True:
                    results[index] = result_of_answer(kind, reply, fd, name, allocator, threads)
                    if unanswered > 0:
                        mux.release_now(s)  # its slab, for the clips still to start
                    continue
                close_fd(fd)
                error = error_of(reply)
                if error.get("reason") == "overloaded":
                    overloaded.append(index)
                    last_error = error
                    continue
                results[index] = skip_from_error(error, path=name, clip=index, elapsed_ms=reply.get("elapsed_ms"))
        except SupervisorTimeout:
            mux.abandon(s, [rid], kill=True)
            raise
        except BaseException:
            mux.abandon(s, [rid])
            raise
        mux.finish(s, rid)
        if final.get("ok") is not True and not _is_clip_index(final.get("clip")):
            # Refused as a whole: no clip was started.
            error = error_of(final)
            if error.get("reason") != "overloaded":
                local = _clip_from_detail(error.get("detail"))
                culprit = todo[local] if local is not None and 0 <= local < len(todo) else None
                raise skip_from_error(error, path=specs[culprit].path if culprit is not None else None,
                                      clip=culprit)
            overloaded = list(todo)
            last_error = error
        elif all_or_nothing and final.get("ok") is not True:
            error = error_of(final)
            failing = final.get("clip")
            culprit = todo[failing] if isinstance(failing, int) and 0 <= failing < len(todo) else None
            if error.get("reason") == "overloaded" or (culprit is not None and culprit in overloaded):
                overloaded = list(todo)  # the whole sample again
                last_error = error or last_error
            else:
                answered = results[culprit] if culprit is not None else None
                if isinstance(answered, ClipFailure):
                    raise answered
                culprit_path = specs[culprit].path if culprit is not None else None
                raise skip_from_error(error, path=culprit_path, clip=culprit)
        if not overloaded:
            if all_or_nothing:
                missing = [i for i, r in enumerate(results) if not isinstance(r, (Video, Audio, Clip))]
                if missing:
                    raise ProtocolError(f"the sample succeeded but clips {missing} have no result")
            missing = [i for i, r in enumerate(results) if r is None]
            if missing:
                raise ProtocolError(f"the sample ended without answers for clips {missing}")
            for r in results:
                if isinstance(r, ClipFailure) and not isinstance(r, ClipSkipped):
                    raise r  # not about the clip (cancelled at shutdown): not a skip to list
            return list(results)  # type: ignore[arg-type]  # no None and no non-skip left
        time.sleep(retry_pause(last_error, attempt, start, dl, None))
        attempt += 1
        todo = sorted(overloaded)
        if all_or_nothing:
            results = [None] * len(specs)


def run_sample_with_fds(mux: Multiplexer, specs: Sequence[ClipSpec], *, all_or_nothing: bool,
                        deadline: Optional[float], tag: Optional[str],
                        decode_one: Callable[[ClipSpec], Result]) -> List[Outcome]:
    """Clients passing fds send one decode per clip (docs/protocol.md), all at once on the
    connection; all-or-nothing is then done here: the first failure cancels the others. Clips
    answered ``overloaded`` are decoded again one at a time by `decode_one` (with its back-off)."""
    s = mux.session()
    dl = deadline_seconds(deadline, s.hello)
    results: List[Optional[Outcome]] = [None] * len(specs)
    ids: Dict[int, int] = {}
    outstanding: Set[int] = set()
    retry: List[int] = []
    # A clip's own deadline may exceed the sample's: wait for the longest one.
    wait = max([dl] + [clip_deadline_seconds(spec.fields, s.hello) for spec in specs])
    try:
        for index, (_, name, fields) in enumerate(specs):
            message = {"op": "decode", "path": name, "fd": True, **fields}
            message.setdefault("deadline_ms", ms(dl))
            if tag is not None:
                message.setdefault("tag", tag)
            try:
                fd = open_for_passing(name)
            except ClipSkipped as skip:
                skip.clip = index
                if all_or_nothing:
                    raise
                results[index] = skip
                continue
            try:
                # Resent on a new connection only while nothing else is in flight on this one.
                s, rid = mux.send(s, message, fd, resend=not outstanding)
            finally:
                close_fd(fd)
            ids[rid] = index
            outstanding.add(rid)
        while outstanding:
            rid, reply, block_fd = mux.next(s, outstanding, time.monotonic() + wait + s.margin)
            outstanding.discard(rid)
            mux.finish(s, rid)
            index = ids[rid]
            kind, name, _ = specs[index]
            if reply.get("ok") is True:
                results[index] = result_of_answer(kind, reply, block_fd, name)
                if outstanding:
                    mux.release_now(s)
                continue
            close_fd(block_fd)
            error = error_of(reply)
            if error.get("reason") == "overloaded":
                retry.append(index)
                continue
            failed = skip_from_error(error, path=name, clip=index, elapsed_ms=reply.get("elapsed_ms"))
            if all_or_nothing or not isinstance(failed, ClipSkipped):
                raise failed
            results[index] = failed
    except SupervisorTimeout:
        mux.abandon(s, outstanding, kill=True)
        raise
    except BaseException:
        mux.abandon(s, outstanding)
        raise
    for index in retry:  # overloaded: one at a time, with the single decode's back-off
        try:
            results[index] = decode_one(specs[index])
        except ClipSkipped as skip:
            skip.clip = index
            if all_or_nothing:
                raise
            results[index] = skip
    return [r for r in results if r is not None]
