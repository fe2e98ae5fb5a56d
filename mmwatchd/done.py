"""Is this file done? The one answer to it, for the pipeline, the done-index, ``status`` and the gallery.

A file is done when a record of its answer (its JSON sidecar, or the done-index row that caches it) was made for the
version of the file that is there now, under the rule fingerprint that applies now. Each caller brings what it can
afford to look at: the pipeline the full version and a way to hash the file; ``status`` and the gallery a ``stat``
and no hash (they never read a file through); the done-index a ``stat`` and its row.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

#: What a file's record says it got: a description, or an error sidecar (a file that failed for good).
Answer = Literal["ok", "error"]


@dataclass(frozen=True, slots=True, kw_only=True)
class FileVersion:
    """A file version: size, mtime, inode and ctime. A rewrite that keeps the size and puts the mtime back still
    changes the ctime (only the kernel sets it), and a file replaced by another gets another inode."""

    size: int
    mtime_ns: int
    ino: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileVersion:
        return cls(size=st.st_size, mtime_ns=st.st_mtime_ns, ino=st.st_ino, ctime_ns=st.st_ctime_ns)

    @property
    def version(self) -> tuple[int, int]:
        return (self.size, self.mtime_ns)

    @property
    def identity(self) -> tuple[int, int, int, int]:
        return (self.size, self.mtime_ns, self.ino, self.ctime_ns)


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    """What a sidecar says was answered, for which file version and under which fingerprint (a done-index row,
    :class:`~mmwatchd.state.DoneRow`, is a :class:`Recorded` itself)."""

    answer: Answer | None
    fingerprint: str | None
    size: object
    mtime_ns: object
    ino: object = None
    ctime_ns: object = None
    sha256: object = None
    #: Vouches for size and mtime alone, as a done-index row made before inodes and ctimes were kept does (it has no
    #: hash to settle the rest); a sidecar has its hash for that.
    size_and_mtime_only: bool = False

    @classmethod
    def of_sidecar(cls, doc: Mapping[str, Any]) -> Record:
        src = doc.get("source") or {}
        return cls(
            answer="error" if doc.get("status") == "error" else "ok",
            fingerprint=doc.get("fingerprint"),
            size=src.get("size"),
            mtime_ns=src.get("mtime_ns"),
            ino=src.get("inode"),
            ctime_ns=src.get("ctime_ns"),
            sha256=src.get("sha256"),
        )


class Recorded(Protocol):
    """What :func:`is_done` reads of a record: a :class:`Record`, or a done-index row as it is (a rescan asks for
    100,000 of them, and makes no Record for each)."""

    @property
    def fingerprint(self) -> str | None: ...
    @property
    def size(self) -> object: ...
    @property
    def mtime_ns(self) -> object: ...
    @property
    def ino(self) -> object: ...
    @property
    def ctime_ns(self) -> object: ...
    @property
    def sha256(self) -> object: ...
    @property
    def size_and_mtime_only(self) -> bool: ...


def is_done(
    record: Recorded | None,
    now: FileVersion | os.stat_result,
    fingerprint: str | None,
    *,
    exact: bool,
    sha256: Callable[[], str] | None = None,
) -> bool:
    """Whether ``record`` answers the file as it is ``now`` under ``fingerprint`` (None: under any rule; the
    gallery shows a description whatever rule wrote it). Error records count too: a file that failed for good is not
    tried again until it or its rule changes.

    ``exact``: the inode and ctime must match as well (the pipeline and the done-index); without it size and mtime
    decide (``status`` and the gallery, which never hash). Same size with anything else differing (a copy, a move,
    ``touch``) is settled by the content hash when ``sha256`` is given, computed only then; a sidecar written before
    inodes and ctimes were recorded is settled so once (a read, never a request).
    """
    if record is None or (fingerprint is not None and record.fingerprint != fingerprint):
        return False
    if isinstance(now, FileVersion):
        size, mtime_ns, ino, ctime_ns = now.identity
    else:  # a stat: no FileVersion made for it (the done-index asks this for every file of a rescan)
        size, mtime_ns, ino, ctime_ns = now.st_size, now.st_mtime_ns, now.st_ino, now.st_ctime_ns
    if record.size != size:
        return False
    same = record.mtime_ns == mtime_ns
    if exact and not record.size_and_mtime_only:
        same = same and record.ino == ino and record.ctime_ns == ctime_ns
    if same:
        return True
    return sha256 is not None and bool(record.sha256) and record.sha256 == sha256()
