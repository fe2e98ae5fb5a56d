"""Which files to look at, and when a file is ready.

- :func:`is_ignored` / :func:`wanted`: the filter shared by the startup scan, the rescan and the live watch.
- :func:`scan`: a fast ``os.scandir`` walk of one root (startup pass and periodic safety-net rescan).
- :class:`StabilityTracker`: a file is ready once it has stopped changing (quiet for ``settle_s`` and the same
  size and mtime in two stats ``settle_s`` apart); a close-after-write shortens the wait.
- :class:`Watcher`: watchdog observers (inotify, or polling for network shares) feeding a tracker; the daemon
  calls :meth:`Watcher.ready` in a loop and gets absolute paths of files that are ready.

What watchdog 7.1 delivers, and what the handler relies on:

- A file written in place: created, modified..., closed (``FileClosedEvent``, inotify only).
- A file or folder moved in from outside the root: created, with no close event; for a folder, synthesised created
  events for everything already inside it (inotify and polling). A new folder gets the same treatment.
- A rename inside the root (``x.jpg.part`` -> ``x.jpg``): one moved event; a moved folder brings synthesised moved
  events for its files.
- A file moved out of the root: deleted. A folder moved out: one folder deleted event under inotify, nothing for
  the files inside it, hence :meth:`StabilityTracker.forget_tree`.
- The kernel queue overflowing or the watch limit being hit is not reported through events at all; the inotify file
  descriptor is subclassed to see both (:attr:`Watcher.overflowed`).
"""

from __future__ import annotations

import errno
import heapq
import inspect
import itertools
import logging
import os
import stat
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog
from watchdog.events import EVENT_TYPE_CLOSED, FileSystemEvent, FileSystemEventHandler
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from .errors import ConfigError
from .globs import any_match, matches_everything
from .model import WatchRoot
from .sidecar import TEMP_MARK

from watchdog.utils import UnsupportedLibcError

try:  # Linux only; elsewhere the platform's default observer is used.
    from watchdog.observers.inotify import InotifyEmitter, InotifyObserver
    from watchdog.observers.inotify_c import InotifyFD
except (ImportError, OSError, UnsupportedLibcError):
    InotifyEmitter = InotifyObserver = InotifyFD = None  # type: ignore[assignment,misc]

log = structlog.get_logger()

__all__ = ["StabilityTracker", "Watcher", "is_ignored", "scan", "wanted"]

#: Suffixes of files still being written by browsers, download managers, sync and transfer tools.
TEMP_SUFFIXES: tuple[str, ...] = (
    ".part",
    ".partial",
    ".tmp",
    ".temp",
    ".crdownload",
    ".download",
    ".!qb",
    ".!ut",
    ".!sync",
    ".filepart",
)

#: File and folder names that NAS boxes, Windows and macOS put everywhere (compared case-insensitively).
JUNK_NAMES: frozenset[str] = frozenset(
    {
        "thumbs.db",
        "ehthumbs.db",
        "desktop.ini",
        "icon\r",
        "@eadir",
        "@tmp",
        "@recycle",
        "@recently-snapshot",
        "#recycle",
        "#snapshot",
        "$recycle.bin",
        "system volume information",
        "lost+found",
    }
)

#: Marker in the names of our own temp files (``.<name>.mmwatchd-tmp-<pid>-<random>``; hidden as well).
OWN_TEMP_MARKER = ".mmwatchd-tmp-"

#: Upper bound for the short confirm after a close-after-write event.
CLOSE_CONFIRM_S = 0.2

#: The sysctl that bounds inotify watches (one per watched folder).
WATCH_LIMIT_SYSCTL = "fs.inotify.max_user_watches"


# --------------------------------------------------------------------------------------------------------------------
# Filtering


def _ignored_name(name: str) -> bool:
    """True for one path component (file or folder name) that is never media to process."""
    if not name:
        return False
    if name[0] in ".~":  # hidden, macOS ._*, .syncthing.*, .~lock.*#, Office ~$x, ~syncthing~x.tmp
        return True
    folded = name.casefold()
    return folded in JUNK_NAMES or folded.endswith(TEMP_SUFFIXES) or OWN_TEMP_MARKER in folded


def _is_sidecar(name: str, sidecar_suffix: str) -> bool:
    # XMP sidecars (ours, and those photo apps write) are never media: no need to sniff them to know it.
    folded = name.casefold()
    return (bool(sidecar_suffix) and folded.endswith(sidecar_suffix.casefold())) or folded.endswith(".xmp")


def is_ignored(rel_path: str, *, sidecar_suffix: str) -> bool:
    """True when ``rel_path`` (relative to its root, ``/``-separated) is never processed.

    That is: any hidden component, temp and partial-download names, NAS/macOS/Windows junk, XMP sidecars, and our
    own sidecars (a name ending in ``sidecar_suffix``) and temp files. Folder names count too: nothing below ``@eaDir/`` or a
    ``photos.tmp/`` being assembled is wanted (once such a folder is renamed, its files arrive as moved events).
    """
    parts = [p for p in rel_path.replace("\\", "/").split("/") if p]
    if not parts:
        return True
    return any(_ignored_name(p) for p in parts) or _is_sidecar(parts[-1], sidecar_suffix)


def _abs(path: Path | str) -> Path:
    return Path(os.path.abspath(path))


def _rel(root_dir: Path, path: Path) -> str | None:
    """``path`` relative to ``root_dir`` with ``/`` separators, or None when it is not strictly inside."""
    if path.is_absolute() != root_dir.is_absolute():
        root_dir, path = _abs(root_dir), _abs(path)
    try:
        rel = path.relative_to(root_dir)
    except ValueError:
        return None
    return rel.as_posix() if rel.parts else None


def _wanted_rel(root: WatchRoot, rel: str, sidecar_suffix: str) -> bool:
    if not root.recursive and "/" in rel:
        return False
    if is_ignored(rel, sidecar_suffix=sidecar_suffix):
        return False
    return any_match(rel, root.include) and not any_match(rel, root.exclude)


def wanted(root: WatchRoot, path: Path, *, sidecar_suffix: str) -> bool:
    """True when ``path`` is inside ``root`` (a direct child for a non-recursive root), is not ignored, matches one
    of ``root.include`` and none of ``root.exclude``. Looks at the name only: no file-system access."""
    rel = _rel(root.path, Path(path))
    return rel is not None and _wanted_rel(root, rel, sidecar_suffix)


# --------------------------------------------------------------------------------------------------------------------
# Scanning

ScanErrorCallback = Callable[[Path, OSError], None]


def log_scan_error(path: Path, exc: OSError) -> None:
    log.warning("watch.scan_unreadable", path=str(path), error=exc.strerror or str(exc))


def scan(
    root: WatchRoot,
    *,
    sidecar_suffix: str,
    on_error: ScanErrorCallback | None = None,
    on_temp: Callable[[Path], None] | None = None,
    sidecars: set[str] | None = None,
) -> Iterator[Path]:
    """Yield the absolute paths of the wanted regular files below ``root``.

    Order is deterministic: in each folder, its files by name, then its subfolders by name. Symlinked folders are
    not entered; a symlinked file is yielded only when :func:`link_allowed`; ignored folders are not entered. A folder
    that cannot be listed (the root included) is passed to ``on_error`` (default: a warning log line) and skipped. Our
    own temp files are passed to ``on_temp`` when given; the paths of sidecars found are added to ``sidecars`` when
    given, before the files of their folder are yielded. Uses the file type cached by ``scandir``, so a plain walk
    makes no ``stat`` call per file on local file systems.
    """
    return map(Path, scan_paths(root, sidecar_suffix=sidecar_suffix, on_error=on_error, on_temp=on_temp,
                                sidecars=sidecars))  # fmt: skip


def scan_paths(
    root: WatchRoot,
    *,
    sidecar_suffix: str,
    on_error: ScanErrorCallback | None = None,
    on_temp: Callable[[Path], None] | None = None,
    sidecars: set[str] | None = None,
) -> Iterator[str]:
    """:func:`scan` with ``str`` paths: a rescan that skips 100,000 up-to-date files makes no ``Path`` for them."""
    report = on_error or log_scan_error
    include, exclude = root.include, root.exclude
    take_all = matches_everything(include) and not exclude  # the default: no pattern to test per file
    suffix = sidecar_suffix.casefold()
    # (folder path, its path relative to the root with a trailing "/", or "" for the root itself)
    stack: list[tuple[str, str]] = [(os.fspath(_abs(root.path)), "")]
    while stack:
        dir_path, rel_dir = stack.pop()
        try:
            with os.scandir(dir_path) as it:
                entries = sorted(it, key=attrgetter("name"))
        except OSError as exc:
            report(Path(dir_path), exc)
            continue
        subdirs: list[tuple[str, str]] = []
        files: list[str] = []
        for entry in entries:
            name = entry.name
            if on_temp is not None and TEMP_MARK in name and entry.is_file(follow_symlinks=False):
                on_temp(Path(entry.path))  # a sidecar write cut short (the process was killed)
                continue
            if _ignored_name(name):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    if root.recursive:
                        subdirs.append((entry.path, f"{rel_dir}{name}/"))
                    continue
                if suffix and name.casefold().endswith(suffix):
                    if sidecars is not None:
                        sidecars.add(entry.path)
                    continue
                if entry.is_symlink():
                    if not link_allowed(root, Path(entry.path)):
                        continue
                elif not entry.is_file(follow_symlinks=False):
                    continue
            except OSError:  # vanished between listing and looking
                continue
            if take_all or (any_match(rel_dir + name, include) and not any_match(rel_dir + name, exclude)):
                files.append(entry.path)
        yield from files
        stack.extend(reversed(subdirs))


# --------------------------------------------------------------------------------------------------------------------
# Readiness

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


def link_allowed(root: WatchRoot, path: Path) -> bool:
    """Whether a symlink at ``path`` may be processed: it points at a regular file inside ``root`` (or anywhere,
    with ``follow_symlinks: true``)."""
    target = os.path.realpath(path)
    if not os.path.isfile(target):
        return False
    if root.follow_symlinks:
        return True
    return target.startswith(os.path.join(os.path.realpath(root.path), ""))


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

    class _InotifyFD(InotifyFD):  # type: ignore[misc,valid-type]
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
    (kernel queue overflow, watch limit hit in a new subfolder), :attr:`overflowed` turns true and ``on_overflow`` is
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
        self._root_dirs = [_abs(r.path) for r in self.roots]
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
        """Schedule every root (creating missing ones that have ``create: true``).

        A missing or unusable root raises :class:`ConfigError` naming ``watch[i].path``.
        """
        if self._started:
            raise RuntimeError("Watcher.start() called twice")
        self._started = True
        problems = []
        for i, (root, root_dir) in enumerate(zip(self.roots, self._root_dirs, strict=True)):
            if root.create and not root_dir.exists():
                try:
                    root_dir.mkdir(parents=True, exist_ok=True)
                    log.info("watch.created_root", root=str(root_dir))
                except OSError as exc:
                    problems.append(f"watch[{i}].path: {root_dir} cannot be created: {exc.strerror or exc}")
                    continue
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
            if target is None or not _wanted_rel(self.roots[i], target[1], self.sidecar_suffix):
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
        :attr:`overflowed`).
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

    @property
    def overflowed(self) -> bool:
        """True when events may have been lost since the last :meth:`take_overflow`."""
        with self._cond:
            return self._lost > 0

    def take_overflow(self) -> bool:
        """Return :attr:`overflowed` and reset it (call it before a rescan)."""
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

    def root_for(self, path: Path) -> WatchRoot | None:
        """The innermost root that wants ``path``, or None."""
        best: tuple[int, WatchRoot] | None = None
        for root, root_dir in zip(self.roots, self._root_dirs, strict=True):
            rel = _rel(root_dir, Path(path))
            if rel is not None and _wanted_rel(root, rel, self.sidecar_suffix):
                depth = len(root_dir.parts)
                if best is None or depth > best[0]:
                    best = (depth, root)
        return None if best is None else best[1]
