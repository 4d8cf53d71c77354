"""DataLoader helpers: drop the samples whose clips were skipped, and say which (docs/compat.md).

::

    from torch.utils.data import DataLoader
    from clipvisor.torch import SkippingDataset, skip_collate

    data = SkippingDataset(MyVideoDataset(...))      # __getitem__ may raise ClipSkipped
    loader = DataLoader(data, batch_size=8, num_workers=8, collate_fn=skip_collate)
    for batch in loader:
        if batch is None:                             # every sample of this batch was skipped
            continue
        ...
    print(data.skip_count, data.skipped_paths)       # from every worker process

- :class:`SkippingDataset` wraps a map-style dataset. A ``__getitem__`` that raises
  :class:`~clipvisor.ClipSkipped` — or returns a :class:`~clipvisor.ClipSkipped` instance
  somewhere in a list, tuple or dict (``Client.sample(..., all_or_nothing=False)``) — gives a
  :class:`Skipped` marker instead: the whole sample is dropped, since a conversation needs all
  its videos. Each skip is logged once per path per process (logger ``clipvisor.torch``) and
  recorded where the main process can read it, whichever worker process it happened in.
- :func:`skip_collate` drops the markers from a batch and collates the rest (torch's
  ``default_collate``, or ``collate_fn=``); a batch with nothing left is ``None``. Under
  ``DataLoader(batch_size=None)`` (or through :func:`skip_convert`) a marker becomes ``None``
  and every other sample passes through unchanged.

Importing this module does not import torch: :class:`SkippingDataset` is a plain map-style
dataset (``__getitem__`` and ``__len__``, all a ``DataLoader`` needs), and torch is imported by
:func:`skip_collate` only when no ``collate_fn`` is given. Everything works with numpy alone.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
import tempfile
import threading
import weakref
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple, Type

from .errors import ClipSkipped

__all__ = ["SkippingDataset", "Skipped", "SkipRecord", "skip_collate", "skip_convert"]

logger = logging.getLogger(__name__)


class Skipped:
    """What :class:`SkippingDataset` returns for a dropped sample (removed by :func:`skip_collate`)."""

    __slots__ = ("index", "path", "reason", "message")

    def __init__(self, index: Any, path: Optional[str], reason: str, message: str):
        self.index = index
        self.path = path
        self.reason = reason
        self.message = message

    def __reduce__(self) -> Any:
        return (Skipped, (self.index, self.path, self.reason, self.message))

    def __repr__(self) -> str:
        return f"Skipped(index={self.index!r}, path={self.path!r}, reason={self.reason!r})"


class SkipRecord(NamedTuple):
    """One dropped sample: its index, the clip's path and reason, the message, the process."""

    index: Any
    path: Optional[str]
    reason: str
    message: str
    pid: int


class _SharedLog:
    """Append-only JSON lines that every process of a DataLoader can write and the main process
    reads: a memfd (no file to leak), ``O_APPEND`` so that concurrent lines do not interleave.
    Forked workers inherit the fd; spawned ones (unpickled) reopen it through
    ``/proc/<owner>/fd/<fd>``."""

    def __init__(self) -> None:
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("clipvisor-skips", os.MFD_CLOEXEC)
        else:  # pragma: no cover - not Linux
            with tempfile.TemporaryFile() as f:
                fd = os.dup(f.fileno())
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
        self._setup(fd, os.getpid())

    def _setup(self, fd: int, owner: int) -> None:
        self.fd = fd
        self.owner = owner
        self._closer = weakref.finalize(self, _close_quietly, fd)

    def __getstate__(self) -> Dict[str, int]:
        return {"fd": self.fd, "owner": self.owner}

    def __setstate__(self, state: Dict[str, int]) -> None:
        fd, owner = state["fd"], state["owner"]
        if owner != os.getpid():
            fd = os.open(f"/proc/{owner}/fd/{fd}", os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        else:  # unpickled in the owner itself (a copy): share the fd without owning it
            fd = os.dup(fd)
        self._setup(fd, owner)

    def append(self, record: Dict[str, Any]) -> None:
        os.write(self.fd, (json.dumps(record, default=repr) + "\n").encode("utf-8"))

    def read(self) -> List[Dict[str, Any]]:
        size = os.fstat(self.fd).st_size
        data = os.pread(self.fd, size, 0) if size else b""
        out = []
        for line in data.decode("utf-8", "replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # pragma: no cover - a line is written whole
                continue
        return out


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


# Paths already logged by this process (reset in forked children: "once per process").
_logged: Set[Tuple[str, str]] = set()
_logged_lock = threading.Lock()


def _reset_after_fork() -> None:
    global _logged_lock
    _logged_lock = threading.Lock()
    _logged.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _find_skip(item: Any, depth: int = 0) -> Optional[BaseException]:
    """A ClipSkipped instance inside `item` (lists, tuples, dicts; a few levels deep)."""
    if isinstance(item, ClipSkipped):
        return item
    if depth >= 4:
        return None
    if isinstance(item, (list, tuple)):
        values: Iterable[Any] = item
    elif isinstance(item, dict):
        values = item.values()
    else:
        return None
    for value in values:
        found = _find_skip(value, depth + 1)
        if found is not None:
            return found
    return None


class SkippingDataset:
    """Wraps a map-style dataset whose ``__getitem__`` may raise :class:`~clipvisor.ClipSkipped`.

    Args:
        dataset: the wrapped dataset (``__getitem__``, ``__len__``).
        skip: the exception types that drop a sample (default: ``ClipSkipped``, which includes
            ``ClipIncompatible`` and ``clipvisor.compat.qwen.QwenValueError``: the clip cannot
            give what was asked). ``ClipvisorError`` is never caught: the supervisor is unusable
            (``SupervisorUnavailable``...), or the caller got the request wrong
            (``InvalidRequest``: a misspelled option, a value out of range), which would
            otherwise drop every sample of the run.
        log: log each skipped path once per process (logger ``clipvisor.torch``, WARNING).

    Make it in the main process, before the DataLoader starts its workers: the skip records of
    every worker are gathered through it (``skipped``, ``skip_count``, ``skipped_paths``,
    ``skip_counts``). Attributes it does not have are looked up on the wrapped dataset.
    """

    def __init__(self, dataset: Any, *, skip: Sequence[Type[BaseException]] = (ClipSkipped,), log: bool = True):
        self.dataset = dataset
        self.skip = tuple(skip)
        self.log = log
        self._records = _SharedLog()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        try:
            item = self.dataset[index]
        except self.skip as exc:
            return self._dropped(index, exc)
        found = _find_skip(item)
        if found is not None:
            return self._dropped(index, found)
        return item

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "dataset" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["dataset"], name)

    def _dropped(self, index: Any, exc: BaseException) -> Skipped:
        path = getattr(exc, "path", None)
        reason = str(getattr(exc, "reason", type(exc).__name__))
        message = getattr(exc, "message", None) or str(exc)
        path = str(path) if path is not None else None
        self._records.append({"index": index, "path": path, "reason": reason, "message": message,
                              "pid": os.getpid()})
        if self.log:
            key = (path or repr(index), reason)
            with _logged_lock:
                first = key not in _logged
                _logged.add(key)
            if first:
                logger.warning("skipping sample %r: %s: %s", index, reason, message)
        return Skipped(index, path, reason, message)

    @property
    def skipped(self) -> List[SkipRecord]:
        """Every dropped sample so far, from every process, in the order they were written."""
        return [SkipRecord(r.get("index"), r.get("path"), str(r.get("reason")), str(r.get("message")),
                           int(r.get("pid") or 0)) for r in self._records.read()]

    @property
    def skip_count(self) -> int:
        """How many samples were dropped (a sample dropped again in a later epoch counts again)."""
        return len(self._records.read())

    @property
    def skipped_paths(self) -> Set[str]:
        """The paths of the clips that made samples drop."""
        return {r.path for r in self.skipped if r.path is not None}

    @property
    def skip_counts(self) -> Dict[str, int]:
        """Dropped samples by reason (``timeout``, ``decode_error``...)."""
        return dict(collections.Counter(r.reason for r in self.skipped))


def _default_collate() -> Callable[[List[Any]], Any]:
    try:
        from torch.utils.data import default_collate  # torch >= 1.11
    except ImportError:
        try:
            from torch.utils.data._utils.collate import default_collate
        except ImportError as exc:
            raise ImportError("skip_collate() without collate_fn= needs PyTorch: pip install torch "
                              "(or pass collate_fn=)") from exc
    return default_collate


def skip_convert(sample: Any, convert_fn: Optional[Callable[[Any], Any]] = None) -> Any:
    """The collate function for ``DataLoader(batch_size=None)``, where each sample comes alone:
    a :class:`Skipped` marker becomes ``None``; any other sample (a list of clips included) is
    returned unchanged, or passed to `convert_fn` when given."""
    if isinstance(sample, Skipped):
        return None
    return sample if convert_fn is None else convert_fn(sample)


def _unbatched_call() -> bool:
    """True when skip_collate was called by a DataLoader without automatic batching
    (``batch_size=None``): its fetcher then passes one sample, not a list of samples. Looks at
    the calling frame (torch's ``_BaseDatasetFetcher.fetch``); anything else counts as batched."""
    try:
        frame = sys._getframe(2)
    except ValueError:  # pragma: no cover - no caller
        return False
    fetcher = frame.f_locals.get("self")
    return (type(fetcher).__module__ or "").startswith("torch.utils.data") and \
        getattr(fetcher, "auto_collation", None) is False


def skip_collate(batch: Any, collate_fn: Optional[Callable[[List[Any]], Any]] = None) -> Any:
    """Drops :class:`Skipped` markers from a batch and collates the rest with `collate_fn`
    (default: torch's ``default_collate``). Returns ``None`` when nothing is left.

    For another collate function use ``functools.partial(skip_collate, collate_fn=f)`` (picklable,
    for spawned workers). With ``DataLoader(batch_size=None)`` each sample comes alone: a marker
    becomes ``None`` and anything else, a list included, is passed to `collate_fn` (or returned)
    as is (see :func:`skip_convert`, which does this whoever calls it; called directly, rather
    than by a DataLoader, ``skip_collate`` treats a list as a batch).
    """
    if isinstance(batch, Skipped):
        return None
    if not isinstance(batch, list) or _unbatched_call():
        return batch if collate_fn is None else collate_fn(batch)
    kept = [item for item in batch if not isinstance(item, Skipped)]
    if not kept:
        return None
    return (collate_fn or _default_collate())(kept)
