from __future__ import annotations

import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from mmwatchd import state
from mmwatchd.state import ErrorRow, State, StateError, default_state_dir

REPO = Path(__file__).resolve().parents[1]
#: A fixed wall clock, so the daily counter cannot roll over while a test runs.
NOON = datetime(2025, 3, 1, 12, 0, 0).timestamp()


class Clock:
    def __init__(self, now: float = NOON) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.sqlite3"


def attempt(st: State, path: Path | str, *, root: str | None = "photos", message: str = "timeout") -> int:
    return st.record_attempt(Path(path), root=root, kind="unavailable", message=message, retry_at=NOON + 60)


def quick_check(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("PRAGMA quick_check")]
    finally:
        conn.close()


class TestDefaultStateDir:
    def test_systemd_state_directory_first_of_several(self) -> None:
        env = {"STATE_DIRECTORY": "/var/lib/mmwatchd:/var/lib/other", "XDG_STATE_HOME": "/x", "HOME": "/h"}
        assert default_state_dir(env) == Path("/var/lib/mmwatchd")

    def test_xdg_state_home(self) -> None:
        assert default_state_dir({"XDG_STATE_HOME": "/x/state", "HOME": "/h"}) == Path("/x/state/mmwatchd")

    def test_relative_xdg_is_ignored(self) -> None:
        assert default_state_dir({"XDG_STATE_HOME": "rel", "HOME": "/h"}) == Path("/h/.local/state/mmwatchd")

    def test_home(self) -> None:
        assert default_state_dir({"HOME": "/h"}) == Path("/h/.local/state/mmwatchd")
        assert default_state_dir({"STATE_DIRECTORY": "", "HOME": "/h"}) == Path("/h/.local/state/mmwatchd")


class TestOpen:
    def test_creates_private_dir_and_file_in_wal_mode(self, db: Path) -> None:
        with State(db, clock=Clock()):
            pass
        assert stat.S_IMODE(db.parent.stat().st_mode) & 0o077 == 0
        assert stat.S_IMODE(db.stat().st_mode) == 0o600
        conn = sqlite3.connect(db)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("SELECT version FROM schema_version").fetchall() == [(state.SCHEMA_VERSION,)]
        finally:
            conn.close()

    def test_reopen_keeps_schema_version_single(self, db: Path) -> None:
        for _ in range(3):
            State(db, clock=Clock()).close()
        conn = sqlite3.connect(db)
        try:
            assert conn.execute("SELECT version FROM schema_version").fetchall() == [(state.SCHEMA_VERSION,)]
        finally:
            conn.close()

    def test_garbage_file_is_moved_aside_and_a_fresh_db_works(self, db: Path) -> None:
        db.parent.mkdir()
        garbage = random.Random(1).randbytes(8192)
        db.write_bytes(garbage)
        with capture_logs() as logs:
            st = State(db, clock=Clock())
        with st:
            assert attempt(st, "/p/a.jpg") == 1
            assert st.attempts(Path("/p/a.jpg")) == 1
        aside = [p for p in db.parent.iterdir() if ".corrupt-" in p.name]
        assert len(aside) == 1 and aside[0].name.startswith("state.sqlite3.corrupt-")
        assert aside[0].read_bytes() == garbage
        assert [e["event"] for e in logs] == ["state.reset"]
        assert logs[0]["log_level"] == "warning" and logs[0]["moved_to"] == str(aside[0])
        assert quick_check(db) == ["ok"]

    def test_damaged_pages_are_detected(self, db: Path) -> None:
        with State(db, clock=Clock()) as st:
            for i in range(1500):
                attempt(st, f"/p/{i:05d}-{'x' * 40}.jpg", message="m" * 100)
        data = bytearray(db.read_bytes())
        assert len(data) > 4096 * 8
        data[4096 * 2 : 4096 * 6] = random.Random(2).randbytes(4096 * 4)
        db.write_bytes(bytes(data))
        with capture_logs() as logs, State(db, clock=Clock()) as st:
            assert st.retrying() == []
        assert [e["event"] for e in logs] == ["state.reset"]
        assert any(".corrupt-" in p.name for p in db.parent.iterdir())

    def test_a_version_2_database_is_migrated_and_keeps_its_index(self, db: Path) -> None:
        db.parent.mkdir()
        conn = sqlite3.connect(db)
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (2)")
        for statement in (*state.MIGRATIONS[0], *state.MIGRATIONS[1]):
            conn.execute(statement)
        conn.execute("INSERT INTO done VALUES (?, 10, 20, 'image', 'fp1')", (b"/p/old.jpg",))
        conn.commit()
        conn.close()
        with State(db, clock=Clock()) as st:
            st.mark_done(Path("/p/new.jpg"), size=1, mtime_ns=2, media_kind="image", fingerprint="fp2", answer="error")
            assert st.done_index() == {
                "/p/old.jpg": state.DoneRow(10, 20, "image", "fp1", None),  # answer unknown: status reads its sidecar
                "/p/new.jpg": state.DoneRow(1, 2, "image", "fp2", "error"),
            }

    def test_index_entries_without_inode_and_ctime_are_kept_and_adopt_them_once(self, db: Path) -> None:
        db.parent.mkdir()
        conn = sqlite3.connect(db)
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (3)")
        for statement in (step for steps in state.MIGRATIONS[:3] for step in steps):
            conn.execute(statement)
        conn.execute("INSERT INTO done VALUES (?, 10, 20, 'image', 'fp1', 'ok')", (b"/p/old.jpg",))
        conn.commit()
        conn.close()
        with State(db, clock=Clock()) as st:
            assert st.done_index() == {"/p/old.jpg": state.DoneRow(10, 20, "image", "fp1", "ok", None, None)}
            st.adopt_identities({"/p/old.jpg": (7, 30)})
            st.adopt_identities({"/p/old.jpg": (8, 40)})  # only entries without them take them
            st.mark_done(Path("/p/new.jpg"), size=1, mtime_ns=2, ino=3, ctime_ns=4, media_kind="image", fingerprint="f",
                         answer="ok")  # fmt: skip
            assert st.done_index() == {
                "/p/old.jpg": state.DoneRow(10, 20, "image", "fp1", "ok", 7, 30),
                "/p/new.jpg": state.DoneRow(1, 2, "image", "f", "ok", 3, 4),
            }

    def test_a_newer_schema_is_refused_and_left_untouched(self, db: Path) -> None:
        State(db, clock=Clock()).close()
        conn = sqlite3.connect(db)
        conn.execute("UPDATE schema_version SET version = 99")
        conn.execute("INSERT INTO requests (day, n) VALUES ('2030-01-01', 7)")
        conn.commit()
        conn.close()
        before = sorted(p.name for p in db.parent.iterdir())
        with pytest.raises(StateError, match=r"newer mmwatchd \(state schema 99; .* knows up to \d+\).*Upgrade"):
            State(db, clock=Clock())
        assert sorted(p.name for p in db.parent.iterdir()) == before  # nothing moved aside
        conn = sqlite3.connect(db)
        assert conn.execute("SELECT version FROM schema_version").fetchone() == (99,)
        assert conn.execute("SELECT n FROM requests").fetchone() == (7,)
        conn.close()

    def test_unopenable_location_is_a_state_error(self, tmp_path: Path) -> None:
        (tmp_path / "file").write_text("")
        with pytest.raises(StateError, match="cannot create"):
            State(tmp_path / "file" / "state.sqlite3")

    def test_use_after_close_is_a_state_error(self, db: Path) -> None:
        st = State(db, clock=Clock())
        st.close()
        st.close()
        with pytest.raises(StateError):
            st.attempts(Path("/x"))


class TestRetries:
    def test_attempts_survive_reopen(self, db: Path) -> None:
        with State(db, clock=Clock()) as st:
            assert attempt(st, "/p/a.jpg") == 1
            assert attempt(st, "/p/a.jpg", message="connection refused") == 2
            assert attempt(st, "/p/b.jpg") == 1
        with State(db, clock=Clock()) as st:
            assert st.attempts(Path("/p/a.jpg")) == 2
            assert attempt(st, "/p/a.jpg") == 3
            assert st.attempts(Path("/p/never.jpg")) == 0
            rows = {r.path: r for r in st.retrying()}
        assert rows[Path("/p/a.jpg")].attempts == 3
        assert rows[Path("/p/a.jpg")].last_error == "timeout"
        assert rows[Path("/p/a.jpg")].retry_at == NOON + 60
        assert rows[Path("/p/a.jpg")].root == "photos"
        assert rows[Path("/p/a.jpg")].kind == "unavailable"

    def test_retrying_is_soonest_first(self, db: Path) -> None:
        with State(db, clock=Clock()) as st:
            st.record_attempt(Path("/late"), root=None, kind="k", message="m", retry_at=200.0)
            st.record_attempt(Path("/never"), root=None, kind="k", message="m", retry_at=None)
            st.record_attempt(Path("/soon"), root=None, kind="k", message="m", retry_at=100.0)
            assert [r.path.name for r in st.retrying()] == ["soon", "late", "never"]

    def test_done_clears_retry_state(self, db: Path) -> None:
        with State(db, clock=Clock()) as st:
            attempt(st, "/p/a.jpg")
            attempt(st, "/p/a.jpg")
            st.record_done(Path("/p/a.jpg"), root="photos", status="ok")
            assert st.attempts(Path("/p/a.jpg")) == 0
            assert st.retrying() == []
            assert attempt(st, "/p/a.jpg") == 1  # a new version of the file starts over

    def test_forget_only_the_retry_state(self, db: Path) -> None:
        with State(db, clock=Clock()) as st:
            attempt(st, "/p/a.jpg")
            st.mark_done(Path("/p/a.jpg"), size=1, mtime_ns=2, media_kind="image", fingerprint="f", answer="ok")
            st.forget(Path("/p/a.jpg"), index=False)
            assert st.retrying() == [] and st.attempts(Path("/p/a.jpg")) == 0
            assert list(st.done_index()) == ["/p/a.jpg"]

    def test_forget(self, db: Path) -> None:
        with State(db, clock=Clock()) as st:
            attempt(st, "/p/a.jpg")
            st.forget(Path("/p/a.jpg"))
            st.forget(Path("/p/unknown.jpg"))
            assert st.attempts(Path("/p/a.jpg")) == 0
            assert st.retrying() == []

    def test_non_utf8_names_round_trip(self, db: Path) -> None:
        raw = b"/photos/caf\xff\xfe.jpg"
        path = Path(os.fsdecode(raw))
        with State(db, clock=Clock()) as st:
            attempt(st, path)
            attempt(st, path)
            attempt(st, "/photos/caf.jpg")
        with State(db, clock=Clock()) as st:
            assert st.attempts(path) == 2
            assert {os.fsencode(r.path) for r in st.retrying()} == {raw, b"/photos/caf.jpg"}
            st.record_done(path, root="photos", status="error", message="cannot decode", kind="decode")
            [row] = st.last_errors()
        assert os.fsencode(row.path) == raw
        assert row == ErrorRow(path=path, root="photos", kind="decode", message="cannot decode", at=NOON)

    def test_long_messages_are_clipped(self, db: Path) -> None:
        with State(db, clock=Clock()) as st:
            attempt(st, "/a", message="x" * 10_000)
            assert len(st.retrying()[0].last_error) == state.MESSAGE_MAX


class TestHistoryAndCounts:
    def test_error_history_is_bounded_and_newest_first(self, db: Path) -> None:
        clock = Clock()
        with State(db, clock=clock) as st:
            for i in range(state.ERROR_HISTORY + 25):
                clock.now += 1
                st.record_done(Path(f"/p/{i}.jpg"), root="photos", status="error", message=f"bad {i}")
            st.record_done(Path("/p/fine.jpg"), root="photos", status="ok")
            newest = st.last_errors(3)
            assert [r.message for r in newest] == [f"bad {i}" for i in (224, 223, 222)]
            assert [r.kind for r in newest] == ["error"] * 3
            everything = st.last_errors(10_000)
        assert len(everything) == state.ERROR_HISTORY
        assert everything[-1].message == "bad 25"
        assert State(db, clock=clock).last_errors(0) == []

    def test_a_finished_file_leaves_retrying_and_only_errors_stay_in_the_history(self, db: Path) -> None:
        with State(db, clock=Clock()) as st:
            attempt(st, "/a/r1", root="a")
            attempt(st, "/a/r2", root="a")
            st.record_done(Path("/a/r1"), root="a", status="ok")
            st.record_done(Path("/a/r2"), root="a", status="error", message="rejected")
            st.record_done(Path("/once.jpg"), root=None, status="ok")
            assert st.retrying() == []
            assert [(os.fsdecode(e.path), e.root, e.message) for e in st.last_errors()] == [("/a/r2", "a", "rejected")]

    def test_the_write_only_tallies_of_older_databases_are_dropped(self, db: Path) -> None:
        """Per-root tallies of finished files were written by every finished file and never read."""
        db.parent.mkdir()
        conn = sqlite3.connect(db)
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        drop = next(i for i, steps in enumerate(state.MIGRATIONS) if "DROP TABLE done_counts" in steps)
        conn.execute(f"INSERT INTO schema_version VALUES ({drop})")  # a database from before the drop
        for statement in (step for steps in state.MIGRATIONS[:drop] for step in steps):
            conn.execute(statement)
        conn.execute("INSERT INTO done_counts (root, ok, error) VALUES ('a', 3, 1)")
        conn.commit()
        conn.close()
        with State(db, clock=Clock()) as st:
            attempt(st, "/a/r1", root="a")
            st.record_done(Path("/a/r1"), root="a", status="ok")
        conn = sqlite3.connect(db)
        try:
            tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
        assert "done_counts" not in tables and {"retry", "errors", "done", "requests", "endpoints"} <= tables

    def test_bad_status_is_rejected(self, db: Path) -> None:
        with State(db, clock=Clock()) as st, pytest.raises(ValueError):
            st.record_done(Path("/a"), root=None, status="maybe")  # type: ignore[arg-type]

    def test_daily_counter_rolls_over_at_local_midnight(self, db: Path) -> None:
        clock = Clock(datetime(2025, 3, 1, 23, 59, 58).timestamp())
        with State(db, clock=clock) as st:
            assert st.requests_today() == 0
            assert st.count_request() == 1
            assert st.count_request(2) == 3
            clock.now += 1.5  # 23:59:59.5
            assert st.requests_today() == 3
            clock.now += 1.0  # 00:00:00.5 the next day
            assert st.requests_today() == 0
            assert st.count_request() == 1
            clock.now -= 1.0
            assert st.requests_today() == 3  # the previous day is still there

    def test_old_days_are_dropped(self, db: Path) -> None:
        clock = Clock()
        with State(db, clock=clock) as st:
            st.count_request()
            clock.now += (state.REQUEST_DAYS_KEPT + 5) * 86400
            st.count_request()
        conn = sqlite3.connect(db)
        try:
            assert conn.execute("SELECT count(*) FROM requests").fetchone()[0] == 1
        finally:
            conn.close()


def test_concurrent_use_from_8_threads(db: Path) -> None:
    st = State(db, clock=Clock())
    n_threads, n_files = 8, 25
    barrier = threading.Barrier(n_threads)
    failures: list[BaseException] = []

    def work(t: int) -> None:
        try:
            barrier.wait(timeout=10)
            for i in range(n_files):
                path = Path(f"/root{t % 2}/{t}-{i}.jpg")
                assert attempt(st, path, root=f"root{t % 2}") == 1
                assert attempt(st, path, root=f"root{t % 2}") == 2
                st.count_request()
                if i % 5 != 0:  # every fifth file stays retrying
                    st.record_done(path, root=f"root{t % 2}", status="ok" if i % 2 else "error", message="no")
                st.retrying()
                st.last_errors()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread, which fails with it
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(t,), name=f"state-test-{t}") for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    try:
        assert not failures, failures
        assert st.requests_today() == n_threads * n_files
        # of 25 files per thread: 5 stay retrying, 10 ok (odd i), 10 error (even i, not multiples of 5)
        assert len(st.retrying()) == 5 * n_threads
        assert len(st.last_errors(10_000)) == min(10 * n_threads, state.ERROR_HISTORY)
    finally:
        st.close()
    assert quick_check(db) == ["ok"]


# Writes in a loop and appends, after each commit, the request count that commit returned.
WRITER = """
import os, sys
from pathlib import Path
from mmwatchd.state import State

db, progress, now = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
st = State(db, clock=lambda: now)
fd = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
i = 0
while True:
    i += 1
    path = Path(f"/photos/{i % 37}-\\udcff.jpg")
    st.record_attempt(path, root="photos", kind="unavailable", message="x" * 300, retry_at=now + i)
    if i % 3 == 0:
        st.record_done(path, root="photos", status="error" if i % 2 else "ok", message="m" * 300)
    n = st.count_request()
    os.write(fd, b"%d\\n" % n)
"""


def test_killed_mid_write_loses_nothing_committed(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite3"
    progress = tmp_path / "progress"
    errlog = tmp_path / "stderr"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    rng = random.Random()
    started = time.monotonic()
    prev_requests = prev_done = 0
    rounds = 0
    while rounds < 3 or (rounds < 8 and time.monotonic() - started < 1.5):
        rounds += 1
        lines_before = len(progress.read_bytes().splitlines()) if progress.exists() else 0
        with open(errlog, "wb") as err:
            child = subprocess.Popen(
                [sys.executable, "-c", WRITER, str(db), str(progress), repr(NOON)],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while not progress.exists() or len(progress.read_bytes().splitlines()) <= lines_before:
                assert child.poll() is None, errlog.read_text()
                assert time.monotonic() < deadline, "the writer made no progress"
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.08))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        assert child.returncode == -signal.SIGKILL
        # The last complete line is a count the child saw committed; a torn last line is dropped.
        text = progress.read_bytes()
        committed = int(text[: text.rindex(b"\n")].rsplit(b"\n", 1)[-1])

        with capture_logs() as logs, State(db, clock=Clock()) as st:
            requests = st.requests_today()
            done = len(st.last_errors(state.ERROR_HISTORY))
            assert st.retrying(), "retry rows survive"
        assert logs == [], "the database was not reset"
        assert quick_check(db) == ["ok"]
        assert requests >= committed > prev_requests
        assert done >= prev_done
        prev_requests, prev_done = requests, done
    assert not any(".corrupt-" in p.name for p in tmp_path.iterdir())


class TestShardBeingWritten:
    """Whether a shard a backfill records as ``writing`` still has its writer: the lock on the shard file."""

    @staticmethod
    def _row(shard: Path) -> state.BatchRow:
        return state.BatchRow("mmw-1", "api", "default", str(shard), 0, 0, state.WRITING, None, None, None, None, None,
                              0.0, 0.0)  # fmt: skip

    def test_locked_by_a_live_process_gone_with_it(self, tmp_path: Path) -> None:
        shard = tmp_path / "mmw-1.jsonl"
        shard.write_bytes(b"")
        writer = subprocess.Popen(
            [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'ab'); fcntl.flock(f, fcntl.LOCK_EX); "
             "print('locked', flush=True); sys.stdin.read()", str(shard)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert writer.stdout is not None and writer.stdout.readline() == "locked\n"
            assert state.shard_being_written(self._row(shard))
        finally:
            writer.kill()
            writer.wait()
        assert not state.shard_being_written(self._row(shard))  # the kernel dropped the lock with the process
        assert not state.shard_being_written(self._row(tmp_path / "gone.jsonl"))

    def test_a_shard_lease_that_cannot_be_made_says_where_and_why(self, tmp_path: Path) -> None:
        with state.State(tmp_path / state.FILENAME) as store:
            (tmp_path / "batch-locks").write_bytes(b"")  # in the way of the lock folder
            problem = r"batch-locks/mmw-1\.lock: cannot lock the shard mmw-1: .*permissions"
            with pytest.raises(StateError, match=problem), store.batch_lease("mmw-1"):
                pass

    def test_a_shard_that_cannot_be_opened_is_taken_as_being_written(self, tmp_path: Path) -> None:
        """Rather leave its files to the backfill than pay for them twice (another user's export folder, say)."""
        (tmp_path / "not-a-folder").write_bytes(b"")
        assert state.shard_being_written(self._row(tmp_path / "not-a-folder" / "mmw-1.jsonl"))
