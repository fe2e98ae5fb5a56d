"""Full-size flood: N small files dropped at once into a watched folder (default 10,000).

    python tests/stress/flood.py [--files 10000] [--concurrency 8]

Checks that every file is sent exactly once and reports the daemon's peak memory (VmHWM), the queue bound and the
time taken. Not part of the default test run (the suite runs the same scenario with 1,000 files); the README's
Reliability section quotes its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parents[2])]

from configs import write_config  # noqa: E402
from fakevlm import FakeVLM  # noqa: E402
from media import make_jpeg  # noqa: E402


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    n = args.files
    with tempfile.TemporaryDirectory() as tmp_name, FakeVLM() as fake:
        tmp = Path(tmp_name)
        cfg = write_config(tmp, base_url=fake.base_url, endpoint={"concurrency": args.concurrency},
                           rule={"prompt": "{name}"})  # fmt: skip
        inbox, staging = tmp / "inbox", tmp / "staging"
        staging.mkdir()
        tiny = make_jpeg(tmp / "tiny.jpg", (16, 12)).read_bytes()
        for i in range(n):
            (staging / f"{i:06}.jpg").write_bytes(tiny)
        with open(tmp / "run.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mmwatchd", "run", "-c", str(cfg), "--log-format", "json"], cwd=tmp,
                env={**os.environ, "PYTHONPATH": str(HERE.parents[2])}, stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        time.sleep(1.5)
        t0 = time.monotonic()
        for i in range(n):
            os.rename(staging / f"{i:06}.jpg", inbox / f"{i:06}.jpg")
        deadline = t0 + max(120, n / 20)
        peak = 0.0
        while len(fake.chat_requests) < n and time.monotonic() < deadline:
            time.sleep(0.5)
            peak = max(peak, peak_rss_mb(proc.pid))
        elapsed = time.monotonic() - t0
        time.sleep(2)  # late duplicates would show up now
        peak = max(peak, peak_rss_mb(proc.pid))
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        sent = Counter(json.loads(r.content[0]["text"]) for r in fake.chat_requests)
        events = Counter(json.loads(line)["event"] for line in (tmp / "run.log").read_text().splitlines()
                         if line.startswith("{"))  # fmt: skip
        sidecars = sum(1 for p in inbox.iterdir() if p.name.endswith(".json"))
    ok = len(sent) == n and set(sent.values()) == {1} and sidecars == n and proc.returncode == 0
    print(f"files: {n}, sent once each: {len(sent) == n and set(sent.values()) == {1}}, "
          f"duplicates: {sum(v - 1 for v in sent.values())}, sidecars: {sidecars}")  # fmt: skip
    print(f"time: {elapsed:.1f} s ({n / elapsed:.0f} files/s), daemon peak RSS: {peak:.0f} MB (target < 400)")
    print(f"overflow rescans: {events.get('watch.overflow', 0)}, exit code: {proc.returncode}")
    return 0 if ok and peak < 400 else 1


if __name__ == "__main__":
    raise SystemExit(main())
