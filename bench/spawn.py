"""Run a command and report its own wall time and peak RSS: ``python bench/spawn.py [--tree] REPORT.json CMD...``.

Linux starts a forked child's peak RSS (``ru_maxrss``) at its parent's size, and exec keeps it; a benchmark process
that holds a few hundred MB of decoded photos would hand that figure to every child it starts. This small process
starts the command itself, so the command's ``ru_maxrss`` is its own (plus at most this stub's ~10 MB), and times it
from fork to exit, leaving Python's start-up of the stub out. The command's stdin/stdout/stderr are this process's.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _kib(text: str, key: str) -> int:
    for line in text.splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def _tree(root: int) -> list[int]:
    """``root`` and its descendants, from the parent ids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _name(status: str, argv: list[bytes]) -> str:
    """The decoder workers name themselves (prctl); multiprocessing's helpers are told apart by their command line."""
    comm = status.split("\n", 1)[0].split(":", 1)[1].strip()
    if comm.startswith("mmwatchd-"):
        return comm
    line = b" ".join(argv)
    for marker, label in ((b"forkserver", "forkserver"), (b"resource_tracker", "resource tracker")):
        if marker in line:
            return label
    return "mmwatchd"


class _Sampler:
    def __init__(self) -> None:
        self.peak_rss = self.peak_pss = self.most = 0
        self.hwm: dict[int, int] = {}
        #: (process name, RSS) of each process at the peak of the summed RSS.
        self.at_peak: list[tuple[str, int]] = []

    def sample(self, root: int) -> None:
        rss = pss = alive = 0
        each: list[tuple[str, int]] = []
        for pid in _tree(root):
            try:
                with open(f"/proc/{pid}/status") as fh:
                    status = fh.read()
                with open(f"/proc/{pid}/smaps_rollup") as fh:
                    rollup = fh.read()
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    argv = fh.read().split(b"\0")
            except OSError:
                continue
            if _kib(status, "VmRSS:") == 0:  # a zombie
                continue
            name = _name(status, argv)
            alive += 1
            rss += _kib(status, "VmRSS:")
            each.append((name, _kib(status, "VmRSS:")))
            pss += _kib(rollup, "Pss:")
            self.hwm[pid] = max(self.hwm.get(pid, 0), _kib(status, "VmHWM:"))
        if rss > self.peak_rss:
            self.peak_rss, self.at_peak = rss, sorted(each, key=lambda e: -e[1])
        self.peak_pss = max(self.peak_pss, pss)
        self.most = max(self.most, alive)


def main() -> int:
    args = sys.argv[1:]
    tree = args[0] == "--tree"
    report, cmd = args[int(tree)], args[int(tree) + 1 :]
    started, t0 = time.time(), time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    sampler = _Sampler()
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG if tree else 0)
        if done:
            break
        sampler.sample(pid)
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    # wait4's usage covers the command and every descendant it reaped (the forkserver reaps the decoder processes).
    cpu = usage.ru_utime + usage.ru_stime
    result = {"rc": rc, "wall_s": wall, "cpu_s": cpu, "started": started, "ended": time.time(),
              "maxrss": usage.ru_maxrss * 1024}  # fmt: skip
    if tree:
        result.update(tree_rss=sampler.peak_rss, tree_pss=sampler.peak_pss, tree_hwm_sum=sum(sampler.hwm.values()),
                      tree_processes=sampler.most, tree_at_peak=sampler.at_peak)  # fmt: skip
    with open(report, "w") as fh:
        json.dump(result, fh)
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    raise SystemExit(main())
