"""Sidecar files: naming, atomic writes, freshness, and never clobbering a file mmwatchd did not write.

A sidecar is ``<media name><suffix>`` beside the media file. It is ours when it is a JSON object with an
``"mmwatchd"`` object carrying ``"schema"``; anything else at that path is left alone.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mmwatchd.errors import ForeignSidecar, SidecarError

SCHEMA = 1
#: Temp files are hidden and carry this mark, so the watcher and scans ignore them and leftovers are recognisable.
TEMP_MARK = ".mmwatchd-tmp-"
_HASH_CHUNK = 1 << 20


#: Longest file name most filesystems allow, in bytes.
NAME_MAX = 255


def sidecar_path(media: Path, suffix: str) -> Path:
    """``<name><suffix>`` beside the file; for a name too long to take the suffix, a shortened name that ends in a
    hash of the full one (still deterministic, and the sidecar records the full name in ``source.name``)."""
    return media.with_name(_fit(media.name, suffix))


def locate(media: Path, *, suffix: str, mirror: Path | None, roots: Sequence[Path]) -> Path:
    """Where ``media``'s sidecar lives: beside it, or under ``mirror`` at the media's full path (so two watched
    folders with the same name cannot collide): ``/srv/photos/a.jpg`` → ``<mirror>/srv/photos/a.jpg.json``."""
    if mirror is None:
        return sidecar_path(media, suffix)
    for root in sorted(roots, key=lambda r: len(r.parts), reverse=True):
        try:
            rel = media.relative_to(root)
        except ValueError:
            continue
        return sidecar_path(mirror / root.relative_to(root.anchor) / rel, suffix)
    return sidecar_path(mirror / media.name, suffix)


def _fit(name: str, tail: str, *, head: str = "") -> str:
    """``head + name + tail``, with ``name`` shortened (keeping a hash of it) when the whole exceeds NAME_MAX bytes."""
    raw = os.fsencode(name)
    room = NAME_MAX - len(os.fsencode(head + tail))
    if len(raw) <= room:
        return head + name + tail
    digest = hashlib.sha256(raw).hexdigest()[:10]
    keep = raw[: max(0, room - len(digest) - 1)]
    return head + keep.decode("utf-8", "ignore") + "~" + digest + tail


def is_ours(doc: object) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("mmwatchd"), dict) and "schema" in doc["mmwatchd"]


def read(path: Path) -> dict[str, Any] | None:
    """Our sidecar at ``path``, or None when there is none. Raises ForeignSidecar for a file we did not write."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(64 << 20)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise ForeignSidecar(f"{path}: a folder sits where the sidecar belongs; rename it to let mmwatchd write") from None
    except OSError as exc:
        raise SidecarError(f"{path}: cannot read existing sidecar: {exc.strerror or exc}") from exc
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        doc = None
    if not is_ours(doc):
        raise ForeignSidecar(
            f"{path}: a file mmwatchd did not write is in the way; it is left untouched and its media file is "
            "skipped (move it away, or set sidecar.suffix to another ending)"
        )
    return doc


_TEMP_WRITER = re.compile(re.escape(TEMP_MARK) + r"(\d+)-[0-9a-f]{8}\Z")


def temp_writer(name: str) -> int | None:
    """The id of the process that was writing the temp file ``name`` (None when the name does not say)."""
    found = _TEMP_WRITER.search(name)
    return int(found[1]) if found else None


def write(path: Path, doc: Mapping[str, Any]) -> None:
    """Write ``doc`` atomically: same-folder temp file, fsync, ``os.replace``. Never replaces a foreign file."""
    read(path)  # raises ForeignSidecar when something else is there
    # File names that are not UTF-8 reach us as lone surrogates: written as \\udcXX escapes they keep the JSON
    # valid UTF-8 and still round-trip to the original bytes (os.fsencode of the parsed string).
    data = (json.dumps(doc, ensure_ascii=False, indent=2) + "\n").encode("utf-8", "backslashreplace")
    tmp = path.with_name(_fit(path.name, f"{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}", head="."))
    try:
        if not path.parent.is_dir():  # a sidecar.dir mirror grows with the watched trees
            path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            _own_like_folder(fd, path.parent)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(path.parent)
    except OSError as exc:
        raise SidecarError(f"{path}: cannot write sidecar: {_why(exc)}") from exc


def _own_like_folder(fd: int, folder: Path) -> None:
    """A sidecar belongs to whoever owns its folder (a service running as root writing into a user's photos must
    not leave root-owned files there); the group follows the folder where we are allowed to set it."""
    try:
        st = os.stat(folder)
        if os.geteuid() == 0:
            os.fchown(fd, st.st_uid, st.st_gid)
        else:
            os.fchown(fd, -1, st.st_gid)
    except OSError:
        pass  # not allowed to change it: the file keeps our own user and group, which is still correct


def _why(exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        return f"{reason} (free some space; the file will be tried again)"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{reason} (mmwatchd needs write access to the folder; the file will be tried again)"
    return reason


def fsync_dir(folder: Path) -> None:
    # The rename is durable only once the directory entry is; some filesystems refuse O_RDONLY dir fsync.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def is_fresh(
    doc: Mapping[str, Any],
    *,
    size: int,
    mtime_ns: int,
    fingerprint: str,
    sha256: Callable[[], str],
) -> bool:
    """Whether ``doc`` already answers this file version under this rule.

    Same size and mtime means the same file. Same size but another mtime (a copy, a restore, ``touch``) is
    settled by the content hash, computed only then. Error sidecars count too: a file that failed for good is
    not retried until it or its rule changes.
    """
    if doc.get("fingerprint") != fingerprint:
        return False
    src = doc.get("source") or {}
    if src.get("size") != size:
        return False
    if src.get("mtime_ns") == mtime_ns:
        return True
    return bool(src.get("sha256")) and src.get("sha256") == sha256()
