"""Which files to look at: the filter and the walk, shared by the startup scan, the rescan, the live watch, the
pipeline, the done-index and the gallery.

- :func:`is_ignored` / :func:`wanted`: names that are never media to process, and a root's include/exclude globs.
- :func:`scan` / :func:`scan_paths`: a fast ``os.scandir`` walk of one root.
- :func:`link_allowed`: whether a symlink may be read.

Nothing here imports watchdog: the commands that only walk folders (``status``, ``gallery``, ``once``) never load it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from operator import attrgetter
from pathlib import Path

import structlog

from .globs import any_match, matches_everything
from .model import WatchRoot
from .sidecar import TEMP_MARK

log = structlog.get_logger()

__all__ = [
    "ScanErrorCallback",
    "absolute",
    "is_ignored",
    "link_allowed",
    "log_scan_error",
    "relative",
    "scan",
    "scan_paths",
    "wanted",
    "wanted_rel",
]

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


# --------------------------------------------------------------------------------------------------------------------
# Filtering


def _ignored_name(name: str) -> bool:
    """True for one path component (file or folder name) that is never media to process."""
    if not name:
        return False
    if name[0] in ".~":  # hidden, macOS ._*, .syncthing.*, .~lock.*#, Office ~$x, ~syncthing~x.tmp
        return True
    folded = name.casefold()
    return folded in JUNK_NAMES or folded.endswith(TEMP_SUFFIXES) or TEMP_MARK in folded


def _is_sidecar(name: str, sidecar_suffix: str) -> bool:
    # XMP sidecars (ours, and those photo apps write) are never media: no need to sniff them to know it.
    folded = name.casefold()
    return (bool(sidecar_suffix) and folded.endswith(sidecar_suffix.casefold())) or folded.endswith(".xmp")


def is_ignored(rel_path: str, *, sidecar_suffix: str) -> bool:
    """True when ``rel_path`` (relative to its root, ``/``-separated) is never processed.

    That is: any hidden component, temp and partial-download names, NAS/macOS/Windows junk, XMP sidecars, and our own sidecars
    (a name ending in ``sidecar_suffix``) and temp files. Folder names count too: nothing below ``@eaDir/`` or a
    ``photos.tmp/`` being assembled is wanted (once such a folder is renamed, its files arrive as moved events).
    """
    parts = [p for p in rel_path.replace("\\", "/").split("/") if p]
    if not parts:
        return True
    return any(_ignored_name(p) for p in parts) or _is_sidecar(parts[-1], sidecar_suffix)


def absolute(path: Path | str) -> Path:
    return Path(os.path.abspath(path))


def relative(root_dir: Path, path: Path) -> str | None:
    """``path`` relative to ``root_dir`` with ``/`` separators, or None when it is not strictly inside."""
    if path.is_absolute() != root_dir.is_absolute():
        root_dir, path = absolute(root_dir), absolute(path)
    try:
        rel = path.relative_to(root_dir)
    except ValueError:
        return None
    return rel.as_posix() if rel.parts else None


def wanted_rel(root: WatchRoot, rel: str, sidecar_suffix: str) -> bool:
    """:func:`wanted` for a path already made relative to ``root`` (``/``-separated)."""
    if not root.recursive and "/" in rel:
        return False
    if is_ignored(rel, sidecar_suffix=sidecar_suffix):
        return False
    return any_match(rel, root.include) and not any_match(rel, root.exclude)


def wanted(root: WatchRoot, path: Path, *, sidecar_suffix: str) -> bool:
    """True when ``path`` is inside ``root`` (a direct child for a non-recursive root), is not ignored, matches one
    of ``root.include`` and none of ``root.exclude``. Looks at the name only: no file-system access."""
    rel = relative(root.path, Path(path))
    return rel is not None and wanted_rel(root, rel, sidecar_suffix)


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
    stack: list[tuple[str, str]] = [(os.fspath(absolute(root.path)), "")]
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


def link_allowed(root: WatchRoot, path: Path) -> bool:
    """Whether a symlink at ``path`` may be processed: it points at a regular file inside ``root`` (or anywhere,
    with ``follow_symlinks: true``)."""
    target = os.path.realpath(path)
    if not os.path.isfile(target):
        return False
    if root.follow_symlinks:
        return True
    return target.startswith(os.path.join(os.path.realpath(root.path), ""))
