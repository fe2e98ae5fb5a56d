"""When a file is ready: :class:`StabilityTracker` decides that a file has stopped changing.

A file is ready once it has been quiet for ``settle_s`` and has the same size and mtime in two stats ``settle_s``
apart; a close-after-write shortens the wait. Time comes from an injected clock; stats are real.
"""

from __future__ import annotations

import heapq
import itertools
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger()

__all__ = ["StabilityTracker"]

#: Upper bound for the short confirm after a close-after-write event.
CLOSE_CONFIRM_S = 0.2


Signature = tuple[int, int]  # (size, mtime_ns)


def _signature(path: Path) -> Signature | None:
    """(size, mtime_ns) of a regular file (symlinks not followed); None when it is gone or not a regular file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    except OSError as exc:
        log.warning("watch.stat_failed", path=str(path), error=exc.strerror or str(exc))
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (st.st_size, st.st_mtime_ns)


def _link_signature(path: Path) -> Signature | None:
    """(size, mtime_ns) of a symlink's target."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


@dataclass(slots=True)
class _Tracked:
    signature: Signature
    #: When the file may be ready: last event + settle_s (or + the confirm delay after a close).
    deadline: float
    #: Deadline of this entry's live heap item; other heap items for the path are stale.
    queued: float
    #: An allowed symlink: its target is what is watched for stability.
    link: bool = False


class StabilityTracker:
    """Decide when files have stopped changing.

    A file is ready when no event arrived for ``settle_s`` AND its (size, mtime_ns) is unchanged between two stats
    taken ``settle_s`` apart AND it is still a regular file. A close-after-write event (inotify ``IN_CLOSE_WRITE``) or
    a rename into place makes it ready sooner: after ``confirm_s`` (default ``min(settle_s, 0.2)``) if the stat is
    unchanged, since scanners and copy tools sometimes reopen a file they have just closed.

    One entry per path: a burst of events makes one ready path. Not thread-safe: :class:`Watcher` holds a lock around
    every call. Time comes from ``clock``; stats are real.
    """

    def __init__(
        self,
        *,
        settle_s: float,
        confirm_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_drop: Callable[[Path], None] | None = None,
    ) -> None:
        """``on_drop`` is told of each tracked path :meth:`due` drops because it vanished or stopped being a regular
        file (a caller holding such paths as pending must let them go)."""
        if settle_s < 0:
            raise ValueError(f"settle_s must be >= 0, got {settle_s}")
        self.settle_s = settle_s
        self.confirm_s = min(settle_s, CLOSE_CONFIRM_S) if confirm_s is None else confirm_s
        self._clock = clock
        self._on_drop = on_drop
        self._files: dict[Path, _Tracked] = {}
        # Min-heap of (deadline, seq, path). Later events only move an entry's deadline; the item is re-queued
        # when it surfaces early, so a flood of modify events does not grow the heap.
        self._heap: list[tuple[float, int, Path]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, path: object) -> bool:
        return path in self._files

    def _push(self, entry: _Tracked, path: Path, deadline: float) -> None:
        entry.queued = deadline
        heapq.heappush(self._heap, (deadline, next(self._seq), path))

    def touch(self, path: Path, *, closed: bool = False, link: bool = False) -> None:
        """Record an event for ``path``; ``closed`` for a close-after-write or a rename into place; ``link`` for a
        symlink the caller has allowed (see :func:`link_allowed`): its target's size and mtime are tracked."""
        sig = _link_signature(path) if link else _signature(path)
        if sig is None:  # gone already, or a symlink/fifo/folder
            self._files.pop(path, None)
            return
        deadline = self._clock() + (self.confirm_s if closed else self.settle_s)
        entry = self._files.get(path)
        if entry is None:
            entry = self._files[path] = _Tracked(signature=sig, deadline=deadline, queued=deadline, link=link)
            self._push(entry, path, deadline)
            return
        entry.signature = sig
        entry.deadline = deadline
        if deadline < entry.queued:
            self._push(entry, path, deadline)

    def forget(self, path: Path) -> None:
        """Drop ``path`` (deleted, or moved away)."""
        self._files.pop(path, None)

    def forget_tree(self, folder: Path) -> None:
        """Drop every path below ``folder`` (a folder deleted or moved away: inotify reports no per-file events)."""
        prefix = os.path.join(folder, "")
        for path in [p for p in self._files if str(p).startswith(prefix)]:
            del self._files[path]

    def clear(self) -> None:
        self._files.clear()
        self._heap.clear()

    def _live_top(self) -> tuple[float, int, Path] | None:
        """The first heap item that still belongs to a tracked path (stale items are dropped)."""
        while self._heap:
            item = self._heap[0]
            entry = self._files.get(item[2])
            if entry is not None and entry.queued == item[0]:
                return item
            heapq.heappop(self._heap)
        return None

    def next_deadline(self) -> float | None:
        """When :meth:`due` may next return something (possibly early, never late); None when nothing is tracked."""
        top = self._live_top()
        return None if top is None else top[0]

    def due(self) -> list[Path]:
        """Re-stat the paths whose deadline passed; return the stable ones (and stop tracking them).

        A changed file is checked again ``settle_s`` later; a vanished one, or one that is no longer a regular
        file, is dropped.
        """
        now = self._clock()
        ready: list[Path] = []
        while (top := self._live_top()) is not None and top[0] <= now:
            heapq.heappop(self._heap)
            path = top[2]
            entry = self._files[path]
            if entry.deadline > now:  # events arrived since this item was queued
                self._push(entry, path, entry.deadline)
                continue
            sig = _link_signature(path) if entry.link else _signature(path)
            if sig is None:
                del self._files[path]
                if self._on_drop is not None:
                    self._on_drop(path)
            elif sig == entry.signature:
                del self._files[path]
                ready.append(path)
            else:
                entry.signature = sig
                entry.deadline = now + self.settle_s
                self._push(entry, path, entry.deadline)
        return ready
