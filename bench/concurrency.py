"""Row 10 of the bench: ``concurrency: auto`` against a server that batches like a GPU server.

    python bench/concurrency.py [--quick]        (or: python bench/run.py --only concurrency)

:class:`BatchingServer` serves at most ``capacity`` chat requests at a time, each for ``latency_s`` (from the moment
its turn comes), and queues the rest in arrival order: per-request latency is flat up to the capacity and grows past
it, which is what vLLM or TGI do once their batch is full. Its peak throughput is ``capacity / latency_s``.

The real daemon path runs against it: ``mmwatchd scan`` in a subprocess (decoder processes, the openai client, the
real loopback HTTP server), on small JPEGs, with ``concurrency: auto`` (``max_concurrency`` 32). Measured at the
server, in the same run:

10a  capacity 16, auto: throughput from the first request to the last answer, vs the peak (target >= 0.9x)
10b  same, over the second half of the answers (after the limit was found)
10c  same run: p95 of the time from a request's arrival to its answer (queueing included), vs the unloaded latency
     (the median of the reference run below, which never queues; target <= 2x)
10d  capacity 2, auto: the most requests the server ever held at once (target <= 3)
10e  reference: today's default, a fixed concurrency of 4, against the capacity-16 server (about 0.25x)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import inputs
from server import _NAME, _REPLY, FixedLatencyServer, Hit, _Handler

#: Each answer's time once its turn comes. Long enough that the loopback, the client and a busy machine add little
#: to it, short enough that a run of a few hundred requests per slot fits in a minute.
LATENCY_S = 0.5
MAX_CONCURRENCY = 32


@dataclass(frozen=True, slots=True)
class Served:
    """One chat request at the batching server: arrival, when its turn came, when it was answered."""

    arrived: float
    served: float
    answered: float


class BatchingServer(FixedLatencyServer):
    """``capacity`` requests worked on at once for ``delay_s`` each; the rest wait in arrival order."""

    def __init__(self, capacity: int, delay_s: float = LATENCY_S) -> None:
        super().__init__(delay_s)
        self.capacity = capacity
        self.served: list[Served] = []
        self._turns = threading.Condition()
        self._busy = 0
        self._next_ticket = 0
        self._now_serving = 0

    def reset(self) -> None:
        super().reset()
        with self._lock:
            self.served.clear()

    def _wait_turn(self) -> None:
        with self._turns:
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._now_serving or self._busy >= self.capacity:
                self._turns.wait()
            self._now_serving += 1
            self._busy += 1
            self._turns.notify_all()

    def _done(self) -> None:
        with self._turns:
            self._busy -= 1
            self._turns.notify_all()


class _BatchingHandler(_Handler):
    def do_POST(self) -> None:
        started = time.time()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        arrived = time.time()
        owner: BatchingServer = self.server.owner  # type: ignore[assignment]
        with owner._lock:
            owner.in_flight += 1
            owner.peak_in_flight = max(owner.peak_in_flight, owner.in_flight)
        try:
            owner._wait_turn()
            served = time.time()
            try:
                time.sleep(owner.delay_s)
            finally:
                owner._done()
            self._send(200, _REPLY)
        finally:
            with owner._lock:
                owner.in_flight -= 1
        answered = time.time()
        match = _NAME.search(body, 0, 8192)
        name = match.group(1).decode("utf-8", "replace") if match else ""
        with owner._lock:
            owner.served.append(Served(arrived, served, answered))
        owner._record(Hit(started=started, arrived=arrived, answered=answered, body_bytes=len(body), name=name))


def _serve(server: BatchingServer) -> BatchingServer:
    server.__enter__()
    assert server._server is not None
    server._server.RequestHandlerClass = _BatchingHandler
    return server


@dataclass(frozen=True, slots=True)
class Measured:
    throughput: float  # answers per second, first arrival to last answer
    steady: float  # the same over the second half of the answers
    p95: float  # arrival to answer
    median: float
    peak_in_flight: int
    requests: int
    wall_s: float
    limit: str  # the limit the scan's metrics ended at


def measure(capacity: int, concurrency: int | str, files: list[Path], work: Path) -> Measured:
    """One ``mmwatchd scan`` of ``files`` against a fresh :class:`BatchingServer`."""
    import run  # bench/run.py: the config, the child process, the table

    server = _serve(BatchingServer(capacity))
    try:
        folder = work / f"c{capacity}-{concurrency}"
        inbox = folder / "inbox"
        inputs.link_into(files, inbox)
        config = run.write_config(folder, base_url=server.base_url, inbox=inbox, concurrency=None)
        doc = config.read_text().replace("  max_retries: 0\n", f"  max_retries: 0\n  concurrency: {concurrency}\n")
        if concurrency == "auto":
            doc = doc.replace("  concurrency: auto\n", f"  concurrency: auto\n  max_concurrency: {MAX_CONCURRENCY}\n")
        config.write_text(doc)
        prom = folder / "metrics.prom"
        child = run.run_child(run.mmwatchd("scan", "-c", str(config), "--metrics-textfile", str(prom)), cwd=folder,
                              timeout=900)  # fmt: skip
        run.check_scan(child, f"concurrency {concurrency}, capacity {capacity}")
        served = sorted(server.served, key=lambda s: s.answered)
        peak = server.peak_in_flight
    finally:
        server.__exit__(None, None, None)
    first = min(s.arrived for s in served)
    last = served[-1].answered
    half = len(served) // 2
    latencies = sorted(s.answered - s.arrived for s in served)
    limit = next((line.split()[-1] for line in prom.read_text().splitlines()
                  if line.startswith("mmwatchd_concurrency_limit{")), "?")  # fmt: skip
    return Measured(
        throughput=len(served) / (last - first),
        steady=(len(served) - half) / (last - served[half - 1].answered),
        p95=latencies[int(len(latencies) * 0.95)],
        median=latencies[len(latencies) // 2],
        peak_in_flight=peak,
        requests=len(served),
        wall_s=child.wall_s,
        limit=limit,
    )


def row_concurrency(report: Any, size: Any, work: Path) -> None:
    """The rows, added to bench/run.py's report (whatever module it was loaded as)."""
    Row = sys.modules[type(report).__module__].Row
    wide_n = 4 * size.throughput_files  # 1200 full, 480 quick: about 40 (20) round trips per slot
    narrow_n = size.throughput_files // 2
    progress = sys.modules[type(report).__module__].progress
    progress(f"10. concurrency: auto vs a batching server ({LATENCY_S} s per answer): {wide_n} files at capacity 16, "
             f"{narrow_n} at capacity 2, and the fixed default of 4 at capacity 16")  # fmt: skip
    files = inputs.small(wide_n)
    ref = measure(16, 4, files[:narrow_n], work)
    wide = measure(16, "auto", files, work)
    narrow = measure(2, "auto", files[:narrow_n], work)
    peak = 16 / LATENCY_S
    unloaded = ref.median
    what = f"auto vs a 16-wide server, {wide.requests} files"
    report.add(Row("10a", what + ", throughput, first request to last answer", f"{wide.throughput:.1f}/s",
                   f"{peak:.1f}/s (peak: 16 / {LATENCY_S} s)", wide.throughput / peak, None, ">= 0.90x",
                   met=wide.throughput / peak >= 0.9))  # fmt: skip
    report.add(Row("10b", "same, second half of the answers (limit found)", f"{wide.steady:.1f}/s", f"{peak:.1f}/s",
                   wide.steady / peak, None, ">= 0.90x", met=wide.steady / peak >= 0.9))  # fmt: skip
    report.add(Row("10c", "same, p95 latency at the server (queueing included)", f"{wide.p95 * 1000:.0f} ms",
                   f"{unloaded * 1000:.0f} ms (unloaded: median of 10e)", wide.p95 / unloaded, 2.0, "<= 2x"))  # fmt: skip
    report.add(Row("10d", f"auto vs a 2-wide server, {narrow.requests} files: most in flight at the server",
                   str(narrow.peak_in_flight), "3 (capacity + 1)", narrow.peak_in_flight / 3, 1.0, "<= 3",
                   met=narrow.peak_in_flight <= 3))  # fmt: skip
    report.add(Row("10e", f"reference: fixed concurrency 4 (the default) vs the 16-wide server, {ref.requests} files",
                   f"{ref.throughput:.1f}/s", f"{peak:.1f}/s", ref.throughput / peak, None, "about 0.25x"))  # fmt: skip
    report.note(
        f"10: capacity 16: {wide.requests} requests in {wide.wall_s:.1f} s, median {wide.median * 1000:.0f} ms, "
        f"most in flight {wide.peak_in_flight}, limit at the end {wide.limit}; capacity 2: "
        f"{narrow.throughput / (2 / LATENCY_S):.2f}x its peak throughput, p95 {narrow.p95 * 1000:.0f} ms, limit at "
        f"the end {narrow.limit}; fixed 4: p95 {ref.p95 * 1000:.0f} ms, most in flight {ref.peak_in_flight}"
    )


def main(argv: list[str] | None = None) -> int:
    import run

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer files (about a minute)")
    args = parser.parse_args(argv)
    report = run.Report()
    work = Path(tempfile.mkdtemp(prefix="mmwatchd-bench-concurrency-"))
    try:
        row_concurrency(report, run.QUICK if args.quick else run.FULL, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(run.render(report, markdown=False))
    print()
    for note in report.notes:
        print(f"- {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
