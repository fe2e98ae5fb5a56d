"""``mmwatchd search``: find files by what their descriptions say, from an SQLite FTS5 index of the sidecars.

The index lives in ``<state dir>/search.sqlite3``, its own file beside ``state.sqlite3``. It is a cache of the
sidecars, which stay the truth: before each query :meth:`SearchIndex.refresh` walks the watched folders (or the
``sidecar.dir`` mirror), compares every sidecar's size and mtime with what the index recorded, reads the new and
changed ones and drops those that are gone. A missing index is therefore simply built by the first search, and
``--reindex`` empties it first. :meth:`SearchIndex.index_sidecar` takes one freshly written sidecar, so a writer can
keep the index current as it goes.

Three columns are searched, weighted in that order by bm25: the caption (the reply's text, or the caption-like fields
of a schema reply), the tags (every other string of a schema reply) and the media path. Words are stemmed (Porter):
``dogs`` finds ``dog``.

Concurrency: WAL, a busy timeout, and writes in short transactions of at most :data:`BATCH` sidecars, so a daemon
writing into the index and a search refreshing it wait for each other for milliseconds, not for a whole rebuild.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmwatchd.errors import StateError
from mmwatchd.model import Config
from mmwatchd.sidecar import TEMP_MARK, is_ours

FILENAME = "search.sqlite3"
#: Bumped when the tables or what goes into them change; an index of another version is rebuilt.
SCHEMA = 1
#: Sidecars written per transaction while refreshing.
BATCH = 500
BUSY_TIMEOUT_S = 5.0
#: bm25 column weights: caption, tags, path.
WEIGHTS = (10.0, 5.0, 1.0)
#: Keys of a schema reply whose strings count as the caption; every other string counts as a tag.
CAPTION_KEYS = frozenset({"caption", "description", "summary", "title", "text", "alt", "alt_text", "scene"})
#: Marks around matched words in snippets (replaced by the caller: brackets, or bold on a terminal).
MARK_START, MARK_END = "\x02", "\x03"
_SIDECAR_MAX_BYTES = 64 << 20

_TABLES = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # One row per sidecar seen, ours or not (a foreign .json is recorded so it is not read again until it changes);
    # only ours have a row in fts, under the same rowid. Paths are BLOBs of os.fsencode(path).
    """CREATE TABLE docs (
        id INTEGER PRIMARY KEY,
        sidecar BLOB NOT NULL UNIQUE,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        media BLOB,
        status TEXT,
        rule TEXT,
        model TEXT,
        taken TEXT,
        error TEXT
    )""",
    "CREATE VIRTUAL TABLE fts USING fts5(caption, tags, path, tokenize = 'porter unicode61 remove_diacritics 2')",
)


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result. ``snippet`` marks matched words with :data:`MARK_START`/:data:`MARK_END`."""

    path: str
    sidecar: str
    status: str | None
    rule: str | None
    model: str | None
    taken: str | None
    snippet: str
    score: float

    def as_json(self, start: str = "[", end: str = "]") -> dict[str, Any]:
        return {"path": self.path, "sidecar": self.sidecar, "status": self.status, "rule": self.rule,
                "model": self.model, "taken": self.taken, "snippet": marked(self.snippet, start, end),
                "score": round(self.score, 4)}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Refreshed:
    """What a refresh changed, and the folders it could not read (their entries were kept)."""

    added: int = 0
    updated: int = 0
    removed: int = 0
    unreadable: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Scope:
    """Where sidecars are looked for: ``folders`` to walk, the sidecar ``suffix``, and the ``mirror`` (sidecar.dir)
    from which media paths are derived, when sidecars are not beside their files."""

    folders: tuple[Path, ...]
    suffix: str
    mirror: Path | None

    @classmethod
    def of(cls, cfg: Config) -> Scope:
        if cfg.sidecar.dir is not None:
            return cls((cfg.sidecar.dir,), cfg.sidecar.suffix, cfg.sidecar.dir)
        return cls(tuple(root.path for root in cfg.watch), cfg.sidecar.suffix, None)


def index_path(cfg: Config) -> Path:
    """``<state dir>/search.sqlite3``, with the state directory found the way ``mmwatchd status`` finds it."""
    from mmwatchd.state import default_state_dir

    return (cfg.state_dir or default_state_dir(config=cfg.source)) / FILENAME


# ----------------------------------------------------------------------------------------------------- documents


def caption_and_tags(doc: Mapping[str, Any]) -> tuple[str, list[str]]:
    """The caption and the tags of a sidecar: the reply's text, or for a schema reply (``response.data``) its
    caption-like fields (:data:`CAPTION_KEYS`) as the caption and every other string, at any depth, as a tag."""
    response = doc.get("response")
    if not isinstance(response, Mapping):
        return "", []
    data = response.get("data")
    if data is None:
        text = response.get("text")
        return (text if isinstance(text, str) else ""), []
    captions: list[str] = []
    tags: list[str] = []
    _strings(data, captions, tags, caption=isinstance(data, str))  # a schema of one string: that is the caption
    return "\n".join(captions), tags


def _strings(value: object, captions: list[str], tags: list[str], *, caption: bool) -> None:
    if isinstance(value, str):
        if value.strip():
            (captions if caption else tags).append(value.strip())
    elif isinstance(value, Mapping):
        for key, sub in value.items():
            _strings(sub, captions, tags, caption=isinstance(key, str) and key.lower() in CAPTION_KEYS)
    elif isinstance(value, list):
        for sub in value:
            _strings(sub, captions, tags, caption=False)


def media_path(sidecar: Path, doc: Mapping[str, Any], *, suffix: str, mirror: Path | None) -> Path:
    """The media file a sidecar describes. Its name is ``source.name`` (a name too long for the suffix is shortened
    in the sidecar's own name); its folder is the sidecar's, or under a mirror the same path without the mirror."""
    raw = _media_of(os.fsencode(sidecar), doc, os.fsencode(suffix), None if mirror is None else os.fsencode(mirror))
    return Path(os.fsdecode(raw))


def _media_of(sidecar: bytes, doc: Mapping[str, Any], suffix: bytes, mirror: bytes | None) -> bytes:
    """:func:`media_path` on bytes (this runs for every sidecar of a rebuild)."""
    folder, own = os.path.split(sidecar)
    source = doc.get("source")
    name = source.get("name") if isinstance(source, Mapping) else None
    if isinstance(name, str) and name and "/" not in name:
        base = os.fsencode(name)
    else:
        base = own[: -len(suffix)] if own.endswith(suffix) else own
    if mirror is not None:
        mirror = mirror.rstrip(b"/")
        if folder == mirror:
            folder = b"/"
        elif folder.startswith(mirror + b"/"):
            folder = folder[len(mirror) :]
    return os.path.join(folder, base)


def _text(s: str) -> str:
    """Valid Unicode for SQLite TEXT: a file name that is not UTF-8 arrives with lone surrogates."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _display(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------------------- query


#: Words that say little in a query and would make "dog on a beach" miss "a dog running along the beach".
STOPWORDS = frozenset(
    "a an the on in at of to for by with from into onto and or is are was were be it its this that some".split()
)
_TOKEN = re.compile(r"[^\W_]", re.UNICODE)
_CHUNK = re.compile(r'"([^"]*)"|(\S+)')


def fts_query(text: str, *, any_word: bool = False) -> str | None:
    """The user's words as an FTS5 query in which nothing is syntax: every word, and every ``"quoted phrase"``,
    becomes a quoted FTS5 string (``-``, ``:``, ``*``, ``NEAR``, ``AND`` are plain text there). All must match, or
    with ``any_word`` any. Little words (:data:`STOPWORDS`) are left out unless quoted or alone, so that "dog on a
    beach" finds "A dog runs along the beach". None when there is nothing to search for."""
    parts: list[str] = []
    small: list[str] = []
    for m in _CHUNK.finditer(text):
        chunk = m[1] if m[1] is not None else m[2]
        if _TOKEN.search(chunk):
            quoted = '"' + chunk.replace('"', '""') + '"'
            (small if m[2] is not None and chunk.lower() in STOPWORDS else parts).append(quoted)
    parts = parts or small  # "the who" still searches for something
    if not parts:
        return None
    return (" OR " if any_word else " ").join(parts)


def marked(snippet: str, start: str, end: str) -> str:
    return snippet.replace(MARK_START, start).replace(MARK_END, end)


# ---------------------------------------------------------------------------------------------------------- index


class SearchIndex:
    """The FTS5 index at ``path``. Thread-safe (one connection behind a lock, like :class:`mmwatchd.state.State`).

    A file that is not a usable index (corrupt, another schema) is replaced by an empty one: everything in it can
    be read again from the sidecars.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600))
        except OSError as exc:
            raise StateError(f"{self.path}: cannot create the search index: {exc.strerror or exc} (check the "
                             "permissions of its folder, or set state_dir)") from exc  # fmt: skip
        try:
            self._conn = self._open()
        except sqlite3.DatabaseError as exc:
            if not _is_corrupt(exc):  # locked by a long writer, read-only, full, no FTS5: the index is not at fault
                raise StateError(f"{self.path}: cannot open the search index: {exc}") from exc
            self._discard()
            try:
                self._conn = self._open()
            except sqlite3.Error as again:
                raise StateError(f"{self.path}: cannot open a fresh search index: {again}") from again

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous=" + ("NORMAL" if str(mode).lower() == "wal" else "FULL"))
            with _transaction(conn):
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if "meta" in tables:
                    row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
                    if row is not None and row[0] == str(SCHEMA):
                        return conn
                for name in ("fts", "docs", "meta"):  # another version's tables: start over
                    if name in tables:
                        conn.execute(f"DROP TABLE {name}")
                for statement in _TABLES:
                    conn.execute(statement)
                conn.execute("INSERT INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA),))
        except BaseException:
            conn.close()
            raise
        return conn

    def _discard(self) -> None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.path}{suffix}")
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600))

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> SearchIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                with _transaction(self._conn):
                    yield self._conn
            except sqlite3.Error as exc:
                why = f"{exc}{_advice(exc, self.path)}"
                raise StateError(f"{self.path}: cannot update the search index: {why}") from exc

    # -- writing ---------------------------------------------------------------------------------------------

    def index_sidecar(self, path: Path, doc: Mapping[str, Any], *, suffix: str = ".json",
                      mirror: Path | None = None) -> None:  # fmt: skip
        """Record the sidecar just written at ``path`` (its content ``doc``), so searches find it at once.

        Meant for the writer, right after :func:`mmwatchd.sidecar.write`; a search would otherwise pick it up at its
        next refresh. Raises :class:`StateError` when the index cannot be written (busy for longer than the busy
        timeout, disk full): the sidecar is written either way, and the next search reads it.
        """
        st = os.stat(path)
        entry = _entry(os.fsencode(path), st.st_size, st.st_mtime_ns, doc if is_ours(doc) else None,
                       os.fsencode(suffix), None if mirror is None else os.fsencode(mirror))  # fmt: skip
        with self._write() as conn:
            _insert(conn, [entry])

    def clear(self) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM fts")
            conn.execute("DELETE FROM docs")

    def refresh(self, scope: Scope) -> Refreshed:
        """Bring the index up to date with the sidecars in ``scope`` (see the module docstring)."""
        with self._lock:
            known = {row[0]: (row[1], row[2]) for row in self._conn.execute("SELECT sidecar, size, mtime_ns FROM docs")}
        unreadable: list[tuple[str, str]] = []
        seen: set[bytes] = set()
        todo: list[tuple[bytes, int, int]] = []
        for folder in scope.folders:
            for raw, size, mtime_ns in _walk(os.fsencode(folder), os.fsencode(scope.suffix), unreadable):
                if raw in seen:
                    continue
                seen.add(raw)
                if known.get(raw) != (size, mtime_ns):
                    todo.append((raw, size, mtime_ns))
        inside = tuple(os.path.join(os.fsencode(f), b"") for f in scope.folders)
        failed = tuple(os.path.join(os.fsencode(d), b"") for d, _ in unreadable)
        gone = []
        for raw in known.keys() - seen:
            if raw.startswith(failed):
                continue  # its folder could not be listed this time: keep what we know
            if raw.startswith(inside):
                gone.append(raw)
                continue
            # Outside the folders walked (a sidecar of ``mmwatchd once`` elsewhere, recorded by its writer): looked
            # at on its own.
            try:
                st = os.stat(raw)
            except OSError:
                gone.append(raw)
                continue
            if known[raw] != (st.st_size, st.st_mtime_ns):
                todo.append((raw, st.st_size, st.st_mtime_ns))
        for start in range(0, len(gone), BATCH):
            with self._write() as conn:
                _delete(conn, gone[start : start + BATCH])
        suffix = os.fsencode(scope.suffix)
        mirror = None if scope.mirror is None else os.fsencode(scope.mirror)
        for start in range(0, len(todo), BATCH):
            # Read and parse outside the transaction; the writer waits only for the inserts.
            batch = [_entry(raw, size, mtime, _load(raw), suffix, mirror)
                     for raw, size, mtime in todo[start : start + BATCH]]  # fmt: skip
            with self._write() as conn:
                _insert(conn, batch)
        updated = sum(1 for raw, _, _ in todo if raw in known)
        added = len(todo) - updated
        return Refreshed(added=added, updated=updated, removed=len(gone), unreadable=tuple(unreadable))

    # -- reading ---------------------------------------------------------------------------------------------

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM fts").fetchone()[0])

    def search(self, text: str, *, limit: int = 20, any_word: bool = False) -> list[Hit]:
        """The best ``limit`` matches for ``text`` (see :func:`fts_query`), best first."""
        query = fts_query(text, any_word=any_word)
        if query is None:
            return []
        sql = f"""
            SELECT d.media, d.sidecar, d.status, d.rule, d.model, d.taken,
                   snippet(fts, -1, ?, ?, '…', 16), bm25(fts, {", ".join(map(str, WEIGHTS))}) AS score
            FROM fts JOIN docs d ON d.id = fts.rowid
            WHERE fts MATCH ? ORDER BY score LIMIT ?"""
        with self._lock:
            try:
                rows = self._conn.execute(sql, (MARK_START, MARK_END, query, limit)).fetchall()
            except sqlite3.Error as exc:
                raise StateError(f"{self.path}: cannot search the index: {exc}{_advice(exc, self.path)}") from exc
        return [
            Hit(path=_display(media), sidecar=_display(side), status=status, rule=rule, model=model, taken=taken,
                snippet=snippet or "", score=-score)
            for media, side, status, rule, model, taken, snippet, score in rows
        ]  # fmt: skip


def _is_corrupt(exc: sqlite3.Error) -> bool:
    """Corrupt or not a database at all, as opposed to locked, read-only or out of space."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _advice(exc: sqlite3.Error, path: Path) -> str:
    if _is_corrupt(exc):
        return f" (the index is damaged: delete {path}; the next search builds it again from the sidecars)"
    return ""


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _walk(folder: bytes, suffix: bytes, unreadable: list[tuple[str, str]]) -> Iterator[tuple[bytes, int, int]]:
    """(path, size, mtime_ns) of every sidecar under ``folder``; hidden folders and symlinks are not followed,
    our own temp files are skipped. Folders that cannot be listed are added to ``unreadable``."""
    suffix = suffix.lower()
    temp = os.fsencode(TEMP_MARK)
    stack = [folder]
    while stack:
        here = stack.pop()
        try:
            with os.scandir(here) as it:
                entries = list(it)
        except FileNotFoundError:
            continue
        except OSError as exc:
            unreadable.append((os.fsdecode(here), exc.strerror or str(exc)))
            continue
        for entry in entries:
            name = entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    if not name.startswith(b"."):
                        stack.append(entry.path)
                elif name.lower().endswith(suffix) and temp not in name and entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    yield entry.path, st.st_size, st.st_mtime_ns
            except OSError:  # vanished between listing and looking
                continue


def _load(raw: bytes) -> dict[str, Any] | None:
    """The sidecar at ``raw`` when it is one of ours, else None (foreign, unreadable, not JSON)."""
    try:
        with open(raw, "rb") as fh:
            doc = json.loads(fh.read(_SIDECAR_MAX_BYTES))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return doc if is_ours(doc) else None


def _delete(conn: sqlite3.Connection, sidecars: list[bytes]) -> None:
    ids = [(row[0],) for raw in sidecars for row in conn.execute("SELECT id FROM docs WHERE sidecar = ?", (raw,))]
    conn.executemany("DELETE FROM fts WHERE rowid = ?", ids)
    conn.executemany("DELETE FROM docs WHERE id = ?", ids)


_Entry = tuple[tuple[Any, ...], tuple[str, str, str] | None]


def _entry(raw: bytes, size: int, mtime_ns: int, doc: Mapping[str, Any] | None, suffix: bytes,
           mirror: bytes | None) -> _Entry:  # fmt: skip
    """The docs row (without its id) and the fts columns for one sidecar; ``doc`` None: a file that is not ours,
    recorded (so it is not read again until it changes) but not searchable."""
    if doc is None:
        return (raw, size, mtime_ns, None, None, None, None, None, None), None
    media = _media_of(raw, doc, suffix, mirror)
    caption, tags = caption_and_tags(doc)
    error = doc.get("error")
    media_doc = doc.get("media")
    taken = media_doc.get("taken") if isinstance(media_doc, Mapping) else None
    row = (raw, size, mtime_ns, media, _str(doc.get("status")), _str(doc.get("rule")), _str(doc.get("model")),
           _str(taken), _str(error.get("message")) if isinstance(error, Mapping) else None)  # fmt: skip
    return row, (_text(caption), _text("\n".join(tags)), media.decode("utf-8", "replace"))


def _insert(conn: sqlite3.Connection, entries: list[_Entry]) -> None:
    """Insert or replace the entries (one transaction), numbering new rows here so both tables take them in one
    ``executemany`` each."""
    _delete(conn, [row[0] for row, _ in entries])
    first = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM docs").fetchone()[0]
    conn.executemany(
        "INSERT INTO docs (id, sidecar, size, mtime_ns, media, status, rule, model, taken, error)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(first + i, *row) for i, (row, _) in enumerate(entries)],
    )
    conn.executemany(
        "INSERT INTO fts (rowid, caption, tags, path) VALUES (?, ?, ?, ?)",
        [(first + i, *cols) for i, (_, cols) in enumerate(entries) if cols is not None],
    )


def _str(value: object) -> str | None:
    return _text(value) if isinstance(value, str) and value else None


def search(cfg: Config, text: str, *, limit: int = 20, reindex: bool = False) -> tuple[list[Hit], bool, Refreshed]:
    """Refresh the index of ``cfg``'s sidecars (from scratch with ``reindex``) and search it.

    Returns the hits, whether they match every word (False: no file matched all of them, these match some), and
    what the refresh did.
    """
    with SearchIndex(index_path(cfg)) as index:
        if reindex:
            index.clear()
        refreshed = index.refresh(Scope.of(cfg))
        hits = index.search(text, limit=limit)
        every = True
        if not hits and len(_words(text)) > 1:
            hits, every = index.search(text, limit=limit, any_word=True), False
    return hits, every, refreshed


def _words(text: str) -> list[str]:
    query = fts_query(text)
    return [m[0] for m in _CHUNK.finditer(query)] if query else []


#: Control characters a caption or file name must not send to a terminal (escape sequences); not our marks.
_CONTROL = re.compile(r"[\x00\x01\x04-\x1f\x7f-\x9f]")


def render(hits: Iterable[Hit], *, tty: bool) -> str:
    """Hits for a person: the path, then the snippet; matched words in bold on a terminal, else in [brackets]."""
    start, end = ("\x1b[1m", "\x1b[0m") if tty else ("[", "]")
    lines = []
    for hit in hits:
        facts = ", ".join(x for x in (hit.status, hit.rule, hit.taken) if x)
        lines.append(_CONTROL.sub("?", hit.path) + (f"  ({_CONTROL.sub('?', facts)})" if facts else ""))
        snippet = " ".join(_CONTROL.sub(" ", hit.snippet).split())
        if snippet:
            lines.append(f"    {marked(snippet, start, end)}")
    return "\n".join(lines)
