"""The small persistent state of a long-running service: retry counters, recent errors, the done-index, what each
endpoint takes, and today's request count.

It lives in SQLite at ``<state dir>/state.sqlite3`` (see :func:`default_state_dir`). It is a cache, not a record:
sidecars say which files are done. So a database that fails its integrity check on open is moved aside and
replaced by an empty one; nothing is lost that the next scan cannot rebuild, except counters and history. A database
written by a newer mmwatchd is different: it is fine, just not for this binary, so opening it fails with a
StateError that says to upgrade, and the file is left alone.

Durability: WAL journal with ``synchronous=NORMAL``. A commit is in the WAL (the OS page cache) before it returns, so
a killed process (``kill -9``, OOM) loses nothing it committed; a power loss or kernel crash can roll back the last
transactions but never corrupts the file. Losing the newest retry increment means at most one extra retry, which is
not worth an fsync per finished file (``FULL``). When the filesystem cannot do WAL (no shared memory, some network
mounts), the rollback journal is used with ``FULL``, because ``NORMAL`` there can corrupt on power loss.

Threads: one connection (``check_same_thread=False``) behind a lock. SQLite allows one writer per database anyway,
so a connection per thread would only add lock waits between our own connections, plus connections that
:meth:`State.close` cannot reach. Every call is well under a millisecond next to a request of seconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Literal, NamedTuple, Self

from mmwatchd import __version__
from mmwatchd.errors import StateError, clip
from mmwatchd.log import get_logger

log = get_logger()

FILENAME = "state.sqlite3"
#: How many final errors :meth:`State.last_errors` can look back on.
ERROR_HISTORY = 200
#: Daily request counts older than this are dropped.
REQUEST_DAYS_KEPT = 90
#: How long a write waits for another process holding the database (a status command, a second daemon).
BUSY_TIMEOUT_S = 5.0
#: Stored messages are clipped to this many characters; error messages are one line, this only bounds a bad one.
MESSAGE_MAX = 2000

# Migrations by version number: MIGRATIONS[n - 1] turns a version n - 1 database into version n. Append only;
# never edit a released step. Paths are BLOBs of ``os.fsencode(path)``: file names may be any bytes.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE retry (
            path BLOB PRIMARY KEY,
            root TEXT,
            attempts INTEGER NOT NULL,
            kind TEXT NOT NULL,
            last_error TEXT NOT NULL,
            last_at REAL NOT NULL,
            retry_at REAL
        )""",
        """CREATE TABLE errors (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            path BLOB NOT NULL,
            root TEXT,
            kind TEXT NOT NULL,
            message TEXT NOT NULL,
            at REAL NOT NULL
        )""",
        """CREATE TABLE done_counts (
            root TEXT PRIMARY KEY,
            ok INTEGER NOT NULL DEFAULT 0,
            error INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE TABLE requests (day TEXT PRIMARY KEY, n INTEGER NOT NULL)",
    ),
    (
        # The done-index: which file version was answered under which rule fingerprint, so a rescan can skip
        # done files from a stat alone. A cache of the sidecars, which stay the truth (see mmwatchd.index).
        """CREATE TABLE done (
            path BLOB PRIMARY KEY,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            kind TEXT NOT NULL,
            fingerprint TEXT NOT NULL
        )""",
    ),
    (
        # Whether the answer was a description or an error sidecar, so `mmwatchd status` can count from the index.
        # NULL for entries made before: status reads their sidecars.
        "ALTER TABLE done ADD COLUMN status TEXT",
    ),
    (
        # A file version is size + mtime + inode + ctime. NULL for entries made before: they are
        # trusted on size and mtime as before, and take the file's inode and ctime the first time a walk finds them
        # so (State.adopt_identities), so no library is read or described again for the upgrade.
        "ALTER TABLE done ADD COLUMN ino INTEGER",
        "ALTER TABLE done ADD COLUMN ctime_ns INTEGER",
    ),
    (
        # What an endpoint (base URL and model) takes, asked for or learned (video.mode: auto; mmwatchd.servers).
        "CREATE TABLE endpoints (key TEXT PRIMARY KEY, capabilities TEXT NOT NULL, updated REAL NOT NULL)",
    ),
    (
        # Per-root tallies of finished files were written and never read: `mmwatchd status` counts from the folders
        # and the done-index instead.
        "DROP TABLE done_counts",
    ),
    (
        # Batch backfill (mmwatchd.backfill): each shard sent to a Batch API or exported for vllm run-batch / Ray,
        # and what each of its lines is for: the file, the version and hash its request was made from, and the
        # sidecar's record of the request (JSON), so an answer days later, in another process, is applied as the
        # online path would have, or not at all when the file changed.
        """CREATE TABLE batches (
            id TEXT PRIMARY KEY,
            mode TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            shard TEXT NOT NULL,
            requests INTEGER NOT NULL,
            bytes INTEGER NOT NULL,
            status TEXT NOT NULL,
            remote_id TEXT,
            input_file_id TEXT,
            output_file_id TEXT,
            error_file_id TEXT,
            message TEXT,
            created REAL NOT NULL,
            updated REAL NOT NULL
        )""",
        """CREATE TABLE batch_items (
            custom_id TEXT PRIMARY KEY,
            batch TEXT NOT NULL,
            path BLOB NOT NULL,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            ino INTEGER NOT NULL,
            ctime_ns INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            record TEXT NOT NULL
        )""",
        "CREATE INDEX batch_items_batch ON batch_items (batch)",
    ),
    (
        # Files a lower tier answered under a rule with redo_fallback: described again at its best tier, also after
        # a restart.
        "CREATE TABLE fallback (path BLOB PRIMARY KEY, rule TEXT NOT NULL, at REAL NOT NULL)",
    ),
    (
        # The service and scan look up each file's shard before they describe it (State.shard_of).
        "CREATE INDEX batch_items_path ON batch_items (path)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
#: Shard statuses that still hold files (their answers are to come, or are yet to be applied by ``mmwatchd
#: backfill``): those files are not batched again, and the online path leaves them to the backfill.
OPEN_SHARDS = ("written", "exported", "submitted", "validating", "in_progress", "finalizing", "cancelling",
               "completed", "failed", "expired", "cancelled")  # fmt: skip
#: A shard its backfill is still writing: each line is recorded as it is written, so the online path leaves the file
#: from then on. Its writer holds a lock on the shard file (:func:`shard_being_written`); once that is gone (the
#: backfill was killed) the shard holds nothing, and the next backfill drops it.
WRITING = "writing"
#: Shard statuses that hold their files: the open ones, and a shard being written (while its writer lives).
HOLDING_SHARDS = (*OPEN_SHARDS, WRITING)
#: Shard statuses that hold nothing any more: answered and applied, or given up before it was sent.
CLOSED_SHARDS = ("applied", "dropped")


def shard_being_written(row: BatchRow) -> bool:
    """``row`` (a :data:`WRITING` shard) is still being written: a live process holds the lock on its file. A file
    this process may not open (another user's export folder) is taken as being written: a file is left to the
    backfill rather than paid for twice, and that backfill, or the next, settles it."""
    try:
        fd = os.open(row.shard, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # and with it the shared lock, when it was taken
    return False


def abandoned(row: BatchRow) -> bool:
    """``row`` is a shard whose backfill was killed while writing it: incomplete, never sent, holding nothing."""
    return row.status == WRITING and not shard_being_written(row)


@dataclass(frozen=True, slots=True)
class RetryRow:
    """A file that failed transiently and will be tried again."""

    path: Path
    root: str | None
    attempts: int
    last_error: str
    retry_at: float | None
    kind: str
    last_at: float


class DoneRow(NamedTuple):
    """A file version that has its answer (see :meth:`State.done_index`).

    A named tuple rather than a frozen dataclass: a rescan reads 100,000 of them at once, and tuples are made in half
    the time (no ``object.__setattr__`` per field): 0.17 s instead of 0.34 s for 100,000."""

    size: int
    mtime_ns: int
    #: "image" or "video": the kind its rule was matched with.
    media_kind: str
    fingerprint: str
    #: "ok" or "error" (which sidecar the file has, as ``Outcome.answer``; stored in the ``status`` column); None for
    #: entries made by an older mmwatchd.
    answer: str | None = None
    #: Inode and ctime of the version answered; None for entries made by an older mmwatchd.
    ino: int | None = None
    ctime_ns: int | None = None

    @property
    def sha256(self) -> None:
        """The index keeps no hash (a row is settled by its version, see :func:`mmwatchd.done.is_done`)."""
        return None

    @property
    def size_and_mtime_only(self) -> bool:
        """Made before inodes and ctimes were kept: it vouches for size and mtime alone."""
        return self.ino is None and self.ctime_ns is None


@dataclass(frozen=True, slots=True)
class ErrorRow:
    """A file that failed for good (it got an error sidecar)."""

    path: Path
    root: str | None
    kind: str
    message: str
    at: float


@dataclass(frozen=True, slots=True)
class BatchRow:
    """One shard of a batch backfill (see :mod:`mmwatchd.backfill`)."""

    id: str
    #: "api" (sent to a Batch API) or "export" (written for vllm run-batch / Ray Data).
    mode: str
    endpoint: str
    shard: str
    requests: int
    bytes: int
    #: written, submitted (then the API's own: validating, in_progress, finalizing, ...), completed, applied,
    #: cancelling, cancelled, failed, expired.
    status: str
    remote_id: str | None
    input_file_id: str | None
    output_file_id: str | None
    error_file_id: str | None
    message: str | None
    created: float
    updated: float


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One line of a shard: which file, which version of it (size, mtime, inode, ctime, sha256) under which rule
    fingerprint, and ``record``: what applying its answer needs (:meth:`mmwatchd.pipeline.Prepared.record`)."""

    custom_id: str
    batch: str
    path: Path
    size: int
    mtime_ns: int
    ino: int
    ctime_ns: int
    sha256: str
    fingerprint: str
    record: dict[str, Any]


#: The system service's config folder and its ``StateDirectory=mmwatchd`` (see systemd/mmwatchd.service).
SYSTEM_CONFIG_DIR = Path("/etc/mmwatchd")
SYSTEM_STATE_DIR = Path("/var/lib/mmwatchd")


def default_state_dir(env: Mapping[str, str] = os.environ, *, config: Path | None = None) -> Path:
    """``$STATE_DIRECTORY`` (systemd's ``StateDirectory=``; the first of several); else, for a ``config`` in
    ``/etc/mmwatchd/``, the system service's ``/var/lib/mmwatchd``; else the ``config``'s folder when a state database
    is already there; else ``$XDG_STATE_HOME/mmwatchd``, else ``~/.local/state/mmwatchd``.

    The middle cases are ``mmwatchd status`` typed in a shell, which has no ``$STATE_DIRECTORY``: it must read the
    service's database rather than start an empty one. The system service's is ``/var/lib/mmwatchd``; systemd 252
    gives a user unit's ``StateDirectory=mmwatchd`` as ``~/.config/mmwatchd``, the folder of its config.
    """
    first = env.get("STATE_DIRECTORY", "").split(":")[0]
    if first:
        return Path(first)
    if config is not None:
        folder = Path(os.path.abspath(config)).parent
        if folder == SYSTEM_CONFIG_DIR:
            return SYSTEM_STATE_DIR
        if (folder / FILENAME).is_file():
            return folder
    xdg = env.get("XDG_STATE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec says relative values are invalid and must be ignored
        return Path(xdg) / "mmwatchd"
    home = env.get("HOME")
    return (Path(home) if home else Path.home()) / ".local" / "state" / "mmwatchd"


class _Unusable(Exception):
    """The file is not a database we can use; ``label`` names the moved-aside copy."""

    def __init__(self, label: str, reason: str) -> None:
        super().__init__(reason)
        self.label = label
        self.reason = reason


class State:
    """Persistent retry counters, error history and tallies. Thread-safe; every write is one transaction.

    ``clock`` gives wall-clock seconds (for ``at`` fields and the local date of the request counter); ``retry_at``
    values are stored as given, so callers should use wall-clock time there too, since they must survive restarts.
    """

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Created here, not by SQLite, so it is private from the start; SQLite gives -wal/-shm the same mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600))
        except OSError as exc:
            raise StateError(f"{self.path}: cannot create the state database: {exc.strerror or exc}") from exc
        try:
            self._conn = self._open()
        except _Unusable as exc:
            self._move_aside(exc)
            try:
                self._conn = self._open()
            except (_Unusable, sqlite3.Error) as again:
                raise StateError(f"{self.path}: cannot open a fresh state database: {again}") from again
        except sqlite3.Error as exc:
            raise StateError(
                f"{self.path}: cannot open the state database: {exc} (check the permissions of "
                f"{self.path.parent}, or set $STATE_DIRECTORY)"
            ) from exc

    # -- opening -----------------------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; _write/_read issue BEGIN/COMMIT themselves.
        # timeout= is SQLite's busy_timeout.
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous=" + ("NORMAL" if str(mode).lower() == "wal" else "FULL"))
            rows = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
            if rows != ["ok"]:
                raise _Unusable("corrupt", "; ".join(str(r) for r in rows[:3]))
            self._migrate(conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            if _is_corrupt(exc):
                raise _Unusable("corrupt", str(exc)) from exc
            raise
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        while True:
            with _transaction(conn):
                # Read inside the write transaction: two processes opening a new file migrate it once.
                version = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    # Not ours to reset: a newer mmwatchd (one that was rolled back, or that another user runs)
                    # still needs it. Refuse, and leave it untouched.
                    raise StateError(
                        f"{self.path}: written by a newer mmwatchd (state schema {version}; this one, "
                        f"{__version__}, knows up to {SCHEMA_VERSION}); it is left untouched. Upgrade mmwatchd, "
                        "or give this one another state directory (state_dir, or $STATE_DIRECTORY)"
                    )
                if version == SCHEMA_VERSION:
                    return
                for statement in MIGRATIONS[version]:
                    conn.execute(statement)
                conn.execute("DELETE FROM schema_version")
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version + 1,))

    def _move_aside(self, why: _Unusable) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(self.clock()))
        target = self.path.with_name(f"{self.path.name}.{why.label}-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.{why.label}-{stamp}-{n}")
        try:
            os.replace(self.path, target)
            # The journal belongs to the old file: left behind, SQLite would try to apply it to the new one.
            for suffix in ("-wal", "-journal"):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{self.path}{suffix}", f"{target}{suffix}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.path}-shm")  # only an index of the WAL; rebuilt on open
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600))
        except OSError as exc:
            raise StateError(f"{self.path}: unusable ({why.reason}) and cannot be moved aside: {exc}") from exc
        log.warning(
            "state.reset",
            path=str(self.path),
            moved_to=str(target),
            reason=why.reason,
            note="retry counters and error history start over; sidecars are unaffected",
        )

    # -- transactions ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                with _transaction(self._conn):
                    yield self._conn
            except sqlite3.Error as exc:
                raise StateError(f"{self.path}: cannot update the state database: {exc}") from exc

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                with _transaction(self._conn, "BEGIN"):  # one snapshot for multi-query reads
                    yield self._conn
            except sqlite3.Error as exc:
                raise StateError(f"{self.path}: cannot read the state database: {exc}") from exc

    # -- retries and outcomes ----------------------------------------------------------------------------------

    def record_attempt(self, path: Path, *, root: str | None, kind: str, message: str, retry_at: float | None) -> int:
        """Record a transient failure; return the file's attempt count so far (it survives restarts)."""
        key = os.fsencode(path)
        with self._write() as db:
            db.execute(
                """INSERT INTO retry (path, root, attempts, kind, last_error, last_at, retry_at)
                   VALUES (?, ?, 1, ?, ?, ?, ?)
                   ON CONFLICT (path) DO UPDATE SET
                     root = excluded.root, attempts = attempts + 1, kind = excluded.kind,
                     last_error = excluded.last_error, last_at = excluded.last_at, retry_at = excluded.retry_at""",
                (key, root, kind, clip(message, MESSAGE_MAX), self.clock(), retry_at),
            )
            n: int = db.execute("SELECT attempts FROM retry WHERE path = ?", (key,)).fetchone()[0]
        return n

    def attempts(self, path: Path) -> int:
        with self._read() as db:
            row = db.execute("SELECT attempts FROM retry WHERE path = ?", (os.fsencode(path),)).fetchone()
        return int(row[0]) if row else 0

    def record_done(
        self,
        path: Path,
        *,
        root: str | None,
        status: Literal["ok", "error"],
        message: str | None = None,
        kind: str = "error",
    ) -> None:
        """A file is finished: clear its retry state, and keep errors in the history."""
        if status not in ("ok", "error"):
            raise ValueError(f"status must be 'ok' or 'error', got {status!r}")
        key = os.fsencode(path)
        with self._write() as db:
            db.execute("DELETE FROM retry WHERE path = ?", (key,))
            if status == "error":
                db.execute(
                    "INSERT INTO errors (path, root, kind, message, at) VALUES (?, ?, ?, ?, ?)",
                    (key, root, kind, clip(message or "", MESSAGE_MAX), self.clock()),
                )
                db.execute(
                    "DELETE FROM errors WHERE id <= (SELECT id FROM errors ORDER BY id DESC LIMIT 1 OFFSET ?)",
                    (ERROR_HISTORY,),
                )

    def forget(self, path: Path, *, index: bool = True) -> None:
        """Drop a file's retry state, so a new file of that name starts with no attempts, and (``index``) its index
        entry: it was deleted or moved away. Its past errors stay. The daemon calls it when a job finds its file
        gone."""
        with self._write() as db:
            db.execute("DELETE FROM retry WHERE path = ?", (os.fsencode(path),))
            db.execute("DELETE FROM fallback WHERE path = ?", (os.fsencode(path),))
            if index:
                db.execute("DELETE FROM done WHERE path = ?", (os.fsencode(path),))

    def mark_done(
        self,
        path: Path,
        *,
        size: int,
        mtime_ns: int,
        media_kind: str,
        fingerprint: str,
        answer: Literal["ok", "error"],
        ino: int | None = None,
        ctime_ns: int | None = None,
    ) -> None:
        """Index a file version as answered (``answer``: an ok or an error sidecar) under ``fingerprint``."""
        with self._write() as db:
            db.execute(
                """INSERT OR REPLACE INTO done (path, size, mtime_ns, kind, fingerprint, status, ino, ctime_ns)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                (os.fsencode(path), size, mtime_ns, media_kind, fingerprint, answer, ino, ctime_ns),
            )

    def adopt_identities(self, found: Mapping[str, tuple[int, int]]) -> None:
        """Give index entries made before inodes and ctimes were kept the (inode, ctime) their file has now: a walk
        found it with the size and mtime the entry vouches for. From then on a rewrite that keeps both is seen."""
        with self._write() as db:
            db.executemany(
                "UPDATE done SET ino = ?, ctime_ns = ? WHERE path = ? AND ino IS NULL",
                ((ino, ctime, os.fsencode(p)) for p, (ino, ctime) in found.items()),
            )

    def set_answers(self, answers: Mapping[str, Literal["ok", "error"]]) -> None:
        """Fill in the answer of index entries made before the index kept it (read from their sidecars)."""
        with self._write() as db:
            db.executemany(
                "UPDATE done SET status = ? WHERE path = ?", ((a, os.fsencode(p)) for p, a in answers.items())
            )

    def forget_done(self, paths: Iterable[str]) -> None:
        """Drop index entries (files a complete scan no longer found: deleted, moved, or no longer watched)."""
        with self._write() as db:
            db.executemany("DELETE FROM done WHERE path = ?", ((os.fsencode(p),) for p in paths))

    def done_index(self) -> dict[str, DoneRow]:
        """Every indexed file by its path (as ``str``: a rescan looks up 100,000 of them), to compare against."""
        with self._read() as db:
            rows = db.execute(
                "SELECT path, size, mtime_ns, kind, fingerprint, status, ino, ctime_ns FROM done"
            ).fetchall()
        encoding = sys.getfilesystemencoding()  # os.fsdecode, without its per-call checks
        make = DoneRow._make
        return {row[0].decode(encoding, "surrogateescape"): make(row[1:]) for row in rows}

    def retrying(self) -> list[RetryRow]:
        """Files waiting to be retried, soonest first."""
        with self._read() as db:
            rows = db.execute(
                """SELECT path, root, attempts, last_error, retry_at, kind, last_at FROM retry
                   ORDER BY retry_at IS NULL, retry_at, path"""
            ).fetchall()
        return [RetryRow(_path(r[0]), r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows]

    def last_errors(self, limit: int = 10) -> list[ErrorRow]:
        """The newest final errors, newest first."""
        with self._read() as db:
            rows = db.execute(
                "SELECT path, root, kind, message, at FROM errors ORDER BY id DESC LIMIT ?", (max(0, limit),)
            ).fetchall()
        return [ErrorRow(_path(r[0]), r[1], r[2], r[3], r[4]) for r in rows]

    # -- batch backfill ----------------------------------------------------------------------------------------

    _BATCH_COLUMNS = (
        "id, mode, endpoint, shard, requests, bytes, status, remote_id, input_file_id, output_file_id, "
        "error_file_id, message, created, updated"
    )

    def add_batch(self, batch: BatchRow, items: Iterable[BatchItem]) -> None:
        """Record a shard and its lines, in one transaction: a shard is known with all its lines or not at all."""
        with self._write() as db:
            db.execute(
                f"INSERT INTO batches ({self._BATCH_COLUMNS}) VALUES ({', '.join('?' * 14)})",
                (batch.id, batch.mode, batch.endpoint, batch.shard, batch.requests, batch.bytes, batch.status,
                 batch.remote_id, batch.input_file_id, batch.output_file_id, batch.error_file_id, batch.message,
                 batch.created, batch.updated),
            )  # fmt: skip
            self._insert_items(db, batch.id, items)

    @staticmethod
    def _insert_items(db: sqlite3.Connection, batch_id: str, items: Iterable[BatchItem]) -> None:
        db.executemany(
            """INSERT INTO batch_items (custom_id, batch, path, size, mtime_ns, ino, ctime_ns, sha256, fingerprint,
               record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            ((i.custom_id, batch_id, os.fsencode(i.path), i.size, i.mtime_ns, i.ino, i.ctime_ns, i.sha256,
              i.fingerprint, json.dumps(i.record)) for i in items),
        )  # fmt: skip

    def add_batch_items(self, batch_id: str, items: Iterable[BatchItem]) -> None:
        """Record lines of a shard being written (:data:`WRITING`) as they are written."""
        with self._write() as db:
            self._insert_items(db, batch_id, items)

    def close_shard(self, batch_id: str, *, status: str, requests: int, nbytes: int) -> None:
        """A shard is complete: its size, and the status that lets it be sent (or run, exported)."""
        with self._write() as db:
            db.execute(
                "UPDATE batches SET status = ?, requests = ?, bytes = ?, updated = ? WHERE id = ?",
                (status, requests, nbytes, self.clock(), batch_id),
            )

    def drop_batch(self, batch_id: str) -> None:
        """Forget a shard and its lines altogether (one that was never complete)."""
        with self._write() as db:
            db.execute("DELETE FROM batch_items WHERE batch = ?", (batch_id,))
            db.execute("DELETE FROM batches WHERE id = ?", (batch_id,))

    _BATCH_FIELDS = frozenset({"status", "remote_id", "input_file_id", "output_file_id", "error_file_id", "message"})

    def update_batch(self, batch_id: str, **fields: str | None) -> None:
        """Set some of a shard's status, remote id, file ids and message."""
        unknown = set(fields) - self._BATCH_FIELDS
        if unknown:
            raise ValueError(f"not batch fields: {sorted(unknown)}")
        sets = ", ".join(f"{name} = ?" for name in fields)
        with self._write() as db:
            db.execute(
                f"UPDATE batches SET {sets}, updated = ? WHERE id = ?", (*fields.values(), self.clock(), batch_id)
            )

    def batch(self, batch_id: str) -> BatchRow | None:
        """One shard as it is recorded now; None once it is forgotten."""
        with self._read() as db:
            row = db.execute(f"SELECT {self._BATCH_COLUMNS} FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return None if row is None else BatchRow(*row)

    @contextlib.contextmanager
    def batch_lease(self, batch_id: str) -> Iterator[BatchRow | None]:
        """The shard ``batch_id`` as recorded now, while this process alone acts on it (sends it, collects and
        applies its answers, cancels it); None while another process does, or once it is forgotten.

        Two backfills at once (a cron job while a ``--batch`` still waits) would otherwise both upload a shard
        that is ``written`` (two batches, paid twice) or both download and apply a finished batch. The lease is an
        ``flock`` on a file of the shard's own under the state directory, so it goes with a killed process; the
        row is read once it is held, so what the last holder did is seen. The file is removed with the lease
        once the shard is closed (applied or dropped).
        """
        folder = self.path.parent / "batch-locks"
        lock = folder / f"{batch_id}.lock"
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateError(
                f"{lock}: cannot lock the shard {batch_id}: {exc.strerror or exc} (check the permissions of "
                f"{folder}: run backfill as the user the state directory belongs to)"
            ) from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
            try:
                yield self.batch(batch_id)
            finally:
                after = self.batch(batch_id)
                if after is None or after.status in CLOSED_SHARDS:
                    lock.unlink(missing_ok=True)  # one that opened it meanwhile reads the shard closed, as above
        finally:
            os.close(fd)  # and with it the lock

    def batches(self) -> list[BatchRow]:
        """Every shard, oldest first."""
        with self._read() as db:
            rows = db.execute(f"SELECT {self._BATCH_COLUMNS} FROM batches ORDER BY created, id").fetchall()
        return [BatchRow(*row) for row in rows]

    def batch_items(self, batch_id: str | None = None, *, custom_ids: Iterable[str] = ()) -> dict[str, BatchItem]:
        """A shard's lines by custom_id (``batch_id``), or the lines with these ``custom_ids`` from any shard."""
        query = (
            "SELECT custom_id, batch, path, size, mtime_ns, ino, ctime_ns, sha256, fingerprint, record FROM batch_items"
        )
        with self._read() as db:
            if batch_id is not None:
                rows = db.execute(f"{query} WHERE batch = ?", (batch_id,)).fetchall()
            else:
                rows = []
                wanted = list(custom_ids)
                for start in range(0, len(wanted), 500):
                    chunk = wanted[start : start + 500]
                    rows += db.execute(f"{query} WHERE custom_id IN ({', '.join('?' * len(chunk))})", chunk).fetchall()
        return {
            r[0]: BatchItem(r[0], r[1], _path(r[2]), r[3], r[4], r[5], r[6], r[7], r[8], json.loads(r[9])) for r in rows
        }

    def batched_paths(self, statuses: Iterable[str]) -> set[str]:
        """Paths with a line in a shard whose status is one of ``statuses`` (the ones still waiting for answers)."""
        wanted = list(statuses)
        with self._read() as db:
            rows = db.execute(
                f"""SELECT DISTINCT i.path FROM batch_items i JOIN batches b ON b.id = i.batch
                    WHERE b.status IN ({", ".join("?" * len(wanted))})""",
                wanted,
            ).fetchall()
        return {os.fsdecode(r[0]) for r in rows}

    def shard_of(self, path: Path) -> BatchRow | None:
        """The shard (:data:`HOLDING_SHARDS`, not :func:`abandoned`) that holds a line for ``path``; None when none
        does."""
        with self._read() as db:
            rows = db.execute(
                f"""SELECT {self._BATCH_COLUMNS} FROM batches
                    WHERE id IN (SELECT batch FROM batch_items WHERE path = ?)
                    AND status IN ({", ".join("?" * len(HOLDING_SHARDS))})
                    ORDER BY created""",
                (os.fsencode(path), *HOLDING_SHARDS),
            ).fetchall()
        shards = (BatchRow(*row) for row in rows)
        return next((row for row in shards if not abandoned(row)), None)

    def forget_batch_items(self, batch_id: str) -> None:
        """Drop a finished shard's lines (the shard's row stays, for ``backfill --status``)."""
        with self._write() as db:
            db.execute("DELETE FROM batch_items WHERE batch = ?", (batch_id,))

    # -- request counter ---------------------------------------------------------------------------------------

    def count_request(self, n: int = 1, *, endpoint: str | None = None) -> int:
        """Add ``n`` to today's request count (local date) and return the new total. A named endpoint of several
        has its own count, under ``<day>/<name>`` (which still sorts by day, so old days are pruned alike)."""
        today = self._today()
        key = today.isoformat() + (f"/{endpoint}" if endpoint else "")
        with self._write() as db:
            db.execute(
                "INSERT INTO requests (day, n) VALUES (?, ?) ON CONFLICT (day) DO UPDATE SET n = n + excluded.n",
                (key, n),
            )
            db.execute("DELETE FROM requests WHERE day < ?", ((today - timedelta(days=REQUEST_DAYS_KEPT)).isoformat(),))
            total: int = db.execute("SELECT n FROM requests WHERE day = ?", (key,)).fetchone()[0]
        return total

    def requests_today(self) -> int:
        with self._read() as db:
            today = self._today().isoformat()
            row = db.execute(  # every endpoint's count (see count_request)
                "SELECT SUM(n) FROM requests WHERE day = ? OR day LIKE ?", (today, today + "/%")
            ).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def _today(self) -> date:
        return date(*time.localtime(self.clock())[:3])

    # -- endpoint capabilities -------------------------------------------------------------------------------

    def endpoint_capabilities(self, key: str) -> dict[str, Any] | None:
        """What was learned about an endpoint (``mmwatchd.servers.Capabilities`` as JSON), or None."""
        with self._read() as db:
            row = db.execute("SELECT capabilities FROM endpoints WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            data = json.loads(row[0])
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def remember_fallback(self, path: Path, rule: str) -> None:
        """A lower tier than its rule's best answered ``path``, and the rule has ``redo_fallback``: it is to be
        described again once that tier has room (see :meth:`fallbacks`)."""
        with self._write() as db:
            db.execute(
                "INSERT INTO fallback (path, rule, at) VALUES (?, ?, ?) "
                "ON CONFLICT (path) DO UPDATE SET rule = excluded.rule, at = excluded.at",
                (os.fsencode(path), rule, self.clock()),
            )

    def forget_fallback(self, path: Path) -> None:
        """``path`` got its answer from its rule's best tier (or no longer wants one)."""
        with self._write() as db:
            db.execute("DELETE FROM fallback WHERE path = ?", (os.fsencode(path),))

    def fallbacks(self) -> list[tuple[Path, str]]:
        """The files a fallback tier answered that are still to be described again, oldest first, with their rule."""
        with self._read() as db:
            rows = db.execute("SELECT path, rule FROM fallback ORDER BY at").fetchall()
        return [(Path(os.fsdecode(path)), rule) for path, rule in rows]

    def remember_endpoint(self, key: str, capabilities: dict[str, Any]) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO endpoints (key, capabilities, updated) VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE "
                "SET capabilities = excluded.capabilities, updated = excluded.updated",
                (key, json.dumps(capabilities, sort_keys=True), self.clock()),
            )

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the database (idempotent). Later calls raise StateError."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
    """One transaction. ``BEGIN IMMEDIATE`` takes the write lock up front, so a writer waits (busy timeout) at the
    start instead of failing at its first write when another process wrote in between."""
    conn.execute(begin)
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    """Corrupt or not a database at all, as opposed to locked, read-only or out of space."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _path(blob: bytes) -> Path:
    return Path(os.fsdecode(blob))
