"""Run decoders in worker processes, so a hostile file cannot hang, crash or exhaust the daemon.

libav, libheif and libjpeg are C: a damaged file can make them loop forever, segfault, abort or allocate without
bound. :class:`Isolator` runs such calls in a few long-lived worker processes and turns every way a call can go wrong
into an error about the file:

- the function raised an :class:`~mmwatchd.errors.MmwatchdError`: the same error, pickled across;
- it raised an ``OSError`` that carries an errno (the file was renamed or deleted meanwhile, an I/O error or a stale
  handle on a network share, a permission changed): an ``OSError`` of the same errno, strerror and file names, so the
  caller treats it as it treats one from its own ``open`` (gone is gone, transient is retried) rather than as a
  damaged file. Decoders also raise ``OSError`` *without* an errno for bad data (Pillow's "cannot identify image
  file", "image file is truncated"): that is about the file, and becomes a ``DecodeError`` like anything else;
- it raised anything else: :class:`~mmwatchd.errors.DecodeError` naming the file;
- it ran longer than ``timeout_s``: the worker is killed (SIGKILL) and replaced, ``DecodeError``;
- the worker died (a signal or an exit): replaced, ``DecodeError`` ("the decoder crashed");
- it ran out of memory (``MemoryError`` under the memory limit, or the kernel's OOM killer): ``MediaTooLarge``.

Processes come from the ``forkserver`` start method: forking the multithreaded daemon itself is unsafe (a lock held by
another thread at fork time stays locked in the child forever) and ``spawn`` pays a fresh interpreter start per worker.
Requests and replies travel over one ``Pipe`` per worker, never a shared queue, which a killed worker could leave
locked or half-written.

The memory limit is ``RLIMIT_DATA``, not ``RLIMIT_AS``: since Linux 4.7 ``RLIMIT_DATA`` counts private writable
mappings (heap, anonymous ``mmap``, thread stacks), i.e. the memory the decoder actually asks for. ``RLIMIT_AS`` also
counts the shared libraries (libav alone maps well over 100 MB) and the address space glibc reserves but does not use
(64 MB per malloc arena, up to eight arenas per core), so the same limit would mean different things on different
machines and fail ordinary files on many-core hosts: a 1080p clip decoded with 16 threads maps 1.3 GB of address space
for 270 MB of data and 150 MB resident. Mapped memory counts whether or not it is touched, so the limit bounds what a
decoder may ask for, not what happens to be resident. Over the limit, ``malloc`` fails and Python, Pillow and PyAV
raise ``MemoryError``; a library that aborts instead shows up as a crash.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib
import itertools
import os
import pickle
import resource
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import forkserver, get_context, resource_tracker
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import ForkingPickler
from multiprocessing.util import Finalize
from types import TracebackType
from typing import Any, Final, Self, TypeVar, cast

from mmwatchd.errors import DecodeError, MediaTooLarge, MmwatchdError

__all__ = ["Isolator", "LazyFunction", "stop_shared_processes"]

T = TypeVar("T")

#: What the decoder processes load before their first file: the encoders, and the warm-up of the libraries they load
#: on first use (:mod:`mmwatchd.encode.warm`). Imported by the forkserver, so each decoder process forks with them.
DECODER_PRELOAD = ("mmwatchd.encode", "mmwatchd.encode.warm")
#: How long a new worker may take to start and import ``preload`` before the call that needed it fails.
START_TIMEOUT_S: Final = 60.0
#: How long a worker told to stop (idle, or being recycled) may take to exit before it is killed.
STOP_GRACE_S: Final = 2.0
#: How long to wait for the exit status of a worker that is known to be dead or was just sent SIGKILL.
REAP_TIMEOUT_S: Final = 10.0
#: Exception messages from inside the worker are cut to this many characters.
MAX_MESSAGE_CHARS: Final = 300

# prctl(2) options (linux/prctl.h).
_PR_SET_PDEATHSIG: Final = 1
_PR_SET_NAME: Final = 15

# The forkserver reports the exit status of a worker; when the forkserver itself is gone (SIGTERM from systemd to the
# whole control group, say) multiprocessing reports 255 instead. That says nothing about the file.
_STATUS_UNKNOWN: Final = 255


@dataclass(frozen=True, slots=True)
class LazyFunction:
    """A module-level function, held as its module's and its own name and imported where it is first called.

    It pickles as the two names, so a caller can hand a function to the workers without importing its module (and the
    C libraries behind it) itself.
    """

    module: str
    name: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(self.module), self.name)(*args, **kwargs)


def _check_limits(timeout_s: float, memory_bytes: int | None) -> None:
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if memory_bytes is not None and memory_bytes <= 0:
        raise ValueError(f"memory_bytes must be > 0 or None, got {memory_bytes}")


class Isolator:
    """Runs picklable pure functions in a small pool of long-lived worker processes.

    ``call`` blocks only the calling thread; up to ``workers`` calls run at once and further callers wait for a free
    worker. Workers start on first use and are replaced after ``max_calls_per_worker`` calls, bounding whatever the C
    libraries leak. ``memory_bytes`` (None: no limit) caps each worker's private memory (``RLIMIT_DATA``).
    ``preload`` names modules every worker has imported before its first call, so that import time never counts
    against a call's ``timeout_s`` (the forkserver imports them once; workers forked from it inherit them). Workers run at ``nice`` (added to the daemon's niceness). ``fn`` cannot take a ``label`` keyword.

    Safe to share between threads; a call that hangs holds up only its own thread until ``timeout_s``.
    """

    def __init__(
        self,
        *,
        workers: int,
        timeout_s: float,
        memory_bytes: int | None,
        name: str = "mmwatchd-decoder",
        max_calls_per_worker: int = 1000,
        preload: Sequence[str] = (),
        nice: int = 5,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        _check_limits(timeout_s, memory_bytes)
        if max_calls_per_worker < 1:
            raise ValueError(f"max_calls_per_worker must be at least 1, got {max_calls_per_worker}")
        self.workers = workers
        self.timeout_s = timeout_s
        self.memory_bytes = memory_bytes
        self.name = name
        self.max_calls_per_worker = max_calls_per_worker
        self._pool = _Pool(
            workers=workers,
            memory_bytes=memory_bytes,
            name=name,
            max_calls=max_calls_per_worker,
            preload=tuple(preload),
            nice=nice,
        )
        self._prestarter: threading.Thread | None = None
        # Stops the workers when close() is forgotten: on garbage collection, and at interpreter exit before
        # multiprocessing joins its children (a hung worker ignores SIGTERM, so that join would never return).
        self._finalizer = Finalize(self, self._pool.close, exitpriority=10)

    def __repr__(self) -> str:
        return f"<Isolator {self.name!r} workers={self.workers} timeout_s={self.timeout_s:g}>"

    def pids(self) -> list[int]:
        """Process ids of the workers that exist right now (for monitoring)."""
        with self._pool._cond:
            return sorted(w.pid for w in self._pool._all if w.pid)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker and wait for it to exit; calls in flight fail with a retryable ``DecodeError``.

        Idempotent. Idle workers are asked to exit; busy ones are killed, since what they run is pure.
        """
        self._finalizer()
        if self._prestarter is not None:
            self._prestarter.join()

    def set_limits(self, *, timeout_s: float, memory_bytes: int | None) -> None:
        """New limits (a reloaded config): the timeout applies to calls from now on; the memory limit to workers
        started from now on, and workers under the old one are replaced once they are idle. Calls in flight finish
        under the limits they started with."""
        _check_limits(timeout_s, memory_bytes)
        self.timeout_s = timeout_s
        self.memory_bytes = memory_bytes
        self._pool.set_memory(memory_bytes)

    def prestart(self) -> None:
        """Start the workers now, from a background thread, so that the first calls find them ready.

        The daemon does this before it loads the HTTP client: the workers' start-up (a fork and the ``preload``
        imports) then runs on another core meanwhile. A worker that cannot start is left for the first call to
        report. Only the first call does anything.
        """
        if self._prestarter is None:
            self._prestarter = threading.Thread(target=self._pool.fill, name=f"{self.name}-prestart", daemon=True)
            self._prestarter.start()

    def call(self, fn: Callable[..., T], /, *args: Any, label: str, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in a worker process; ``label`` (the file name) starts every error message."""
        pool = self._pool
        timeout_s = self.timeout_s  # a reload while this call waits for a worker does not shorten it
        request = ForkingPickler.dumps((fn, args, kwargs))  # before taking a worker: an unpicklable call is our bug
        # A worker found dead when it is handed the request (it died while idle) is replaced once; the file cannot
        # have caused that.
        for attempt in (1, 2):
            worker = pool.acquire(label)
            try:
                worker.conn.send_bytes(request)
            except OSError:
                pool.release(worker, reuse=False)
                if attempt == 2:
                    raise _crashed(label, worker.status) from None
                continue
            break
        reuse = False
        try:
            reply = self._await(worker, label, timeout_s)
            reuse = reply[0] != "oom"  # a worker that ran out of memory may be left fragmented: start afresh
        finally:
            pool.release(worker, reuse=reuse)
        return cast(T, self._result(reply, label, worker.pid))  # what fn returned, pickled across

    def _await(self, worker: _Worker, label: str, timeout_s: float) -> tuple[Any, ...]:
        """The worker's reply to the request just sent, or the error that replaces it."""
        ready = wait([worker.conn, worker.sentinel], timeout=timeout_s)
        if worker.conn in ready:
            try:
                return worker.conn.recv()  # type: ignore[no-any-return]
            except (EOFError, OSError):
                pass  # it died as it answered: handled as a death below
        if not ready:
            worker.kill()
            worker.reap()
            if self._pool.closed:
                raise _stopped(label)
            raise DecodeError(
                f"{label}: decoding took longer than {timeout_s:g} s and was stopped (limits.decode_timeout_s)"
            )
        status = worker.reap()
        if worker.killed_on_close or self._pool.closed:
            raise _stopped(label)
        if status == -signal.SIGKILL:
            raise _oom_killed(label, self.memory_bytes)
        raise _crashed(label, status)

    def _result(self, reply: tuple[Any, ...], label: str, pid: int) -> Any:
        tag = reply[0]
        if tag == "ok":
            return reply[1]
        if tag == "raised":
            raise reply[1]
        if tag == "oserror":
            _, number, strerror, filename, filename2 = reply
            error = OSError(number, strerror, filename, None, filename2)  # the subclass for the errno, as os gives
            error.add_note(f"in decoder process {pid}")
            raise error
        if tag == "oom":
            raise _too_large(label, self.memory_bytes)
        if tag == "failed":
            _, type_name, message, remote_tb = reply
            failed = DecodeError(f"{label}: decoding failed: {type_name}" + (f": {message}" if message else ""))
            failed.add_note(f"in decoder process {pid}:\n{remote_tb.rstrip()}")
            raise failed
        raise AssertionError(f"unexpected reply from decoder process: {tag!r}")


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, process: BaseProcess, conn: Connection, memory_bytes: int | None) -> None:
        self.process = process
        self.conn = conn
        #: The memory limit it runs under (set when it started).
        self.memory_bytes = memory_bytes
        self.pid: int = process.pid or 0
        self.sentinel: int = process.sentinel
        self.calls = 0
        #: Set when we sent SIGKILL because the isolator closed (a timeout kills too, but is reported as a timeout).
        self.killed_on_close = False
        self._lock = threading.Lock()
        self._status: int | None = None
        self._reaped = False

    def stop(self) -> None:
        """Ask an idle worker to exit (it also exits when it sees the pipe close)."""
        with self._lock:
            if self._reaped:
                return
            with contextlib.suppress(OSError):
                self.conn.send_bytes(_STOP)

    def kill(self, *, closing: bool = False) -> None:
        with self._lock:
            if self._reaped:
                return
            if closing:
                self.killed_on_close = True
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    @property
    def status(self) -> int | None:
        """The exit status once reaped: negative for a signal, 255 when the forkserver could not tell."""
        return self._status

    def reap(self, timeout: float = REAP_TIMEOUT_S) -> int | None:
        """Wait for the process to end, killing it if it will not within ``timeout``; returns its exit status.

        Safe to call from several threads: the forkserver reports the exit status once, on the sentinel.
        """
        with self._lock:
            if not self._reaped:
                self.process.join(timeout)
                if self.process.exitcode is None:
                    with contextlib.suppress(ProcessLookupError):
                        self.process.kill()
                    self.process.join(REAP_TIMEOUT_S)
                self._status = self.process.exitcode
                self._reaped = True
            return self._status

    def dispose(self) -> None:
        """Release the pipe and the process handle; only the worker's current owner calls this, after ``reap``."""
        self.conn.close()
        if self._status is not None:  # a process that would not die keeps its handle: close() would raise
            self.process.close()


class _Pool:
    """The workers and their bookkeeping, shared by all calling threads."""

    def __init__(
        self, *, workers: int, memory_bytes: int | None, name: str, max_calls: int, preload: tuple[str, ...], nice: int
    ) -> None:
        self._ctx = get_context("forkserver")
        # The forkserver (one per process, started with the first worker) imports them too: each worker forked
        # from it then starts with them loaded, in pages it shares with its siblings, instead of spending 0.2 s of
        # CPU on PIL, PyAV and libheif at every start and every replacement. A failed import there is ignored by
        # multiprocessing; the worker's own import below reports it.
        if preload:
            self._ctx.set_forkserver_preload(list(preload))
        self._size = workers
        self._memory_bytes = memory_bytes
        self._name = name
        self._max_calls = max_calls
        self._preload = preload
        self._nice = nice
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        #: Every worker not yet reaped, including ones starting or being retired.
        self._all: set[_Worker] = set()
        #: Workers counted against ``workers``: idle, busy, or starting.
        self._live = 0
        self._serial = itertools.count(1)
        self.closed = False

    def acquire(self, label: str) -> _Worker:
        """An idle worker, or a new one while there are fewer than ``workers``; otherwise wait for one."""
        with self._cond:
            while True:
                if self.closed:
                    raise _stopped(label)
                while self._idle:
                    worker = self._idle.pop()
                    if worker.process.is_alive():
                        return worker
                    self._live -= 1
                    self._all.discard(worker)
                    worker.reap()  # died while idle (killed from outside): already dead, so this does not block
                    worker.dispose()
                if self._live < self._size:
                    self._live += 1
                    serial = next(self._serial)
                    break
                self._cond.wait()
        try:
            return self._start(serial, label)
        except BaseException:
            with self._cond:
                self._live -= 1
                self._cond.notify()
            raise

    def set_memory(self, memory_bytes: int | None) -> None:
        """Workers started from now on get ``memory_bytes``; idle ones under another limit are stopped now, busy ones
        when their call returns."""
        with self._cond:
            self._memory_bytes = memory_bytes
            stale = [w for w in self._idle if w.memory_bytes != memory_bytes]
            self._idle = [w for w in self._idle if w.memory_bytes == memory_bytes]
            self._live -= len(stale)
            self._all.difference_update(stale)
            self._cond.notify_all()
        for worker in stale:
            worker.stop()
            worker.reap(STOP_GRACE_S)
            worker.dispose()

    def fill(self) -> None:
        """Start workers until there are ``workers`` of them; stop quietly at the first that cannot start."""
        while True:
            with self._cond:
                if self.closed or self._live >= self._size:
                    return
                self._live += 1
                serial = next(self._serial)
            try:
                worker = self._start(serial, "decoder start-up")
            except (MmwatchdError, OSError):  # closed meanwhile, or a start that fails: the next call reports it
                with self._cond:
                    self._live -= 1
                    self._cond.notify()
                return
            with self._cond:
                if not self.closed:  # else close() has already dealt with it: it was in _all
                    self._idle.append(worker)
                    self._cond.notify()

    def release(self, worker: _Worker, *, reuse: bool) -> None:
        """Return a worker after a call; one that failed, is used up or outlived the pool is retired."""
        worker.calls += 1
        with self._cond:
            keep = (
                reuse and not self.closed and worker.calls < self._max_calls
                and worker.memory_bytes == self._memory_bytes
            )  # fmt: skip
            if keep:
                self._idle.append(worker)
            else:
                self._live -= 1
                self._all.discard(worker)
            self._cond.notify()
        if not keep:
            worker.stop()
            worker.reap(STOP_GRACE_S)
            worker.dispose()

    def close(self) -> None:
        """Stop idle workers, kill busy and starting ones, and wait until every one has exited.

        Busy workers' pipes stay open: their callers are waiting on them, and release them once they see the death.
        """
        with self._cond:
            self.closed = True
            idle, self._idle = self._idle, []
            workers = list(self._all)
            self._all.clear()
            self._cond.notify_all()
        for worker in workers:
            if worker in idle:
                worker.stop()
            else:
                worker.kill(closing=True)
        for worker in workers:
            worker.reap(STOP_GRACE_S)
        for worker in idle:
            worker.dispose()

    def _start(self, serial: int, label: str) -> _Worker:
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main,
            args=(child_end, self._memory_bytes, self._preload, self._name, self._nice),
            name=f"{self._name}-{serial}",
            daemon=True,
        )
        try:
            process.start()
        finally:
            child_end.close()  # the worker has its own copy; ours would keep the pipe open after the worker dies
        worker = _Worker(process, parent_end, self._memory_bytes)
        with self._cond:
            closed = self.closed
            if not closed:
                self._all.add(worker)
        if closed:
            worker.kill()
            worker.reap()
            worker.dispose()
            raise _stopped(label)
        ready = wait([parent_end, worker.sentinel], timeout=START_TIMEOUT_S)
        hello: tuple[Any, ...] | None = None
        if parent_end in ready:
            with contextlib.suppress(EOFError, OSError):
                hello = parent_end.recv()
        if hello is not None and hello[0] == "ready":
            return worker
        with self._cond:
            self._all.discard(worker)
        if not ready:
            worker.kill()
        status = worker.reap()
        worker.dispose()
        if self.closed:
            raise _stopped(label)
        if hello is not None and hello[0] == "raised":  # a preload import raised one of ours
            detail = str(hello[1])
        elif hello is not None:  # ("failed", type, message, traceback): setting a limit or a preload import failed
            detail = f"{hello[1]}: {hello[2]}"
        elif not ready:
            detail = f"it did not start within {START_TIMEOUT_S:g} s"
        else:
            detail = f"it exited during startup ({_describe_status(status)})"
        raise DecodeError(f"{label}: the decoder process could not start: {detail}")


#: Private multiprocessing state this module relies on, by object and attribute: Python has no public way to stop the
#: forkserver or the resource tracker (``ForkServer._stop()`` and ``ResourceTracker._stop()`` are private too, and
#: wait without a timeout), nor to let a child drop its copy of the forkserver's "alive" pipe. tests/test_isolate.py
#: checks every name on the Python it runs on, so that a Python that changes them fails the suite, not the service.
PRIVATE_STDLIB: Final[dict[str, tuple[str, ...]]] = {
    "multiprocessing.forkserver._forkserver": ("_forkserver_pid", "_forkserver_alive_fd", "_forkserver_address"),
    "multiprocessing.resource_tracker._resource_tracker": ("_pid", "_fd"),
}


def stop_shared_processes(timeout_s: float = STOP_GRACE_S) -> None:
    """Stop the two helper processes multiprocessing started for the isolators (the forkserver and the resource
    tracker) and wait for them; call it once every :class:`Isolator` is closed, as the process is about to exit.

    Left to themselves they end a moment *after* this process does (each when its pipe from us closes), which a
    service manager sees as processes outliving the service: systemd SIGKILLs them at every stop (KillMode=mixed).
    Each is told to go the way it would notice our exit, its pipe is closed, and it is waited for; one that does not
    exit within ``timeout_s`` (a worker still holding the tracker's pipe, say) is killed. Other isolators in this
    process would lose their workers: this is for the end of the process only. Uses :data:`PRIVATE_STDLIB`.
    """
    server = forkserver._forkserver
    pid_attr, fd_attr, address_attr = PRIVATE_STDLIB["multiprocessing.forkserver._forkserver"]
    _end_helper(server, pid_attr, fd_attr, timeout_s)
    if hasattr(server, address_attr):
        setattr(server, address_attr, None)
    tracker_pid, tracker_fd = PRIVATE_STDLIB["multiprocessing.resource_tracker._resource_tracker"]
    _end_helper(resource_tracker._resource_tracker, tracker_pid, tracker_fd, timeout_s)


def _end_helper(owner: object, pid_attr: str, fd_attr: str, timeout_s: float) -> None:
    """Close ``owner``'s pipe to a helper process (its signal to exit) and reap the helper, killing it if need be."""
    pid, fd = getattr(owner, pid_attr, None), getattr(owner, fd_attr, None)
    if not isinstance(pid, int) or not isinstance(fd, int):
        return  # never started here (or started by a parent process, which owns it)
    setattr(owner, fd_attr, None)
    setattr(owner, pid_attr, None)
    with contextlib.suppress(OSError):
        os.close(fd)
    deadline = time.monotonic() + timeout_s
    try:
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return
            time.sleep(0.005)
    except ChildProcessError:
        pass  # reaped already


# ---------------------------------------------------------------------------------------------------------------------
# Errors


def _stopped(label: str) -> DecodeError:
    """The isolator was closed (or its forkserver stopped) under a call: nothing is known about the file."""
    error = DecodeError(f"{label}: decoding was interrupted because the decoder processes were stopped (shutdown)")
    error.retryable = True  # the file is not at fault: try it again later
    return error


def _too_large(label: str, memory_bytes: int | None) -> MediaTooLarge:
    if memory_bytes is None:
        return MediaTooLarge(f"{label}: decoding ran out of memory")
    return MediaTooLarge(f"{label}: decoding needed more than {memory_bytes // 2**20} MB (limits.decode_memory_mb)")


def _oom_killed(label: str, memory_bytes: int | None) -> MediaTooLarge:
    # SIGKILL that we did not send: in practice the kernel's OOM killer (a cgroup MemoryMax, or the machine).
    limit = "" if memory_bytes is None else f" (limits.decode_memory_mb is {memory_bytes // 2**20} MB)"
    return MediaTooLarge(f"{label}: the decoder was killed (SIGKILL), most likely for running out of memory{limit}")


def _crashed(label: str, status: int | None) -> DecodeError:
    if status == _STATUS_UNKNOWN:
        return _stopped(label)
    return DecodeError(f"{label}: the decoder crashed ({_describe_status(status)}); the file is probably damaged")


def _describe_status(status: int | None) -> str:
    if status is None:
        return "exit status unknown"
    if status < 0:
        try:
            return signal.Signals(-status).name
        except ValueError:
            return f"signal {-status}"
    return f"exit status {status}"


# ---------------------------------------------------------------------------------------------------------------------
# The worker process

_STOP: Final = b""  # a request of zero bytes asks a worker to exit


def _worker_main(conn: Connection, memory_bytes: int | None, preload: tuple[str, ...], name: str, nice: int) -> None:
    """Entry point of a worker process: set limits, say ready, then serve requests until told to stop."""
    # The daemon owns shutdown: SIGTERM/SIGINT sent to the whole process group or cgroup must not kill a decode
    # halfway; the daemon closes the isolator when it is done.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _prctl_setup(name)
    _release_forkserver()
    if nice:
        with contextlib.suppress(OSError):
            os.nice(nice)
    oom_reply = ForkingPickler.dumps(("oom",))  # made now: there may be no memory to make it when it is needed
    try:
        if memory_bytes is not None:
            resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))
        for module in preload:
            importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - the worker's boundary: the parent reports it
        _reply(conn, _failure(exc))
        return
    if not _reply(conn, ForkingPickler.dumps(("ready", os.getpid()))):
        return
    while True:
        try:
            request = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the daemon is gone or closed the pipe
        if request == _STOP or not _reply(conn, _serve(request, oom_reply)):
            return
        del request


def _reply(conn: Connection, data: bytes | memoryview) -> bool:
    """Send ``data`` to the daemon; False when it is gone (killed, or it gave up on the call and closed the pipe)."""
    try:
        conn.send_bytes(data)
    except OSError:  # BrokenPipeError, ConnectionResetError: nobody left to tell, so exit quietly
        return False
    return True


def _serve(request: bytes, oom_reply: memoryview) -> memoryview:
    """Run one request; the reply is always picklable and never raises (except for exits and crashes, by design)."""
    try:
        fn, args, kwargs = pickle.loads(request)
        return ForkingPickler.dumps(("ok", fn(*args, **kwargs)))
    except MemoryError:
        # Answered after this block: until it ends, the traceback keeps alive the frames that hold the memory.
        pass
    except Exception as exc:  # noqa: BLE001 - the worker's boundary: every other exception is shipped to the parent
        return _failure(exc)
    return oom_reply


def _failure(exc: Exception) -> memoryview:
    """The reply for an exception: MmwatchdErrors themselves, anything else by name and message."""
    if isinstance(exc, MmwatchdError) and (data := _pickled(exc)) is not None:
        return data
    if isinstance(exc, OSError) and isinstance(exc.errno, int) and exc.errno in errno.errorcode:
        # By value, not pickled: a library's OSError subclass (PyAV's) need not exist, or unpickle, in the daemon.
        strerror = str(exc.strerror or os.strerror(exc.errno))
        return ForkingPickler.dumps(("oserror", exc.errno, strerror, _name(exc.filename), _name(exc.filename2)))
    message = str(exc)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 1] + "…"
    remote_tb = "".join(traceback.format_exception(exc))
    return ForkingPickler.dumps(("failed", type(exc).__name__, message, remote_tb))


def _name(filename: object) -> str | bytes | None:
    return filename if isinstance(filename, (str, bytes)) else None


def _pickled(exc: MmwatchdError) -> memoryview | None:
    """The reply carrying ``exc`` itself, or None when it would not arrive intact.

    An exception whose ``__init__`` takes other arguments than its ``args`` pickles but fails to unpickle, which
    would happen in the parent, outside any boundary: try it here.
    """
    try:
        data = ForkingPickler.dumps(("raised", exc))
        pickle.loads(data)
    except Exception:  # noqa: BLE001 - still the worker's boundary: the caller falls back to name and message
        return None
    return data


def _release_forkserver() -> None:
    """Let the forkserver exit when the daemon does, even while this worker lives.

    The forkserver exits once every holder of its "alive" pipe has closed it, and hands each child a copy so that the
    child could use it in turn. A worker never does; holding the copy would keep the forkserver (its parent) alive
    after the daemon died, and so the parent-death signal that stops a hung worker would never come. (One of the
    :data:`PRIVATE_STDLIB` names.)
    """
    server = forkserver._forkserver
    fd = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(fd, int):
        os.close(fd)
        server._forkserver_alive_fd = None  # type: ignore[attr-defined]  # private: see PRIVATE_STDLIB


def _prctl_setup(name: str) -> None:
    """Die with the parent (the forkserver, which exits when the daemon does), and show ``name`` in ps/top."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
