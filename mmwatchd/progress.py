"""Progress of a long run: a live bar on a terminal, a log line every ``progress_interval_s`` otherwise.

A first scan of a library against a local model takes hours; people need to see it move. On a terminal (stderr is a
TTY) a tqdm bar shows done/total, failed, in flight, rate, ETA and the endpoint's state, and log lines written
meanwhile go through :func:`mmwatchd.log.route`, which clears the bar, writes the line and draws the bar again, so
neither is garbled. Anywhere else (journald, CI, a pipe) the same numbers come as a ``progress`` log line every
``progress_interval_s``, counted on the daemon's clock, and none at all for a run that ends sooner: a short scan's
log stays as it was.

The numbers come from :meth:`mmwatchd.daemon.Daemon.progress`; one thread here samples them twice a second.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from mmwatchd import log as log_mod

log = log_mod.get_logger()

#: How often the bar is redrawn, and the clock looked at for the next log line (seconds of real time).
TICK_S = 0.5
#: The rate is what was finished over the last this many seconds (of the daemon's clock): it follows a change of
#: pace (the endpoint slowing down, a run of videos) within a minute, and a single slow file does not swing it.
RATE_WINDOW_S = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """Where a run stands. ``done`` counts every file finished, whatever became of it (described, failed, up to
    date); ``total`` is None while the walk that finds the files is still going."""

    done: int
    failed: int
    in_flight: int
    total: int | None
    #: What the endpoint is doing for us: "up", "checking", "waiting for the endpoint", "rate-limited", "paused".
    endpoint: str


class Rate:
    """Files per second over the last :data:`RATE_WINDOW_S` of ``clock``, and the time left at that pace."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._seen: deque[tuple[float, int]] = deque()

    def add(self, done: int) -> float | None:
        """Record ``done`` now; return files per second (None until two samples differ in time)."""
        now = self.clock()
        self._seen.append((now, done))
        while len(self._seen) > 2 and self._seen[1][0] <= now - RATE_WINDOW_S:
            self._seen.popleft()
        t0, d0 = self._seen[0]
        if now <= t0:
            return None
        return (done - d0) / (now - t0)

    @staticmethod
    def eta(snap: Snapshot, rate: float | None) -> float | None:
        if snap.total is None or not rate:
            return None
        return max(0, snap.total - snap.done) / rate


def fields(snap: Snapshot, rate: float | None, eta: float | None) -> dict[str, Any]:
    """The numbers of a ``progress`` log line."""
    return {
        "done": snap.done,
        "total": snap.total,
        "failed": snap.failed,
        "in_flight": snap.in_flight,
        "rate_per_min": None if rate is None else round(rate * 60, 1),
        "eta_s": None if eta is None else round(eta),
        "endpoint": snap.endpoint,
    }


def postfix(snap: Snapshot, rate: float | None, eta: float | None) -> str:
    """What the bar shows after the counts."""
    parts = [f"{snap.failed} failed", f"{snap.in_flight} in flight"]
    if rate is not None:
        parts.append(f"{rate * 60:.1f}/min")
    if eta is not None:
        parts.append(f"ETA {_duration(eta)}")
    if snap.endpoint != "up":
        parts.append(snap.endpoint)
    return ", ".join(parts)


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}:{s % 60:02d}"


class Reporter:
    """Shows a run's progress until :meth:`close`: a bar when ``stream`` is a terminal, else periodic log lines.

    ``snapshot`` is called from the reporter's own thread; ``clock`` is the daemon's (tests drive it).
    ``interval_s`` 0 turns the log lines off; ``until`` ends the reporting early (``run``: the startup backlog is
    through), after which the service's own log and ``STATUS=`` say how it goes.
    """

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        *,
        clock: Callable[[], float],
        interval_s: float,
        stream: IO[str] | None = None,
        tty: bool | None = None,
        label: str = "scan",
        until: Callable[[Snapshot], bool] | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.clock = clock
        self.interval_s = interval_s
        self.stream = stream or sys.stderr
        self.tty = _isatty(self.stream) if tty is None else tty
        self.label = label
        self.until = until
        self.lines = 0  # progress log lines written
        self._rate = Rate(clock)
        self._last_line = clock()  # the first line comes one interval after the start, or never
        self._stop = threading.Event()
        self._bar: Any = None
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Reporter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if self.tty:
            self._bar = _make_bar(self.stream, self.label, self.snapshot().total)
            log_mod.route(self._bar.write_line)
        if self.tty or self.interval_s > 0:
            self._thread = threading.Thread(target=self._run, name="mmwatchd-progress", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop; a bar is drawn a last time with the final numbers and left on the screen."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._finish()

    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            if self.tick():
                break

    def tick(self) -> bool:
        """Sample once: redraw the bar, or write a log line when ``interval_s`` has passed since the last.
        True once ``until`` says the reporting is over."""
        snap = self.snapshot()
        rate = self._rate.add(snap.done)
        eta = Rate.eta(snap, rate)
        if self._bar is not None:
            with self._lock:
                if not self._closed:
                    self._bar.show(snap, postfix(snap, rate, eta))
        elif self.interval_s > 0 and self.clock() - self._last_line >= self.interval_s:
            self._last_line = self.clock()
            self.lines += 1
            log.info("progress", what=self.label, **fields(snap, rate, eta))
        if self.until is not None and self.until(snap):
            if self._bar is None and self.interval_s > 0 and self.lines:
                # The lines stop here: say that it is because the work is through, not because something hangs.
                log.info("progress.done", what=self.label, **fields(snap, rate, eta))
            self._finish()
            return True
        return False

    def _finish(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            bar, self._bar = self._bar, None
        if bar is None:
            return
        snap = self.snapshot()
        rate = self._rate.add(snap.done)
        if snap.total is None:
            snap = Snapshot(done=snap.done, failed=snap.failed, in_flight=snap.in_flight, total=snap.done,
                            endpoint=snap.endpoint)  # fmt: skip
        bar.show(snap, postfix(snap, rate, Rate.eta(snap, rate)))
        log_mod.route(None)
        bar.close()


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _make_bar(stream: IO[str], label: str, total: int | None) -> _Bar:
    from tqdm import tqdm

    class _Tqdm(tqdm):  # type: ignore[type-arg]  # generic in types-tqdm only: tqdm[...] fails at run time
        monitor_interval = 0  # no monitor thread: the reporter's own thread redraws the bar

    # A terminal that says it is 0 columns wide and 0 rows high (a pty nobody sized) would get no bar: assume 100x24.
    sized = _columns(stream) > 0
    return _Bar(_Tqdm(total=total, desc=label, unit="file", file=stream, dynamic_ncols=sized,
                      ncols=None if sized else 100, nrows=None if sized else 24, leave=True, mininterval=0,
                      bar_format=_FORMAT_COUNTING if total is None else _FORMAT_TOTAL),
                stream)  # fmt: skip


def _columns(stream: IO[str]) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


#: Until the walk ends the total is unknown: a counter. Then a bar with the percentage. tqdm's own rate and ETA are
#: not used: ours come from the daemon's clock and a window that ignores the time before the first answer.
_FORMAT_COUNTING = "{desc}: {n_fmt} done, still finding files{postfix}"
_FORMAT_TOTAL = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}"


class _Bar:
    """A tqdm bar, and the way log lines get past it."""

    def __init__(self, bar: Any, stream: IO[str]) -> None:
        self.bar = bar
        self.stream = stream

    def show(self, snap: Snapshot, extra: str) -> None:
        bar = self.bar
        if snap.total is not None and bar.total != snap.total:
            bar.total = snap.total
            bar.bar_format = _FORMAT_TOTAL
        bar.n = snap.done
        bar.set_postfix_str(extra, refresh=False)
        bar.refresh()

    def write_line(self, text: str) -> None:
        """Write a log line above the bar (``text`` ends in a newline)."""
        self.bar.write(text.rstrip("\n"), file=self.stream)

    def close(self) -> None:
        self.bar.close()
