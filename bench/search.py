"""Row 8 of ``bench/run.py``: ``mmwatchd search`` over 100,000 descriptions (10,000 with ``--quick``).

The tree holds sidecars only (the index reads sidecars, never media): ``n`` of them in 100 folders, shaped like the
README's sidecar (a schema reply with a caption and tags, media facts, usage), each with a caption and tags drawn
from a small vocabulary with a fixed seed, so common words match thousands of files and rare ones a few. Cached
under the bench cache like the other inputs.

- 8a index build, ``mmwatchd search --reindex`` in a subprocess, vs a Python subprocess that walks the same tree
  and ``json.load``s every sidecar (the least any index of them must do). Target: 100,000 in a minute or less.
- 8b one query on the built index (median over a mix of queries: common, rare, several words, a path), vs
  ``SELECT count(*)`` over the same index in the same connection. Target: well under a second.
- 8c the whole ``mmwatchd search`` command on an up-to-date index (start-up, the freshness walk that stats every
  sidecar, the query), vs a bare scandir+stat walk of the tree in a Python subprocess.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import inputs

ADJECTIVES = "brown black white small large old young wet sleepy happy red blue green golden foggy snowy".split()
NOUNS = ("dog cat horse child woman man bicycle car boat tree house bridge mountain lighthouse kite cake guitar "
         "train bird flower").split()  # fmt: skip
VERBS = "runs sits stands sleeps waits plays rests walks jumps leans".split()
PLACES = ("beach park street kitchen garden forest harbour field lake station market river desert snow "
          "playground").split()  # fmt: skip
TIMES = "at sunset|at dawn|in the rain|at night|under a clear sky|in warm light|in the fog".split("|")
QUERIES = ("dog on a beach", "lighthouse", "sleepy cat in the kitchen", "golden horse", "IMG_004217", "snow",
           "red bicycle near the river", "foggy harbour at dawn")  # fmt: skip
DIRS = 100
_READ_ALL = """
import json, os, sys
def walk(d):
    n = 0
    with os.scandir(d) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                n += walk(e.path)
            elif e.name.endswith(".json"):
                with open(e.path, "rb") as fh:
                    json.loads(fh.read())
                n += 1
    return n
print(walk(sys.argv[1]))
"""


def _sidecar(rng: random.Random, name: str, i: int) -> dict[str, Any]:
    adj, noun, verb, place = rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(VERBS), rng.choice(PLACES)
    other = rng.choice(NOUNS)
    caption = (
        f"A {adj} {noun} {verb} near the {place} {rng.choice(TIMES)}. In the background a "
        f"{rng.choice(ADJECTIVES)} {other} and some people; the colours are muted and the horizon is level."
    )
    tags = sorted({noun, place, other, rng.choice(ADJECTIVES), rng.choice(["outdoor", "indoor", "travel", "family"])})
    data = {"caption": caption, "tags": tags}
    return {
        "mmwatchd": {"version": "0.1.0", "schema": 1},
        "source": {"name": name, "size": 3_000_000 + i, "mtime_ns": 1_717_243_200_000_000_000 + i, "sha256": "0" * 64},
        "status": "ok",
        "rule": "photos",
        "model": "qwen2.5vl:7b",
        "fingerprint": "sha256:" + "1" * 64,
        "media": {"kind": "image", "format": "JPEG", "width": 4032, "height": 3024, "taken": "2024-06-01 12:00:00",
                  "parts": [{"type": "image_url", "mime": "image/jpeg", "width": 1536, "height": 1152,
                             "bytes": 412345, "url_bytes": 549817, "origin": "encoded", "quality": 85}],
                  "request_bytes": 550321, "max_request_bytes": 20000000},
        "response": {"text": json.dumps(data), "data": data, "finish_reason": "stop",
                     "usage": {"prompt_tokens": 1234, "completion_tokens": 56, "total_tokens": 1290},
                     "source": "content", "attempts": 1, "latency_s": 2.31},
        "elapsed_s": 2.5,
        "created": "2026-11-27T10:00:00Z",
    }  # fmt: skip


def tree(n: int) -> Path:
    """``n`` sidecars in :data:`DIRS` folders (cached)."""
    base = inputs.CACHE / f"search-{n}x{DIRS}"
    root = base / "tree"
    if (base / "done").exists():
        return root
    rng = random.Random(inputs.SEED)
    per = n // DIRS
    for j in range(DIRS):
        folder = root / f"d{j:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per):
            i = j * per + k
            name = f"IMG_{i:06d}.jpg"
            (folder / f"{name}.json").write_text(json.dumps(_sidecar(rng, name, i), indent=2) + "\n")
    (base / "done").write_text("")
    return root


def row(report: Any, n: int, work: Path, bench: Any) -> None:
    """Add rows 8a-8c to ``report`` (see the module docstring); ``bench`` is the runner module (its Row, run_child,
    formatting and walk helpers)."""
    bench.progress(f"8. search: {n} sidecars in {DIRS} folders")
    root = tree(n)
    bench._warm(root)
    config = bench.write_config(work / "search", base_url="http://127.0.0.1:9/v1", inbox=root, concurrency=None)
    read_all = [sys.executable, "-c", _READ_ALL, str(root)]
    ref1 = bench.run_child(read_all, cwd=work, timeout=900)
    build = bench.run_child(bench.mmwatchd("search", "-c", str(config), "--reindex", "--json", "dog beach"),
                            cwd=config.parent, timeout=1800)  # fmt: skip
    ref2 = bench.run_child(read_all, cwd=work, timeout=900)
    if build.rc != 0:
        raise RuntimeError(f"search: mmwatchd search --reindex exited {build.rc}: {build.stderr[-500:]}")
    ref = min(ref1.wall_s, ref2.wall_s)
    report.add(bench.Row("8a", f"search index built from {n} sidecars (`mmwatchd search --reindex`)",
                         bench.fmt_s(build.wall_s),
                         f"{bench.fmt_s(ref)} (walk + json.load of all {ref1.stdout.strip()} sidecars, "
                         "Python subprocess)",
                         build.wall_s / ref, None, "<= 60 s for 100,000", met=build.wall_s * 100_000 / n <= 60,
                         miss=f"{build.wall_s * 100_000 / n:.0f} s per 100,000"))  # fmt: skip

    from mmwatchd import config as config_mod
    from mmwatchd.search import SearchIndex, index_path

    with SearchIndex(index_path(config_mod.load(config))) as index:
        counted = _median(lambda: index._conn.execute("SELECT count(*) FROM docs").fetchone())
        hits = {q: len(index.search(q, limit=20)) for q in QUERIES}
        timed = {q: _median(lambda q=q: index.search(q, limit=20)) for q in QUERIES}
    query = statistics.median(timed.values())
    report.add(bench.Row("8b", f"one search query, top 20 of {n} (median of {len(QUERIES)} queries)",
                         f"{query * 1000:.1f} ms", f"{counted * 1e6:.0f} us (SELECT count(*) over the same index)",
                         query / counted, None, "<< 1 s", met=max(timed.values()) < 0.25,
                         miss=f"slowest {bench.fmt_s(max(timed.values()))}"))  # fmt: skip
    report.note(
        "8b: "
        + "; ".join(f"{q!r} {timed[q] * 1000:.1f} ms ({hits[q]} shown)" for q in QUERIES)
        + f"; SELECT count(*) {counted * 1e6:.0f} us"
    )

    walk = [sys.executable, "-c", bench._WALK, str(root)]
    wref = bench.run_child(walk, cwd=work, timeout=600)
    cli = bench.run_child(bench.mmwatchd("search", "-c", str(config), "dog on a beach"), cwd=config.parent,
                          timeout=600)  # fmt: skip
    wref2 = bench.run_child(walk, cwd=work, timeout=600)
    check = bench.run_child(bench.mmwatchd("check", "-c", str(config)), cwd=config.parent, timeout=600)
    if cli.rc != 0:
        raise RuntimeError(f"search: mmwatchd search exited {cli.rc}: {cli.stderr[-500:]}")
    w = min(wref.wall_s, wref2.wall_s)
    report.add(bench.Row("8c", f"`mmwatchd search` whole command, index up to date ({n} sidecars checked)",
                         bench.fmt_s(cli.wall_s),
                         f"{bench.fmt_s(w)} (scandir walk + stat of the tree, Python subprocess)",
                         cli.wall_s / w, None, "-"))  # fmt: skip
    report.note(
        f"8: build {build.wall_s / n * 1e6:.0f} us/sidecar, peak RSS {bench.fmt_mb(build.maxrss)}; the whole "
        f"command {bench.fmt_s(cli.wall_s)}, of which start-up and loading the config take "
        f"{bench.fmt_s(check.wall_s)} (`mmwatchd check`, same config)"
    )


def _median(fn: Any, rounds: int = 15) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
