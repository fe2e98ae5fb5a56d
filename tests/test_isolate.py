from __future__ import annotations

import atexit
import errno
import gc
import importlib
import inspect
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import isolate_helpers as helpers
import pytest
from media import make_jpeg, make_video

from mmwatchd import errors
from mmwatchd.encode import encode_image
from mmwatchd.errors import DecodeError, MediaTooLarge, MmwatchdError
from mmwatchd.isolate import PRIVATE_STDLIB, Isolator
from mmwatchd.model import ImageSpec, Limits

GiB = 2**30
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# multiprocessing's own helpers live as long as the test session and are shared by everything that uses the
# forkserver start method: they are not ours to stop.
_INFRASTRUCTURE = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None when it no longer exists."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def _gone(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is None or stat[0] in ("Z", "X")  # a zombie has exited; reaping it is its new parent's business


def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None and stat[0] not in ("Z", "X"):
            parents[int(entry.name)] = stat[1]
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _worker_processes() -> set[int]:
    """Processes below this one, apart from multiprocessing's forkserver and resource tracker themselves.

    Workers are forked by the forkserver, so they share its command line; they are its children, not ours.
    """
    me = os.getpid()
    return {
        pid
        for pid in _descendants(me)
        if (_proc_stat(pid) or ("", 0))[1] != me or not any(name in _cmdline(pid) for name in _INFRASTRUCTURE)
    }


def _wait_until(condition, timeout_s: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(autouse=True)
def _no_leaked_processes() -> Iterator[None]:
    """Fail a test that leaves a worker process behind (the thread guard in conftest covers threads)."""
    before = _worker_processes()
    yield
    assert multiprocessing.active_children() == []
    leaked = _worker_processes() - before
    assert not leaked, {pid: _cmdline(pid) for pid in leaked}


@pytest.fixture
def iso() -> Iterator[Isolator]:
    with Isolator(workers=2, timeout_s=5, memory_bytes=GiB) as isolator:
        yield isolator


class TestResults:
    def test_returns_the_value(self, iso: Isolator) -> None:
        assert iso.call(helpers.echo, 1, "two", three=[3], label="a.jpg") == ((1, "two"), {"three": [3]})
        assert iso.call(helpers.square, 7, label="a.jpg") == 49

    def test_runs_in_another_process_that_is_reused(self, iso: Isolator) -> None:
        first = iso.call(helpers.pid, label="a.jpg")
        assert first != os.getpid()
        assert iso.call(helpers.pid, label="a.jpg") == first

    def test_large_results_come_back_whole(self, iso: Isolator) -> None:
        assert iso.call(helpers.blob, 3 * 2**20, label="a.jpg") == b"x" * (3 * 2**20)

    def test_mmwatchd_errors_are_raised_as_they_were(self, iso: Isolator) -> None:
        with pytest.raises(DecodeError) as caught:
            iso.call(helpers.raise_decode_error, "IMG_1.jpg: truncated after 1024 bytes", label="IMG_1.jpg")
        assert str(caught.value) == "IMG_1.jpg: truncated after 1024 bytes"
        assert caught.value.message == "IMG_1.jpg: truncated after 1024 bytes"

    def test_other_exceptions_become_decode_errors_naming_the_file(self, iso: Isolator) -> None:
        with pytest.raises(DecodeError) as caught:
            iso.call(helpers.raise_value_error, "bad huffman table", label="IMG_2.jpg")
        assert type(caught.value) is DecodeError
        assert str(caught.value) == "IMG_2.jpg: decoding failed: ValueError: bad huffman table"
        assert not caught.value.retryable
        # Where it happened, for whoever reads the log with a traceback.
        assert "raise_value_error" in "\n".join(caught.value.__notes__)

    def test_an_error_that_does_not_unpickle_is_sent_by_name_and_message(self, iso: Isolator) -> None:
        with pytest.raises(DecodeError) as caught:
            iso.call(helpers.raise_two_part_error, label="IMG_2.jpg")
        assert str(caught.value) == "IMG_2.jpg: decoding failed: TwoPartError: IMG_2.jpg: the header lies"
        assert iso.call(helpers.square, 3, label="a.jpg") == 9

    def test_an_unpicklable_call_fails_in_the_caller(self, iso: Isolator) -> None:
        with pytest.raises((pickle.PicklingError, AttributeError)):
            iso.call(lambda: 1, label="a.jpg")
        assert iso.call(helpers.square, 4, label="a.jpg") == 16


class TestOSErrors:
    """The file system's answers cross as themselves: the caller handles them as its own."""

    @pytest.mark.parametrize("number", [errno.ENOENT, errno.EIO, errno.ESTALE, errno.EACCES, errno.EAGAIN])
    def test_an_os_error_with_an_errno_is_raised_as_that_os_error(self, iso: Isolator, number: int) -> None:
        sent = OSError(number, os.strerror(number), "/photos/IMG_1.jpg")
        with pytest.raises(OSError) as caught:
            iso.call(helpers.raise_error, sent, label="IMG_1.jpg")
        assert not isinstance(caught.value, MmwatchdError)
        assert type(caught.value) is type(OSError(number, "x"))  # FileNotFoundError, PermissionError, ...
        assert (caught.value.errno, caught.value.strerror, caught.value.filename) == (
            number, os.strerror(number), "/photos/IMG_1.jpg")  # fmt: skip

    def test_a_file_gone_before_the_decoder_opens_it(self, iso: Isolator, tmp_path: Path) -> None:
        path = make_jpeg(tmp_path / "IMG_1.jpg", (64, 48))
        path.rename(tmp_path / "holiday.jpg")
        with pytest.raises(FileNotFoundError) as caught:
            iso.call(encode_image, path, ImageSpec(), budget=100_000, limits=Limits(), label=path.name)
        assert caught.value.filename == str(path)

    def test_a_decoders_os_error_without_an_errno_is_about_the_file(self, iso: Isolator) -> None:
        # Pillow says "cannot identify image file" and "image file is truncated" with a bare OSError.
        with pytest.raises(DecodeError, match=r"IMG_1.jpg: decoding failed: OSError: image file is truncated"):
            iso.call(helpers.raise_error, OSError("image file is truncated"), label="IMG_1.jpg")


def _error_classes() -> list[type[MmwatchdError]]:
    return [cls for _, cls in inspect.getmembers(errors, inspect.isclass) if issubclass(cls, MmwatchdError)]


class TestErrorsPickle:
    @pytest.mark.parametrize("cls", _error_classes(), ids=lambda cls: cls.__name__)
    def test_round_trip_keeps_type_message_and_attributes(self, cls: type[MmwatchdError]) -> None:
        error = cls("IMG_3.jpg: something is wrong")
        error.extra = 42  # type: ignore[attr-defined]
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is cls
        assert str(copy) == str(error)
        assert copy.message == error.message
        assert copy.kind == error.kind
        assert copy.retryable == error.retryable
        assert copy.extra == 42  # type: ignore[attr-defined]

    def test_config_error_keeps_its_problems(self) -> None:
        error = errors.ConfigError(["config.yaml:3:1: rules: required", "config.yaml:9:5: rules[0].max_bytes: > 0"])
        copy = pickle.loads(pickle.dumps(error))
        assert copy.problems == error.problems
        assert str(copy) == str(error)

    def test_unavailable_keeps_status_and_retry_after(self) -> None:
        error = errors.VLMUnavailable("endpoint busy")
        error.status, error.retry_after = 503, 2.5
        copy = pickle.loads(pickle.dumps(error))
        assert (copy.status, copy.retry_after, copy.counts_against_file) == (503, 2.5, True)

    def test_across_a_worker(self, iso: Isolator) -> None:
        error = errors.ConfigError(["a.yaml:1:1: one", "a.yaml:2:1: two"])
        with pytest.raises(errors.ConfigError) as caught:
            iso.call(helpers.raise_error, error, label="a.jpg")
        assert caught.value.problems == error.problems
        unavailable = errors.VLMUnavailable("down")
        unavailable.status = 502
        with pytest.raises(errors.VLMUnavailable) as caught_unavailable:
            iso.call(helpers.raise_error, unavailable, label="a.jpg")
        assert caught_unavailable.value.status == 502


class TestFailures:
    def test_a_hang_is_stopped_at_the_timeout_and_the_worker_replaced(self) -> None:
        with Isolator(workers=1, timeout_s=0.5, memory_bytes=None) as iso:
            hung_pid = iso.call(helpers.pid, label="warm-up")  # the worker's start-up is not what is timed
            started = time.monotonic()
            with pytest.raises(DecodeError) as caught:
                iso.call(helpers.hang, label="IMG_4.mov")
            assert time.monotonic() - started < 1.5  # 0.5 s, then a kill and a reap; more only on a loaded machine
            assert str(caught.value) == (
                "IMG_4.mov: decoding took longer than 0.5 s and was stopped (limits.decode_timeout_s)"
            )
            assert not caught.value.retryable
            assert _gone(hung_pid)
            assert iso.call(helpers.square, 5, label="a.jpg") == 25
            assert iso.call(helpers.pid, label="a.jpg") != hung_pid

    @pytest.mark.parametrize(
        ("fn", "args", "what"),
        [
            (helpers.kill_self, (signal.SIGSEGV,), "SIGSEGV"),
            (helpers.abort, (), "SIGABRT"),
            (helpers.kill_self, (signal.SIGBUS,), "SIGBUS"),
            (helpers.exit_with, (3,), "exit status 3"),
        ],
    )
    def test_a_crash_is_a_decode_error_and_the_worker_replaced(self, iso: Isolator, fn, args, what) -> None:  # type: ignore[no-untyped-def]
        with pytest.raises(DecodeError) as caught:
            iso.call(fn, *args, label="IMG_5.heic")
        assert str(caught.value) == f"IMG_5.heic: the decoder crashed ({what}); the file is probably damaged"
        assert not caught.value.retryable
        assert iso.call(helpers.square, 6, label="a.jpg") == 36

    def test_an_allocation_past_the_limit_is_media_too_large(self, iso: Isolator) -> None:
        with pytest.raises(MediaTooLarge) as caught:
            iso.call(helpers.allocate, 3 * GiB, label="IMG_6.png")
        assert str(caught.value) == "IMG_6.png: decoding needed more than 1024 MB (limits.decode_memory_mb)"
        with pytest.raises(MediaTooLarge):  # many smaller allocations (anonymous mmap) count too
            iso.call(helpers.allocate_in_chunks, 3 * GiB, 64 * 2**20, label="IMG_6.png")
        assert iso.call(helpers.allocate, 256 * 2**20, label="a.jpg") == 256 * 2**20
        assert iso.call(helpers.square, 7, label="a.jpg") == 49

    def test_without_a_limit_the_message_has_no_number(self) -> None:
        with (
            Isolator(workers=1, timeout_s=5, memory_bytes=None) as iso,
            pytest.raises(MediaTooLarge, match=r"^a\.png: decoding ran out of memory$"),
        ):
            iso.call(helpers.raise_error, MemoryError(), label="a.png")

    def test_a_kill_from_outside_is_taken_for_the_oom_killer(self, iso: Isolator) -> None:
        with pytest.raises(MediaTooLarge, match=r"^IMG_7\.jpg: the decoder was killed \(SIGKILL\), most likely"):
            iso.call(helpers.kill_self, signal.SIGKILL, label="IMG_7.jpg")
        assert iso.call(helpers.square, 8, label="a.jpg") == 64

    def test_a_worker_that_died_while_idle_is_replaced_silently(self, iso: Isolator) -> None:
        dead = iso.call(helpers.pid, label="a.jpg")
        os.kill(dead, signal.SIGKILL)
        assert _wait_until(lambda: _gone(dead))
        assert iso.call(helpers.pid, label="a.jpg") not in (dead, os.getpid())

    def test_workers_ignore_sigterm(self, iso: Isolator) -> None:
        worker = iso.call(helpers.sigterm_self, label="a.jpg")
        os.kill(worker, signal.SIGINT)
        assert iso.call(helpers.pid, label="a.jpg") == worker

    def test_a_preload_that_fails_is_reported(self) -> None:
        with (
            Isolator(workers=1, timeout_s=5, memory_bytes=None, preload=["no_such_module_here"]) as iso,
            pytest.raises(DecodeError, match=r"^a\.jpg: the decoder process could not start: ModuleNotFoundError"),
        ):
            iso.call(helpers.square, 2, label="a.jpg")


class TestPool:
    def test_concurrent_callers_share_the_workers(self, tmp_path: Path) -> None:
        with Isolator(workers=2, timeout_s=10, memory_bytes=None) as iso:

            def five(thread: int) -> list[tuple[int, int, int]]:
                return [
                    iso.call(helpers.tracked, tmp_path, thread * 10 + i, 0.02, label=f"{thread}-{i}") for i in range(5)
                ]

            with ThreadPoolExecutor(max_workers=8) as pool:
                results = [r for batch in pool.map(five, range(8)) for r in batch]
        assert sorted(square for square, _, _ in results) == sorted(
            (t * 10 + i) ** 2 for t in range(8) for i in range(5)
        )
        assert len({pid for _, pid, _ in results}) <= 2
        assert max(running for _, _, running in results) == 2

    def test_a_hung_call_does_not_hold_up_other_callers(self, tmp_path: Path) -> None:
        marker = tmp_path / "hanging"
        with Isolator(workers=2, timeout_s=10, memory_bytes=None) as iso:
            outcome: list[BaseException] = []

            def hang() -> None:
                try:
                    iso.call(helpers.hang, marker, label="IMG_8.mov")
                except DecodeError as exc:
                    outcome.append(exc)

            thread = threading.Thread(target=hang)
            thread.start()
            try:
                assert _wait_until(marker.exists)
                started = time.monotonic()
                assert [iso.call(helpers.square, i, label="a.jpg") for i in range(5)] == [0, 1, 4, 9, 16]
                assert time.monotonic() - started < 3.0  # starting the second worker included
            finally:
                iso.close()
                thread.join(5)
        assert not thread.is_alive()
        assert len(outcome) == 1 and outcome[0].retryable

    def test_workers_are_recycled_after_max_calls(self) -> None:
        with Isolator(workers=1, timeout_s=5, memory_bytes=None, max_calls_per_worker=3) as iso:
            pids = [iso.call(helpers.pid, label="a.jpg") for _ in range(7)]
        assert pids[0] == pids[1] == pids[2] != pids[3] == pids[4] == pids[5] != pids[6]
        assert all(_gone(pid) for pid in pids)

    def test_workers_start_lazily(self) -> None:
        before = _worker_processes()
        with Isolator(workers=2, timeout_s=5, memory_bytes=None):
            assert _worker_processes() == before

    def test_new_limits_apply_to_the_next_calls_and_replace_idle_workers(self, tmp_path: Path) -> None:
        with Isolator(workers=1, timeout_s=10, memory_bytes=GiB) as iso:
            first = iso.call(helpers.pid, label="a.jpg")
            assert iso.call(helpers.memory_limit, label="a.jpg") == GiB
            iso.set_limits(timeout_s=0.5, memory_bytes=GiB // 2)
            assert _wait_until(lambda: _gone(first))  # idle under the old limit: stopped at once
            assert iso.call(helpers.memory_limit, label="a.jpg") == GiB // 2
            with pytest.raises(DecodeError, match=r"longer than 0.5 s"):
                iso.call(helpers.hang, label="slow.mov")
            with pytest.raises(ValueError):
                iso.set_limits(timeout_s=0, memory_bytes=None)

    def test_a_busy_worker_finishes_its_call_under_the_old_limits(self, tmp_path: Path) -> None:
        with Isolator(workers=1, timeout_s=10, memory_bytes=GiB) as iso:
            with ThreadPoolExecutor(max_workers=1) as pool:
                busy = pool.submit(iso.call, helpers.tracked, tmp_path, 7, 1.0, label="a.jpg")
                assert _wait_until(lambda: len(iso.pids()) == 1)
                (old,) = iso.pids()
                # The call is under way once it has made its file (the worker may still be starting before that).
                assert _wait_until(lambda: any(tmp_path.iterdir()), timeout_s=30)
                iso.set_limits(timeout_s=0.5, memory_bytes=GiB // 2)  # shorter than what the call still needs
                assert busy.result()[:2] == (49, old)
            assert _wait_until(lambda: _gone(old))  # retired after its call, not reused
            assert iso.call(helpers.memory_limit, label="b.jpg") == GiB // 2

    def test_prestart_starts_every_worker_ahead_of_the_first_call(self) -> None:
        with Isolator(workers=2, timeout_s=5, memory_bytes=None, preload=["mmwatchd.encode"]) as iso:
            iso.prestart()
            iso.prestart()  # only the first does anything
            assert _wait_until(lambda: len(iso.pids()) == 2)
            ready = set(iso.pids())
            assert {iso.call(helpers.pid, label="a.jpg") for _ in range(4)} <= ready
            assert set(iso.pids()) == ready
        assert all(_gone(pid) for pid in ready)

    def test_close_during_prestart_stops_everything(self) -> None:
        before = _worker_processes()
        iso = Isolator(workers=2, timeout_s=5, memory_bytes=None, preload=["mmwatchd.encode"])
        iso.prestart()
        iso.close()  # joins the prestart thread (the thread-leak guard checks), whatever it was doing
        assert _wait_until(lambda: _worker_processes() == before)
        assert iso.pids() == []


class TestDaemonGone:
    """A worker whose daemon was killed (kill -9 during start-up or mid-call) exits quietly: no traceback in the log."""

    @pytest.mark.parametrize("when", ["before it is ready", "before its reply"])
    def test_the_worker_exits_quietly(self, when: str) -> None:
        code = textwrap.dedent(
            """
            import os, pickle, sys
            import isolate_helpers
            from multiprocessing import Pipe
            from mmwatchd.isolate import _worker_main
            daemon_end, worker_end = Pipe()
            if sys.argv[1] == "before it is ready":
                daemon_end.close()  # gone before the worker says ready
            pid = os.fork()
            if pid == 0:  # the worker
                if not daemon_end.closed:
                    daemon_end.close()
                _worker_main(worker_end, None, (), "mmwatchd-test", 0)
                print("returned", flush=True)
                os._exit(0)
            worker_end.close()
            if not daemon_end.closed:  # gone while the worker computes its reply
                assert daemon_end.recv()[0] == "ready"
                daemon_end.send_bytes(pickle.dumps((isolate_helpers.square, (3,), {})))
                daemon_end.close()
            _, status = os.waitpid(pid, 0)
            sys.exit(os.waitstatus_to_exitcode(status))
            """
        )
        run = subprocess.run([sys.executable, "-c", code, when], capture_output=True, text=True, timeout=60,
                             cwd=Path(__file__).parent)  # fmt: skip
        assert run.returncode == 0 and run.stdout.strip() == "returned", run.stderr
        assert "Traceback" not in run.stderr, run.stderr


class TestClose:
    def test_close_with_a_hung_call_in_flight_returns_promptly(self, tmp_path: Path) -> None:
        marker = tmp_path / "hanging"
        iso = Isolator(workers=1, timeout_s=30, memory_bytes=None)
        outcome: list[BaseException] = []

        def hang() -> None:
            try:
                iso.call(helpers.hang, marker, label="IMG_9.mov")
            except DecodeError as exc:
                outcome.append(exc)

        def wait_for_a_worker() -> None:  # the only worker is busy: this caller is queued when close() comes
            try:
                iso.call(helpers.square, 2, label="IMG_10.jpg")
            except DecodeError as exc:
                outcome.append(exc)

        threads = [threading.Thread(target=hang), threading.Thread(target=wait_for_a_worker)]
        threads[0].start()
        assert _wait_until(marker.exists)
        threads[1].start()
        time.sleep(0.05)
        worker_pids = _worker_processes()
        assert worker_pids
        started = time.monotonic()
        iso.close()
        assert time.monotonic() - started < 2.0
        assert all(_gone(pid) for pid in worker_pids)
        for thread in threads:
            thread.join(2)
            assert not thread.is_alive()
        assert sorted(str(exc) for exc in outcome) == [
            "IMG_10.jpg: decoding was interrupted because the decoder processes were stopped (shutdown)",
            "IMG_9.mov: decoding was interrupted because the decoder processes were stopped (shutdown)",
        ]
        assert all(exc.retryable for exc in outcome)
        assert multiprocessing.active_children() == []

    def test_close_is_idempotent_and_later_calls_fail(self, iso: Isolator) -> None:
        iso.call(helpers.square, 2, label="a.jpg")
        iso.close()
        iso.close()
        with pytest.raises(DecodeError, match="stopped"):
            iso.call(helpers.square, 2, label="a.jpg")

    def test_a_forgotten_isolator_stops_its_workers_when_collected(self) -> None:
        iso = Isolator(workers=1, timeout_s=5, memory_bytes=None)
        worker = iso.call(helpers.pid, label="a.jpg")
        del iso
        gc.collect()
        assert _wait_until(lambda: _gone(worker))

    def test_workers_die_with_a_killed_parent(self, tmp_path: Path) -> None:
        # The parent starts an isolator and leaves a call hanging, so the worker is not reading its pipe: only the
        # parent-death signal can stop it once the parent (and with it the forkserver) is gone.
        marker = tmp_path / "hanging"
        script = textwrap.dedent(
            f"""
            import sys
            from pathlib import Path
            import isolate_helpers
            from mmwatchd.isolate import PRIVATE_STDLIB, Isolator

            iso = Isolator(workers=1, timeout_s=600, memory_bytes=None)
            print(iso.call(isolate_helpers.pid, label="pid"), flush=True)
            iso.call(isolate_helpers.hang, Path({str(marker)!r}), label="hang")
            """
        )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
        parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, text=True)
        assert parent.stdout is not None
        below: set[int] = set()
        try:
            worker = int(parent.stdout.readline())
            assert _wait_until(marker.exists, 10)
            below = _descendants(parent.pid)  # the forkserver, the resource tracker and the worker
            assert worker in below
            parent.kill()
            parent.wait(5)
            assert _wait_until(lambda: all(_gone(pid) for pid in below), 5), {
                pid: _cmdline(pid) for pid in below if not _gone(pid)
            }
        finally:
            parent.kill()
            parent.wait(5)
            parent.stdout.close()
            for pid in below:  # only after a failure: nothing may outlive the test
                if not _gone(pid):
                    os.kill(pid, signal.SIGKILL)


class TestPrivateStdlib:
    """The private stdlib names the clean exit relies on (no public API does the same): a Python that renames or
    drops one fails here, by name, instead of leaving the forkserver and resource tracker for systemd to SIGKILL."""

    @staticmethod
    def _lookup(path: str) -> object:
        module, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module), name)

    def test_the_multiprocessing_internals_are_there_and_hold_what_isolate_expects(self, iso: Isolator) -> None:
        iso.call(helpers.pid, label="a.jpg")  # the forkserver and resource tracker are running now
        version = sys.version.split()[0]
        for path, attrs in PRIVATE_STDLIB.items():
            owner = self._lookup(path)
            for attr in attrs:
                assert hasattr(owner, attr), (
                    f"{path}.{attr} no longer exists in Python {version}: mmwatchd.isolate (stop_shared_processes, "
                    f"_release_forkserver) needs updating for this Python"
                )
            pid, fd = getattr(owner, attrs[0]), getattr(owner, attrs[1])
            assert isinstance(pid, int) and isinstance(fd, int), (
                f"{path}.{attrs[0]}/{attrs[1]} no longer hold a pid and a file descriptor in Python {version} "
                f"(got {pid!r}, {fd!r}): mmwatchd.isolate.stop_shared_processes needs updating for this Python"
            )
            assert _proc_stat(pid) is not None, f"{path}.{attrs[0]} = {pid} is not a running process"

    def test_atexit_can_still_run_the_exit_handlers_ahead_of_os_exit(self) -> None:
        assert callable(getattr(atexit, "_run_exitfuncs", None)), (
            f"atexit._run_exitfuncs no longer exists in Python {sys.version.split()[0]}: mmwatchd.cli.entry calls it "
            "before os._exit(); without it logging and multiprocessing would not be shut down at exit"
        )

    def test_stop_shared_processes_leaves_no_helper_behind(self) -> None:
        script = textwrap.dedent(
            """
            import os, isolate_helpers
            from multiprocessing import forkserver, resource_tracker
            from mmwatchd.isolate import Isolator, stop_shared_processes

            with Isolator(workers=1, timeout_s=60, memory_bytes=None) as iso:
                iso.call(isolate_helpers.pid, label="pid")
            helpers = [forkserver._forkserver._forkserver_pid, resource_tracker._resource_tracker._pid]
            stop_shared_processes()
            print(*helpers, flush=True)
            print(*[p for p in helpers if os.path.exists(f"/proc/{p}")], flush=True)
            """
        )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, env=env, text=True, timeout=120,
                             check=False)  # fmt: skip
        assert run.returncode == 0, run.stderr
        started, left = run.stdout.splitlines()
        assert len(started.split()) == 2
        assert left == "", f"still running after stop_shared_processes(): {left} (Python {sys.version.split()[0]})"


class TestRealDecoder:
    @pytest.mark.slow
    def test_encode_image_of_a_24_mp_jpeg_under_1_gib(self, tmp_path: Path) -> None:
        path = make_jpeg(tmp_path / "IMG_0001.jpg", (6000, 4000))
        spec, limits = ImageSpec(passthrough=False), Limits()
        with Isolator(workers=1, timeout_s=20, memory_bytes=GiB, preload=["mmwatchd.encode"]) as iso:
            isolated = iso.call(encode_image, path, spec, budget=2_000_000, limits=limits, label=path.name)
        direct = encode_image(path, spec, budget=2_000_000, limits=limits)
        assert isolated == direct
        assert (isolated.width, isolated.height) == (1500, 1000)  # 1/4-scale decode, 2% under max_side 1536


class TestWhatEachProcessLoads:
    """The daemon never loads the decoders' C libraries, and the decoder processes never load the HTTP client."""

    def test_the_daemon_does_not_import_the_decoders(self) -> None:
        code = (
            "import sys, mmwatchd.cli, mmwatchd.daemon, mmwatchd.pipeline, mmwatchd.status\n"
            "print(sorted(m for m in ('PIL', 'av', 'pillow_heif', 'mmwatchd.encode') if m in sys.modules))"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip() == "[]"

    def test_a_one_shot_command_imports_only_what_its_first_request_needs(self) -> None:
        """jsonschema (rules with a schema) and watchdog (the service's watcher) are imported where they are used:
        75-100 ms of start-up each run would otherwise spend next to the SDK's import, before the first request."""
        code = (
            "import sys, mmwatchd.cli, mmwatchd.daemon, mmwatchd.pipeline, mmwatchd.vlm\n"
            "print(sorted(m for m in ('jsonschema', 'watchdog', 'mmwatchd.watch') if m in sys.modules))"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip() == "[]"

    def test_workers_inherit_the_preload_from_the_forkserver(self) -> None:
        """A worker's start-up is a fork of a process that has the decoders loaded, not 0.2 s of imports."""
        from mmwatchd.isolate import stop_shared_processes

        stop_shared_processes()  # the next worker starts a forkserver of its own, as a fresh daemon would
        with Isolator(workers=1, timeout_s=30, memory_bytes=GiB, preload=["mmwatchd.encode"]) as iso:
            assert iso.call(helpers.parent_maps, "libavcodec", label="maps")  # PyAV's codecs, in the forkserver

    def test_the_decoders_fork_with_pillows_plugins_loaded(self) -> None:
        """DECODER_PRELOAD warms the forkserver: Pillow's format plugins are loaded before a decoder process forks,
        not at each one's first file; numpy (simplejpeg's) is not, as it would take up decode_memory_mb."""
        from mmwatchd.isolate import DECODER_PRELOAD, stop_shared_processes

        stop_shared_processes()
        with Isolator(workers=1, timeout_s=30, memory_bytes=GiB, preload=DECODER_PRELOAD) as iso:
            assert iso.call(helpers.parent_maps, "_webp", label="maps")  # the WebP plugin's library, in the forkserver
            wanted = ("PIL.TiffImagePlugin", "PIL.WebPImagePlugin", "PIL.JpegImagePlugin", "numpy")
            assert iso.call(helpers.loaded, *wanted, label="modules") == list(wanted[:3])

    def test_a_worker_running_the_pipelines_decoders_loads_no_client_and_no_config(self, tmp_path: Path) -> None:
        from mmwatchd import pipeline
        from mmwatchd.model import LinearBudget, VideoSpec

        clip = make_video(tmp_path / "clip.mp4", (64, 48), frames=12, fps=6)
        photo = make_jpeg(tmp_path / "a.jpg", (64, 48))
        limits = Limits()
        with Isolator(workers=1, timeout_s=30, memory_bytes=GiB, preload=["mmwatchd.encode"]) as iso:
            video = iso.call(pipeline.encode_video, clip, VideoSpec(frames=4),
                             budget=LinearBudget(first=1_000_000, per_part=50), limits=limits, label=clip.name)  # fmt: skip
            facts, part = iso.call(pipeline.probe_and_encode_image, photo, ImageSpec(), budget=100_000, limits=limits,
                                   label=photo.name)  # fmt: skip
            loaded = iso.call(helpers.loaded_modules, label="modules")
        assert len(video.parts[0].chunks) == 4 and (facts.width, part.width) == (64, 64)
        assert {"mmwatchd.encode", "PIL", "av"} <= loaded
        assert not {"openai", "httpx", "pydantic", "mmwatchd.pipeline", "mmwatchd.config", "mmwatchd.vlm"} & loaded
