"""The live watch: :class:`Watcher` runs watchdog observers (inotify, or polling for network shares) that feed a
:class:`~mmwatchd.settle.StabilityTracker`; the daemon calls :meth:`Watcher.ready` in a loop and gets absolute paths of
files that are ready. Which files count is :mod:`mmwatchd.walk`'s filter, the same as the scans'.

What watchdog delivers (in the versions ``pyproject.toml`` allows), and what the handler relies on:

- A file written in place: created, modified..., closed (``FileClosedEvent``, inotify only).
- A file or folder moved in from outside the root: created, with no close event; for a folder, synthesised created
  events for everything already inside it (inotify and polling). A new folder gets the same treatment.
- A rename inside the root (``x.jpg.part`` -> ``x.jpg``): one moved event; a moved folder brings synthesised moved
  events for its files.
- A file moved out of the root: deleted. A folder moved out: one folder deleted event under inotify, nothing for
  the files inside it, hence :meth:`StabilityTracker.forget_tree`.
- The kernel queue overflowing or the watch limit being hit is not reported through events at all; the inotify file
  descriptor is subclassed to see both (:meth:`Watcher.take_overflow`).
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog
from watchdog.events import EVENT_TYPE_CLOSED, FileSystemEvent, FileSystemEventHandler
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver
from watchdog.utils import UnsupportedLibcError

from .errors import ConfigError
from .model import WatchRoot
from .settle import StabilityTracker
from .walk import absolute, link_allowed, wanted_rel

try:  # Linux only; elsewhere the platform's default observer is used.
    from watchdog.observers.inotify import InotifyEmitter, InotifyObserver
    from watchdog.observers.inotify_c import InotifyFD
except (ImportError, OSError, UnsupportedLibcError):
    InotifyEmitter = InotifyObserver = InotifyFD = None  # type: ignore[assignment,misc]

log = structlog.get_logger()

__all__ = ["Watcher"]

#: The sysctl that bounds inotify watches (one per watched folder).
WATCH_LIMIT_SYSCTL = "fs.inotify.max_user_watches"


# --------------------------------------------------------------------------------------------------------------------
# Watching


def _inotify_hooks_available() -> bool:
    """watchdog >= 7.1 lets an observer use a given inotify descriptor, which is how overflows become visible."""
    if InotifyEmitter is None or InotifyFD is None:
        return False
    try:
        return "inotify_fd" in inspect.signature(InotifyEmitter.__init__).parameters
    except (TypeError, ValueError):
        return False


if InotifyFD is not None:

    class _InotifyFD(InotifyFD):
        """watchdog's inotify reader, reporting queue overflows and the watch limit.

        watchdog handles both internally (it rebuilds recursive watches after an overflow, and silently skips
        subfolders it cannot watch) without telling its handlers that events were lost.
        """

        def __init__(self, *, on_overflow: Callable[[], None], on_watch_limit: Callable[[bytes], None]) -> None:
            super().__init__()
            self._on_overflow = on_overflow
            self._on_watch_limit = on_watch_limit

        def handle_event(self, event: Any) -> None:
            if event.is_queue_overflow:
                self._on_overflow()
            super().handle_event(event)

        def add_callback(self, path: bytes, mask: Any, callback: Any, id_: Any) -> Any:
            try:
                return super().add_callback(path, mask, callback, id_)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    self._on_watch_limit(path)
                raise


def _quiet_duplicate_watch_warning() -> None:
    """Silence watchdog's warning about registering a folder's watch twice.

    When nested folders appear at once (``mkdir -p``, unzip, rsync), watchdog adds the inner folder's watch while
    handling the outer one and again for the inner folder's own create event; the second registration is a no-op,
    but watchdog warns about it from its reader thread, where a warnings-as-errors setting would kill that thread
    and silently stop all events. Filters are process-wide; adding the same filter again replaces it.
    """
    warnings.filterwarnings(
        "ignore",
        message=r"Callback with id '\d+' already exists for watch",
        category=RuntimeWarning,
    )


def _quiet_watchdog_logging() -> None:
    """Keep watchdog's own stdlib log records (``Inotify queue overflowed; ...``) off stderr.

    With no logging configured they reach stderr through ``logging.lastResort`` as plain text, written from the
    inotify thread in the middle of our JSON lines (one journal line came out as a JSON object with watchdog's
    sentence glued to its end). What they report, we log ourselves (``watch.overflow``, ``watch.limit``). A
    ``NullHandler`` on watchdog's logger is the standard way to say that; an application that configures logging
    still gets the records through propagation.
    """
    logger = logging.getLogger("watchdog")
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())


def _read_sysctl(name: str) -> str:
    try:
        return Path("/proc/sys", *name.split(".")).read_text().strip()
    except OSError:
        return "?"


def _watch_limit_message(where: str) -> str:
    current = _read_sysctl(WATCH_LIMIT_SYSCTL)
    return (
        f"{where}: the inotify watch limit is reached ({WATCH_LIMIT_SYSCTL}={current}); "
        f"raise it with `sudo sysctl {WATCH_LIMIT_SYSCTL}=524288` "
        f"(and persist it in /etc/sysctl.d/90-mmwatchd.conf)"
    )


class _Handler(FileSystemEventHandler):
    """Runs on a watchdog thread under the observer's lock: filters and records, nothing more."""

    def __init__(self, watcher: Watcher, index: int) -> None:
        self._watcher = watcher
        self._index = index

    def dispatch(self, event: FileSystemEvent) -> None:
        self._watcher._on_event(self._index, event)


class Watcher:
    """Watch roots and report files once they are ready.

    Owns the watchdog observers (inotify by default; ``PollingObserver(timeout=root.poll_interval_s)`` for roots with
    ``polling: true``, or when inotify runs out of watches) and a :class:`StabilityTracker`. watchdog calls the
    handler from its own threads, so the handler only filters and records; :meth:`ready` does the stats.

    Paths are reported under ``root.path`` made absolute (symlinks in it are kept). When events may have been lost
    (kernel queue overflow, watch limit hit in a new subfolder), :meth:`take_overflow` says so and ``on_overflow`` is
    called from a watchdog thread: the caller should rescan.
    """

    def __init__(
        self,
        roots: Sequence[WatchRoot],
        *,
        settle_s: float,
        sidecar_suffix: str,
        clock: Callable[[], float] = time.monotonic,
        on_overflow: Callable[[], None] | None = None,
    ) -> None:
        self.roots = tuple(roots)
        self.sidecar_suffix = sidecar_suffix
        self._tracker = StabilityTracker(settle_s=settle_s, clock=clock)
        self._clock = clock
        self._on_overflow = on_overflow
        self._cond = threading.Condition()
        # Absolute root paths as reported, and the resolved folders watchdog watches (inotify does not follow a
        # symlinked root, and event paths come back under the watched folder).
        self._root_dirs = [absolute(r.path) for r in self.roots]
        self._watch_dirs = [os.path.realpath(d) for d in self._root_dirs]
        self._watch_prefixes = [os.path.join(d, "") for d in self._watch_dirs]
        self._observers: list[BaseObserver] = []
        self._inotify: BaseObserver | None = None
        self._inotify_fd: Any = None
        self._limit_hit = False
        self._backends: dict[Path, str] = {}
        self._lost = 0
        self._lost_seen_by_ready = 0
        self._started = False
        self._running = False
        self._stopped = False

    # -- lifecycle ---------------------------------------------------------------------------------------------------

    def __enter__(self) -> Watcher:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Schedule every root.

        A missing or unusable root raises :class:`ConfigError` naming ``watch[i].path``. Roots with ``create: true``
        are made by the command before the service starts and on each reload (``cli._require_roots``), in that one
        place: one missing here has gone since (an unmounted share).
        """
        if self._started:
            raise RuntimeError("Watcher.start() called twice")
        self._started = True
        problems = []
        for i, root_dir in enumerate(self._root_dirs):
            if not root_dir.exists():
                problems.append(f"watch[{i}].path: {root_dir} does not exist (not mounted? `create: true` makes it)")
            elif not root_dir.is_dir():
                problems.append(f"watch[{i}].path: {root_dir} is not a folder")
            elif not os.access(root_dir, os.R_OK | os.X_OK):
                problems.append(f"watch[{i}].path: {root_dir} cannot be read (permission denied)")
        if problems:
            raise ConfigError(problems)
        _quiet_watchdog_logging()
        if not all(r.polling for r in self.roots):
            _quiet_duplicate_watch_warning()
        try:
            for i, root in enumerate(self.roots):
                if root.polling:
                    self._start_polling(i)
                else:
                    self._start_native(i)
        except BaseException:
            self.stop()
            raise
        with self._cond:
            self._running = True

    def stop(self) -> None:
        """Stop and join every observer. Idempotent; wakes a blocked :meth:`ready`."""
        with self._cond:
            if self._stopped:
                return
            self._stopped = True
            self._cond.notify_all()
        for observer in self._observers:
            observer.stop()
        for observer in self._observers:
            if observer.is_alive():
                observer.join()
        self._observers.clear()
        if self._inotify_fd is not None:
            self._inotify_fd.stop()
            if self._inotify_fd.is_alive():
                self._inotify_fd.join()
            self._inotify_fd = None

    def _start_polling(self, i: int) -> None:
        root = self.roots[i]
        observer = PollingObserver(timeout=root.poll_interval_s)
        observer.schedule(_Handler(self, i), self._watch_dirs[i], recursive=root.recursive)
        self._observers.append(observer)
        try:
            observer.start()  # takes the first snapshot before returning
        except OSError as exc:
            where = f"watch[{i}].path: {self._root_dirs[i]}"
            raise ConfigError(f"{where} cannot be watched: {exc.strerror or exc}") from exc
        self._backends[self._root_dirs[i]] = "polling"

    def _native_observer(self) -> BaseObserver:
        """The shared inotify observer (the platform's default observer off Linux), started on first use."""
        if self._inotify is not None:
            return self._inotify
        observer: BaseObserver
        if _inotify_hooks_available():
            self._inotify_fd = _InotifyFD(on_overflow=self._overflow, on_watch_limit=self._watch_limit)
            self._inotify_fd.start()
            observer = BaseObserver(InotifyEmitter, inotify_fd=self._inotify_fd)
        elif InotifyObserver is not None:
            observer = InotifyObserver()
        else:
            from watchdog.observers import Observer

            observer = Observer()
        self._observers.append(observer)
        observer.start()
        self._inotify = observer
        return observer

    def _start_native(self, i: int) -> None:
        root, root_dir = self.roots[i], self._root_dirs[i]
        try:
            observer = self._native_observer()
            self._limit_hit = False
            watch = observer.schedule(_Handler(self, i), self._watch_dirs[i], recursive=root.recursive)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                reason = _watch_limit_message(f"watch[{i}].path: {root_dir}")
            elif exc.errno == errno.EMFILE:
                reason = (
                    f"watch[{i}].path: {root_dir}: the inotify instance limit is reached "
                    f"(fs.inotify.max_user_instances={_read_sysctl('fs.inotify.max_user_instances')})"
                )
            else:
                raise ConfigError(f"watch[{i}].path: {root_dir} cannot be watched: {exc.strerror or exc}") from exc
            self._fall_back(i, reason)
            return
        if self._limit_hit:
            # watchdog skips subfolders it cannot watch without saying so: poll the whole root instead.
            observer.unschedule(watch)
            self._fall_back(i, _watch_limit_message(f"watch[{i}].path: {root_dir}"))
            return
        self._backends[root_dir] = "inotify"

    def _fall_back(self, i: int, reason: str) -> None:
        root = self.roots[i]
        log.warning(
            "watch.polling_fallback", root=str(self._root_dirs[i]), reason=reason, interval_s=root.poll_interval_s
        )
        self._start_polling(i)

    # -- watchdog threads --------------------------------------------------------------------------------------------

    def _overflow(self) -> None:
        log.warning("watch.overflow", hint="the kernel dropped file events; a rescan will pick up what was missed")
        self._events_lost()

    def _watch_limit(self, path: bytes) -> None:
        with self._cond:
            self._limit_hit = True
            running = self._running
        if running:  # a new subfolder after start: it is not watched; the rescan finds its files
            log.warning("watch.limit", path=os.fsdecode(path), message=_watch_limit_message(os.fsdecode(path)))
            self._events_lost()

    def _events_lost(self) -> None:
        with self._cond:
            self._lost += 1
            self._cond.notify_all()
        if self._on_overflow is not None:
            self._on_overflow()

    def _public(self, i: int, src: bytes | str) -> tuple[Path, str] | None:
        """An event path as (absolute path under root.path, path relative to the root), or None if outside."""
        src = os.fsdecode(src)
        prefix = self._watch_prefixes[i]
        if len(src) <= len(prefix) or not src.startswith(prefix):
            return None
        rel = src[len(prefix) :]
        return self._root_dirs[i] / rel, rel.replace(os.sep, "/")

    def _on_event(self, i: int, event: FileSystemEvent) -> None:
        kind = event.event_type
        if kind in ("opened", "closed_no_write"):  # our own reads
            return
        src = self._public(i, event.src_path)
        with self._cond:
            before = self._tracker.next_deadline()
            if event.is_directory:
                if kind in ("deleted", "moved") and src is not None:
                    self._tracker.forget_tree(src[0])
                # Files inside a new or moved folder arrive as their own (synthesised) events.
                return
            if kind in ("deleted", "moved") and src is not None:
                self._tracker.forget(src[0])
            if kind == "moved":
                # A rename into place (x.jpg.part -> x.jpg) means the writer is done: confirm like a close.
                target, closed = (self._public(i, event.dest_path) if event.dest_path else None), True
            elif kind in ("created", "modified", "attrib", EVENT_TYPE_CLOSED):
                target, closed = src, kind == EVENT_TYPE_CLOSED
            else:
                return
            if target is None or not wanted_rel(self.roots[i], target[1], self.sidecar_suffix):
                return
            link = os.path.islink(target[0])
            if link and not link_allowed(self.roots[i], target[0]):
                return
            self._tracker.touch(target[0], closed=closed, link=link)
            after = self._tracker.next_deadline()
            if after is not None and (before is None or after < before):
                self._cond.notify_all()

    # -- consumer side -----------------------------------------------------------------------------------------------

    def ready(self, timeout: float) -> list[Path]:
        """Wait up to ``timeout`` seconds for files to become ready and return them (absolute paths).

        Returns early with an empty list after :meth:`stop`, or when events were lost since the last call (see
        :meth:`take_overflow`).
        """
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                paths = self._tracker.due()
                if paths:
                    return paths
                if self._stopped:
                    return []
                if self._lost != self._lost_seen_by_ready:
                    self._lost_seen_by_ready = self._lost
                    return []
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return []
                nxt = self._tracker.next_deadline()
                if nxt is not None:
                    # A little past the deadline, so the wake-up finds it due rather than spinning.
                    remaining = min(remaining, max(nxt - self._clock(), 0.0) + 0.002)
                self._cond.wait(remaining)

    def take_overflow(self) -> bool:
        """Whether events may have been lost since the last call (call it before a rescan)."""
        with self._cond:
            lost, self._lost = self._lost > 0, 0
            self._lost_seen_by_ready = 0
            return lost

    @property
    def backends(self) -> dict[Path, str]:
        """Each root's absolute path and how it is watched: ``"inotify"`` or ``"polling"``."""
        with self._cond:
            return dict(self._backends)

    def pending(self) -> int:
        """How many files are waiting to settle."""
        with self._cond:
            return len(self._tracker)
