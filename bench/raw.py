"""Row 9 of ``bench/run.py``: camera RAW files, the embedded preview against a half-size demosaic of the same files.

The inputs are the real RAW samples of the shared media corpus (``$MMWATCHD_RAW_SAMPLES``, default
``../shared/media/raw`` next to the checkout; see SOURCES.md there), never copied into the repository: the complete
files mmwatchd decodes (CRW, DNG, NEF, KDC). Each is hard-linked ``copies`` times into a temporary folder under a
new name, so the command's start-up does not drown the decoding. The row is skipped, with a note, when the folder is
missing.

- 9a ``mmwatchd once --dry-run`` over that folder (max_side 1024; every file is decoded, resized and encoded, nothing
  is sent), with ``image.raw: preview`` against the same command with ``image.raw: demosaic``. Both are whole
  commands in a subprocess, best of 2 each, alternated.
- 9b the same files in-process, ``encode_image`` one by one (best of 3 per file): the decoding and encoding alone,
  without start-up. A note gives each file's own ratio: only files whose preview is at least the rule's size take
  the fast path (a Nikon D1 NEF and a Kodak DC50 KDC carry only 160x120 and 96x64 bitmaps, so both paths demosaic).

The samples are small (1.1-2.7 MP sensors, the DNG a 1224x816 linear DNG that is already demosaiced): a 24-45 MP
camera file widens the gap, since a demosaic grows with the sensor and a preview decode does not.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

#: The complete samples mmwatchd decodes (GOPR0024.GPR needs a codec LibRaw wheels lack; the Kodak C330 ``.raw`` is a
#: header-less sensor dump that is not sniffed as an image).
SAMPLES = ("CRW.CRW", "canon_eos_6d.dng", "sample.nef", "RAW_KODAK_DC50.KDC")
SIDE = 1024


def samples_dir(root: Path) -> Path:
    return Path(os.environ.get("MMWATCHD_RAW_SAMPLES") or root.parent / "shared" / "media" / "raw")


def row(report: Any, quick: bool, work: Path, bench: Any) -> None:
    """Add rows 9a and 9b to ``report``; ``bench`` is the runner module (Row, run_child, write_config, ...)."""
    source = samples_dir(bench.ROOT)
    present = [source / name for name in SAMPLES if (source / name).is_file()]
    if not present:
        report.note(f"9: skipped, no RAW samples in {source} (set MMWATCHD_RAW_SAMPLES)")
        return
    copies = 3 if quick else 8
    bench.progress(f"9. RAW: {len(present)} sample files x {copies} copies, preview vs demosaic, {SIDE} px")
    folder = work / "raw"
    inbox = folder / "inbox"
    inbox.mkdir(parents=True)
    files = []
    for i in range(copies):
        for path in present:
            link = inbox / f"{i:02d}-{path.name}"
            if path.stat().st_dev == inbox.stat().st_dev:
                os.link(path, link)
            else:
                link.write_bytes(path.read_bytes())
            files.append(link)

    def config(mode: str) -> Path:
        rule = {**bench.PHOTO_RULE, "image": {"max_side": SIDE, "raw": mode}}
        return bench.write_config(folder / mode, base_url="http://127.0.0.1:9/v1", inbox=inbox, concurrency=None,
                                  rules=[rule])  # fmt: skip

    configs = {mode: config(mode) for mode in ("preview", "demosaic")}
    walls: dict[str, list[float]] = {"preview": [], "demosaic": []}
    for _ in range(2):
        for mode, path in configs.items():
            child = bench.run_child(bench.mmwatchd("once", "-c", str(path), "--dry-run", *map(str, files)),
                                    cwd=path.parent, timeout=900)  # fmt: skip
            if child.rc != 0:
                raise RuntimeError(f"raw: mmwatchd once --dry-run ({mode}) exited {child.rc}: {child.stderr[-500:]}")
            walls[mode].append(child.wall_s)
    check = bench.run_child(bench.mmwatchd("check", "-c", str(configs["preview"])), cwd=folder, timeout=300)
    fast, slow = min(walls["preview"]), min(walls["demosaic"])
    report.add(bench.Row("9a", f"`mmwatchd once --dry-run`, {len(files)} RAW files ({SIDE} px): embedded preview "
                         "vs half-size demosaic", bench.fmt_s(fast),
                         f"{bench.fmt_s(slow)} (same command, image.raw: demosaic)", fast / slow))  # fmt: skip

    from mmwatchd.encode.image import encode_image
    from mmwatchd.model import ImageSpec, Limits

    per_file: dict[str, tuple[float, float]] = {}
    for path in present:
        timed = {}
        for mode in ("preview", "demosaic"):
            spec = ImageSpec(max_side=SIDE, raw=mode)
            timed[mode] = _best(
                lambda spec=spec, path=path: encode_image(path, spec, budget=bench.BUDGET, limits=Limits())
            )
        per_file[path.name] = (timed["preview"], timed["demosaic"])
    ours = sum(p for p, _ in per_file.values())
    ref = sum(d for _, d in per_file.values())
    report.add(bench.Row("9b", f"same {len(present)} files in-process (`encode_image`, one by one)", bench.fmt_s(ours),
                         f"{bench.fmt_s(ref)} (image.raw: demosaic)", ours / ref))  # fmt: skip
    report.note(
        "9: per file, preview vs demosaic: "
        + "; ".join(f"{name} {bench.fmt_s(p)} vs {bench.fmt_s(d)} ({p / d:.2f}x)" for name, (p, d) in per_file.items())
        + f"; start-up and config loading alone take {bench.fmt_s(check.wall_s)} (`mmwatchd check`); "
        f"9a runs: preview {', '.join(map(bench.fmt_s, walls['preview']))}, "
        f"demosaic {', '.join(map(bench.fmt_s, walls['demosaic']))}"
    )


def _best(fn: Any, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)
