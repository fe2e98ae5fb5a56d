"""Sidecar files: naming, atomic writes, freshness, and never clobbering a file mmwatchd did not write.

A sidecar is ``<media name><suffix>`` beside the media file. It is ours when it is a JSON object with an
``"mmwatchd"`` object carrying ``"schema"``; anything else at that path is left alone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeGuard

from mmwatchd.errors import ForeignSidecar, SidecarError
from mmwatchd.rules import rel_to_roots

SCHEMA = 1
#: Temp files are hidden and carry this mark, so the watcher and scans ignore them and leftovers are recognisable.
TEMP_MARK = ".mmwatchd-tmp-"
_HASH_CHUNK = 1 << 20


#: Longest file name most filesystems allow, in bytes.
NAME_MAX = 255


def sidecar_path(media: Path, suffix: str) -> Path:
    """``<name><suffix>`` beside the file; for a name too long to take the suffix, a shortened name that ends in a
    hash of the full one (still deterministic, and the sidecar records the full name in ``source.name``)."""
    return media.with_name(fit_name(media.name, suffix))


def locate(media: Path, *, suffix: str, mirror: Path | None, roots: Sequence[Path]) -> Path:
    """Where ``media``'s sidecar lives: beside it, or under ``mirror`` at the media's full path (so two watched
    folders with the same name cannot collide): ``/srv/photos/a.jpg`` → ``<mirror>/srv/photos/a.jpg.json``.

    Files outside the roots (``mmwatchd once``, a ``move_to`` folder) are mirrored at their full path as well, so
    that a sidecar moved with its file is found there again."""
    if mirror is None:
        return sidecar_path(media, suffix)
    root, rel = rel_to_roots(media, roots)
    if root is not None:
        return sidecar_path(mirror / root.relative_to(root.anchor) / rel, suffix)
    media = Path(os.path.abspath(media))
    return sidecar_path(mirror / media.relative_to(media.anchor), suffix)


def fit_name(name: str, tail: str, *, head: str = "") -> str:
    """``head + name + tail``, with ``name`` shortened (keeping a hash of it) when the whole exceeds NAME_MAX bytes."""
    raw = os.fsencode(name)
    room = NAME_MAX - len(os.fsencode(head + tail))
    if len(raw) <= room:
        return head + name + tail
    digest = hashlib.sha256(raw).hexdigest()[:10]
    keep = raw[: max(0, room - len(digest) - 1)]
    return head + keep.decode("utf-8", "ignore") + "~" + digest + tail


def is_ours(doc: object) -> TypeGuard[dict[str, Any]]:
    return isinstance(doc, dict) and isinstance(doc.get("mmwatchd"), dict) and "schema" in doc["mmwatchd"]


def read(path: Path) -> dict[str, Any] | None:
    """Our sidecar at ``path``, or None when there is none. Raises ForeignSidecar for a file we did not write."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(64 << 20)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise ForeignSidecar(
            f"{path}: a folder sits where the sidecar belongs; rename it to let mmwatchd write"
        ) from None
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
    data = _encode(doc)
    reserve(path, size=len(data)).commit(doc, data=data)


def _encode(doc: Mapping[str, Any]) -> bytes:
    # File names that are not UTF-8 reach us as lone surrogates: written as \\udcXX escapes they keep the JSON
    # valid UTF-8 and still round-trip to the original bytes (os.fsencode of the parsed string).
    return (json.dumps(doc, ensure_ascii=False, indent=2) + "\n").encode("utf-8", "backslashreplace")


def temp_path(path: Path) -> Path:
    """A fresh temp name for ``path``'s sidecar: hidden, in the same folder, naming this process (see
    :func:`temp_writer`), so start-up cleanup can tell a killed writer's leftover from a live one."""
    return path.with_name(fit_name(path.name, f"{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}", head="."))


class Reservation:
    """A sidecar temp file made, with room set aside, before anything is paid for.

    A folder mmwatchd cannot write into (read-only, no permission, disk full) is found out here, for free, instead
    of after a request whose answer then has nowhere to go. :meth:`commit` fills the file and renames it into place;
    :meth:`discard` removes it. One of the two must be called.
    """

    def __init__(self, path: Path, tmp: Path, fd: int) -> None:
        self.path = path
        self.tmp = tmp
        self._fd: int | None = fd
        with _open_lock:
            _open_reservations.add(tmp)

    def commit(self, doc: Mapping[str, Any], *, data: bytes | None = None) -> None:
        """Write ``doc`` into the temp file, fsync, and rename it over the sidecar path. Raises SidecarError (the
        temp file is removed) or ForeignSidecar (a file we did not write appeared at the path meanwhile)."""
        data = _encode(doc) if data is None else data
        fd, self._fd = self._fd, None
        if fd is None:
            raise ValueError("reservation already used")
        _forget_reservation(self.tmp)
        try:
            try:
                os.lseek(fd, 0, os.SEEK_SET)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.ftruncate(fd, len(data))  # give back what was set aside and not used
                os.fsync(fd)
            finally:
                os.close(fd)
            read(self.path)  # something foreign appeared while the request ran: leave it alone
            try:
                os.replace(self.tmp, self.path)
            except FileNotFoundError:
                if self.path.parent.is_dir():
                    # Another process's start-up cleanup took our temp file for a killed writer's (a request can
                    # outlast STALE_TEMP_S): the answer is paid for, so write it the ordinary way.
                    write(self.path, doc)
                    return
                raise
        except ForeignSidecar:
            _unlink_quietly(self.tmp)
            raise
        except OSError as exc:
            _unlink_quietly(self.tmp)
            raise SidecarError(f"{self.path}: cannot write sidecar: {os_reason(exc)}") from exc
        except BaseException:
            _unlink_quietly(self.tmp)
            raise
        fsync_dir(self.path.parent)

    def discard(self) -> None:
        """Remove the temp file (idempotent; nothing to do after :meth:`commit`)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            _forget_reservation(self.tmp)
            with contextlib.suppress(OSError):
                os.close(fd)
            _unlink_quietly(self.tmp)


#: Temp files of reservations not yet committed or discarded, so a process told to exit at once (a second SIGTERM)
#: removes them instead of leaving them for the next start-up's cleanup.
_open_reservations: set[Path] = set()
_open_lock = threading.Lock()


def _forget_reservation(tmp: Path) -> None:
    with _open_lock:
        _open_reservations.discard(tmp)


def discard_open_reservations() -> int:
    """Remove every temp file this process has reserved and not yet used; return how many. For an exit that does not
    wait for the requests in flight: their answers will never be written."""
    with _open_lock:
        tmps = list(_open_reservations)
        _open_reservations.clear()
    for tmp in tmps:
        _unlink_quietly(tmp)
    return len(tmps)


def reserve(path: Path, *, size: int) -> Reservation:
    """Create ``path``'s temp file (and a ``sidecar.dir`` mirror folder) with ``size`` bytes set aside.

    Raises SidecarError naming the folder, and what to do, when it cannot be written.
    """
    tmp = temp_path(path)
    fd: int | None = None
    try:
        if not path.parent.is_dir():  # a sidecar.dir mirror grows with the watched trees
            path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        own_like_folder(fd, path.parent)
        _set_aside(fd, size)
    except OSError as exc:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
            _unlink_quietly(tmp)
        raise SidecarError(f"{path.parent}: cannot write sidecars into this folder: {os_reason(exc)}") from exc
    return Reservation(path, tmp, fd)


def _set_aside(fd: int, size: int) -> None:
    """Allocate ``size`` bytes now, so a full disk says so before the request rather than after it."""
    if size <= 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.write(fd, bytes(size))  # a filesystem without fallocate: zeros claim the blocks as well


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


#: Ending of the lock file that claims a sidecar (``.<sidecar name>.mmwatchd-lock``; hidden, so watchers and scans
#: ignore it). Not a temp-file mark: start-up cleanup must never remove a lock another process holds.
LOCK_MARK = ".mmwatchd-lock"


class Claim:
    """This process's hold on a sidecar while it decides about, pays for and writes it.

    Two processes on the same files (``mmwatchd scan`` while the service runs, two machines sharing a folder) would
    otherwise both pay for the same description. The claim is an exclusive ``flock`` on a lock file beside the
    sidecar (``.<sidecar name>.mmwatchd-lock``), removed by its holder when done:

    - the kernel drops the lock when its process dies, ``kill -9`` included, so a leftover file (a process killed
      before it could remove it) is claimed again like a fresh one and removed by its next holder;
    - the holder removes the file while still holding the lock, and a claimant checks after locking that the name
      still leads to the file it locked (else it locked a file just removed, and tries again), so no two processes
      ever hold a claim on one sidecar at once;
    - it is per sidecar, not per media file: two paths to one file (a symlink, a hard link) each get their own
      sidecar, and neither blocks the other;
    - the lock file lives where the sidecar does, so creating it is the first proof that the folder can take the
      sidecar; ``flock`` works on NFS too (as a lock on the whole file).
    """

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            _unlink_quietly(self.path)  # while still holding it: see the class docstring
            os.close(fd)


def lock_path(sidecar: Path) -> Path:
    return sidecar.with_name(fit_name(sidecar.name, LOCK_MARK, head="."))


def claim(sidecar: Path) -> Claim | None:
    """Claim ``sidecar`` for this process; None when another process (or another job of this one) holds it.

    Raises SidecarError naming the folder when the lock file cannot be made there (read-only, no permission).
    """
    path = lock_path(sidecar)
    while True:
        try:
            if not path.parent.is_dir():  # a sidecar.dir mirror grows with the watched trees
                path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise SidecarError(f"{path.parent}: cannot write sidecars into this folder: {os_reason(exc)}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            own_like_folder(fd, path.parent)  # like the sidecar: a root service leaves no root-owned leftover
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:
            os.close(fd)
            raise SidecarError(f"{path}: cannot lock: {os_reason(exc)}") from exc
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        except OSError:
            os.close(fd)
            raise
        if same:
            return Claim(fd, path)
        os.close(fd)  # its holder removed it as we locked it: the claim is on a name no one else sees; again


def clear_leftover_lock(sidecar: Path) -> None:
    """Remove the lock file of a claim whose process was killed after writing ``sidecar`` but before removing it.

    Called for sidecars found up to date, which are never claimed again: only a claim can tell a leftover from a
    lock someone holds, so this claims and releases (a held lock is left alone). A stat when there is none.
    """
    if os.path.lexists(lock_path(sidecar)):
        with contextlib.suppress(SidecarError, OSError):
            if (c := claim(sidecar)) is not None:
                c.release()


def own_like_folder(fd: int, folder: Path) -> None:
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


def os_reason(exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    then = "its files are tried again, and nothing is sent for them until their sidecars can be written"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{reason} (free some space; {then})"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (
            f"{reason} (mmwatchd needs write access to the folder: fix its permissions, or set sidecar.dir to keep "
            f"sidecars in another folder; {then})"
        )
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
