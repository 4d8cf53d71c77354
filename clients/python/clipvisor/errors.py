"""Exceptions of the clipvisor client.

Two separate families, so that a training loop can skip bad clips without hiding a broken
installation or its own mistakes. The rule: **skips are about the clip, not the caller.**

- :class:`ClipSkipped` and its subclasses: *this clip* was not decoded (a timeout, a crash, a
  corrupt or missing file, or a request this clip cannot satisfy, such as 4 frames of a
  one-frame video: :class:`ClipIncompatible`). A normal outcome for a dataset of real-world
  media; the exception carries the reason, the path and the supervisor's message. Catch it to
  skip.
- :class:`ClipvisorError`: the *infrastructure* failed, or the *caller* did (no supervisor, a
  protocol mismatch, a dead or wedged supervisor, a persistent overload, a malformed block; a
  request that is wrong whatever the clip: :class:`InvalidRequest`; a clip cancelled by the
  client or by a supervisor shutting down: :class:`ClipCancelled`). Retrying the same clip, or
  skipping it, does not help; let it propagate, fix the call, or retry the whole step.

The wire reason ``invalid_request`` covers both a wrong request and a request this clip cannot
satisfy: the supervisor names the clip (``path`` in the error) only when a worker found the clip
unable to give what was asked, so that is the line between :class:`ClipIncompatible` (a skip)
and :class:`InvalidRequest` (the caller's error).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Type

__all__ = [
    "ClipvisorError",
    "SupervisorUnavailable",
    "ProtocolError",
    "Overloaded",
    "SupervisorTimeout",
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
    "ClipFailure",
    "skip_from_error",
]


class ClipvisorError(Exception):
    """The supervisor could not be used, or was used wrongly: a failure of the infrastructure or
    of the caller, not a property of a clip. Skipping the clip does not help."""


class SupervisorUnavailable(ClipvisorError):
    """No supervisor answers (none found, none could be started, or it died mid-request)."""


class ProtocolError(ClipvisorError):
    """The supervisor spoke a different protocol version or sent something malformed."""


class Overloaded(ClipvisorError):
    """The supervisor kept answering ``overloaded`` until the request's deadline ran out."""

    def __init__(self, message: str, path: Optional[str] = None, retry_after_ms: Optional[int] = None):
        super().__init__(message)
        self.path = path
        self.retry_after_ms = retry_after_ms


class SupervisorTimeout(ClipvisorError):
    """No answer arrived within the request's deadline plus the client's margin: the supervisor
    is alive but not answering (stopped, wedged). The connection is dropped; the next call
    reconnects."""


class BlockFormatError(ClipvisorError):
    """A block (the tensors of one clip) is malformed, truncated, tampered with or unsealed."""


class ClipFailure(Exception):
    """What the supervisor answered about one clip request that did not decode: the attributes
    shared by :class:`ClipSkipped` (about the clip) and by :class:`InvalidRequest` and
    :class:`ClipCancelled` (about the caller or the service). Catch the families, not this.

    Attributes:
        reason: the protocol's reason: ``timeout``, ``crashed``, ``out_of_memory``,
            ``decode_error``, ``unsupported``, ``too_large``, ``not_found``, ``permission``,
            ``quarantined``, ``cancelled`` or ``invalid_request``.
        path: the clip as the request named it (``None`` when unknown).
        message: the supervisor's human message; it names the file or the field.
        detail: the underlying detail (FFmpeg's words, the field at fault...), if any.
        clip: the clip's index within a :meth:`Client.sample` call, else ``None``.
        elapsed_ms: how long the supervisor spent on it, when it said.

    ``Cls(message)`` alone is accepted too (the class's own reason, no path), so that the
    exception keeps its type when a DataLoader worker's error is raised again in the main
    process.
    """

    reason: str = "skipped"

    def __init__(
        self,
        reason: str,
        path: Optional[str] = None,
        message: Optional[str] = None,
        *,
        detail: Optional[str] = None,
        clip: Optional[int] = None,
        elapsed_ms: Optional[float] = None,
    ):
        if message is None:
            if path is None:  # Cls(message)
                reason, message = type(self).reason, reason
            else:
                message = f"{path}: {reason}"
        super().__init__(message)
        self.reason = reason
        self.path = path
        self.message = message
        self.detail = detail
        self.clip = clip
        self.elapsed_ms = elapsed_ms

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reason={self.reason!r}, path={self.path!r}, message={self.message!r})"

    def __reduce__(self) -> Any:
        # Picklable with its attributes, so it survives a DataLoader worker -> main process hop.
        return (
            _rebuild_failure,
            (type(self), self.reason, self.path, self.message, self.detail, self.clip, self.elapsed_ms),
        )


def _rebuild_failure(cls: Type[ClipFailure], reason: str, path: Optional[str], message: str,
                     detail: Optional[str], clip: Optional[int], elapsed_ms: Optional[float]) -> ClipFailure:
    return cls(reason, path, message, detail=detail, clip=clip, elapsed_ms=elapsed_ms)


_rebuild_skip = _rebuild_failure  # the name pickles made by 0.1.0 refer to


class ClipSkipped(ClipFailure):
    """A clip was not decoded because of the clip: catch it to skip the sample.

    ``reason`` is one of ``timeout``, ``crashed``, ``out_of_memory``, ``decode_error``,
    ``unsupported``, ``too_large``, ``not_found``, ``permission``, ``quarantined`` or
    ``invalid_request`` (:class:`ClipIncompatible`); the attributes are :class:`ClipFailure`'s.
    """


class ClipTimeout(ClipSkipped):
    """The clip ran past its deadline; its worker was killed."""

    reason = "timeout"


class ClipCrashed(ClipSkipped):
    """The decoder crashed (a signal in codec code) on this clip."""

    reason = "crashed"


class ClipOutOfMemory(ClipSkipped):
    """Decoding the clip ran out of memory (address-space limit or OOM killer)."""

    reason = "out_of_memory"


class ClipCorrupt(ClipSkipped):
    """The media is damaged: it could not be demuxed or decoded (``decode_error``)."""

    reason = "decode_error"


class ClipUnsupported(ClipSkipped):
    """A container, codec or feature this build cannot decode (or no stream of the kind asked)."""

    reason = "unsupported"


class ClipTooLarge(ClipSkipped):
    """The source or the requested output exceeds the supervisor's size limits."""

    reason = "too_large"


class ClipNotFound(ClipSkipped):
    """No such file (as the supervisor sees it)."""

    reason = "not_found"


class ClipPermission(ClipSkipped):
    """The file may not be read by the supervisor (or lies outside its allowed roots)."""

    reason = "permission"


class ClipQuarantined(ClipSkipped):
    """The clip failed before in a way that would fail again; answered without decoding."""

    reason = "quarantined"


class ClipIncompatible(ClipSkipped, ValueError):
    """The request cannot work with this clip: fewer frames than asked for, a timestamp or range
    past its end, an aspect ratio ``smart_resize`` refuses. A worker found it on the clip, so it
    is a skip (reason ``invalid_request``, with the clip's ``path``; ``detail`` names the field).
    Also a ``ValueError``, as qwen-vl-utils raises for such clips."""

    reason = "invalid_request"


class InvalidRequest(ClipFailure, ClipvisorError, ValueError):
    """The request itself is wrong, whatever the clip: a misspelled option, a field's type or
    range, a value JSON cannot carry, more than 256 clips in a sample. ``detail`` names the field
    (``clips[2].fps`` in a sample, whose index is also ``clip``).

    A programming error, so not a :class:`ClipSkipped`: it raises out of a ``SkippingDataset``
    and a DataLoader instead of dropping every sample. Also a ``ValueError``."""

    reason = "invalid_request"


class ClipCancelled(ClipFailure, ClipvisorError):
    """Cancelled: by the client, or because the supervisor is shutting down. Not about the clip,
    so not a :class:`ClipSkipped`: a loop that skipped it would drop every sample while the
    service stops. (The siblings an all-or-nothing sample cancels are never raised: the failing
    clip is.)"""

    reason = "cancelled"


_BY_REASON: Dict[str, Type[ClipFailure]] = {
    "timeout": ClipTimeout,
    "crashed": ClipCrashed,
    "out_of_memory": ClipOutOfMemory,
    "decode_error": ClipCorrupt,
    "unsupported": ClipUnsupported,
    "too_large": ClipTooLarge,
    "not_found": ClipNotFound,
    "permission": ClipPermission,
    "quarantined": ClipQuarantined,
    "cancelled": ClipCancelled,
    "invalid_request": InvalidRequest,
}


def skip_from_error(
    error: Mapping[str, Any], *, path: Optional[str] = None, clip: Optional[int] = None,
    elapsed_ms: Optional[float] = None,
) -> ClipFailure:
    """The exception for a protocol ``error`` object (not ``overloaded``, which the client
    retries and then reports as :class:`Overloaded`): a :class:`ClipSkipped` subclass when the
    clip is at fault, :class:`InvalidRequest` or :class:`ClipCancelled` when the caller or the
    service is. ``invalid_request`` that names the clip (``path`` in the error: a worker found
    the clip cannot satisfy the request) is :class:`ClipIncompatible`. An unknown reason (a
    newer supervisor) gives a plain :class:`ClipSkipped`. `path` fills in a path the error
    lacks."""
    reason = str(error.get("reason", "unknown"))
    err_path = error.get("path")
    cls = _BY_REASON.get(reason, ClipSkipped)
    if cls is InvalidRequest and isinstance(err_path, str) and err_path:
        cls = ClipIncompatible
    message = error.get("message")
    if not isinstance(message, str) or not message:
        message = f"{err_path or path or 'clip'}: {reason}"
    detail = error.get("detail")
    return cls(
        reason,
        err_path if isinstance(err_path, str) else path,
        message,
        detail=detail if isinstance(detail, str) else None,
        clip=clip,
        elapsed_ms=elapsed_ms,
    )
