"""Exceptions of the clipvisor client.

Two separate families, so that a training loop can skip bad clips without hiding a broken
installation:

- :class:`ClipSkipped` and its subclasses: *this clip* was not decoded (a timeout, a crash, a
  corrupt or missing file...). A normal outcome for a dataset of real-world media; the
  exception carries the reason, the path and the supervisor's message. Catch it to skip.
- :class:`ClipvisorError`: the *infrastructure* failed (no supervisor, a protocol mismatch, a
  dead or wedged supervisor, a persistent overload, a malformed block). Retrying the same clip
  does not help; let it propagate or retry the whole step.
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
    "ClipCancelled",
    "InvalidRequest",
    "skip_from_error",
]


class ClipvisorError(Exception):
    """The supervisor could not be used: an infrastructure failure, not a property of a clip."""


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


class ClipSkipped(Exception):
    """A clip was not decoded. ``reason`` is one of the protocol's skip reasons.

    Attributes:
        reason: ``timeout``, ``crashed``, ``out_of_memory``, ``decode_error``, ``unsupported``,
            ``too_large``, ``not_found``, ``permission``, ``quarantined``, ``cancelled`` or
            ``invalid_request``.
        path: the clip as the request named it (``None`` when unknown).
        message: the supervisor's human message; it names the file.
        detail: the underlying detail (FFmpeg's words, the field at fault...), if any.
        clip: the clip's index within a :meth:`Client.sample` call, else ``None``.
        elapsed_ms: how long the supervisor spent on it, when it said.
    """

    reason: str = "skipped"

    def __init__(
        self,
        reason: str,
        path: Optional[str],
        message: str,
        *,
        detail: Optional[str] = None,
        clip: Optional[int] = None,
        elapsed_ms: Optional[float] = None,
    ):
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
            _rebuild_skip,
            (type(self), self.reason, self.path, self.message, self.detail, self.clip, self.elapsed_ms),
        )


def _rebuild_skip(cls: Type[ClipSkipped], reason: str, path: Optional[str], message: str,
                  detail: Optional[str], clip: Optional[int], elapsed_ms: Optional[float]) -> ClipSkipped:
    return cls(reason, path, message, detail=detail, clip=clip, elapsed_ms=elapsed_ms)


class ClipTimeout(ClipSkipped):
    """The clip ran past its deadline; its worker was killed."""


class ClipCrashed(ClipSkipped):
    """The decoder crashed (a signal in codec code) on this clip."""


class ClipOutOfMemory(ClipSkipped):
    """Decoding the clip ran out of memory (address-space limit or OOM killer)."""


class ClipCorrupt(ClipSkipped):
    """The media is damaged: it could not be demuxed or decoded (``decode_error``)."""


class ClipUnsupported(ClipSkipped):
    """A container, codec or feature this build cannot decode (or no stream of the kind asked)."""


class ClipTooLarge(ClipSkipped):
    """The source or the requested output exceeds the supervisor's size limits."""


class ClipNotFound(ClipSkipped):
    """No such file (as the supervisor sees it)."""


class ClipPermission(ClipSkipped):
    """The file may not be read by the supervisor (or lies outside its allowed roots)."""


class ClipQuarantined(ClipSkipped):
    """The clip failed before in a way that would fail again; answered without decoding."""


class ClipCancelled(ClipSkipped):
    """Cancelled: by the client, by a failing sibling in an all-or-nothing sample, or shutdown."""


class InvalidRequest(ClipSkipped, ValueError):
    """The request itself is wrong (a field's type or range); ``detail`` names the field.

    Also a ``ValueError``: it is a programming error more than a property of the clip.
    """


_BY_REASON: Dict[str, Type[ClipSkipped]] = {
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
) -> ClipSkipped:
    """The :class:`ClipSkipped` subclass for a protocol ``error`` object (not ``overloaded``,
    which the client retries and then reports as :class:`Overloaded`). An unknown reason
    (a newer supervisor) gives a plain :class:`ClipSkipped`."""
    reason = str(error.get("reason", "unknown"))
    cls = _BY_REASON.get(reason, ClipSkipped)
    err_path = error.get("path")
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
