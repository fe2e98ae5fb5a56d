"""Seeded benchmark inputs, written once under the cache folder and reused by later runs.

The cache is ``$MMWATCHD_BENCH_CACHE``, else ``<system temp>/mmwatchd-bench``. Every file is written under a
temporary name and renamed into place, so an interrupted run never leaves a half-written input behind.

- photos: 12 MP phone-size JPEGs (displayed 4000x3000, quality 90, ~4.5 MB each) with gradients, shapes and seeded
  noise at two scales; every third one is a portrait shot stored sideways with EXIF orientation 6, as phones do;
- small: 640x480 JPEGs (quality 90, ~120 kB), the throughput and latency inputs;
- tiny: one 16x16 JPEG (~700 bytes), copied many times for the rescan tree;
- clips: see :mod:`video`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import media  # tests/media.py: the test suite's generators

SEED = 20240601
CACHE = Path(os.environ.get("MMWATCHD_BENCH_CACHE") or Path(tempfile.gettempdir()) / "mmwatchd-bench")
PHOTO_SIZE = (4000, 3000)
SMALL_SIZE = (640, 480)


def _atomic(path: Path, make) -> Path:  # type: ignore[no-untyped-def]
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    make(partial)
    partial.replace(path)
    return path


def _photo(args: tuple[Path, int]) -> Path:
    path, i = args
    portrait = i % 3 == 1
    size = (PHOTO_SIZE[1], PHOTO_SIZE[0]) if portrait else PHOTO_SIZE
    return _atomic(
        path,
        lambda p: media.make_jpeg(
            p, size, orientation=6 if portrait else 1, quality=90, seed=SEED + i, taken="2024:06:01 12:00:00"
        ),
    )


def photos(n: int) -> list[Path]:
    """``n`` photos (the first ``n`` of one fixed sequence, so a quick run reuses a full run's files)."""
    folder = CACHE / f"photos-{PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}-q90-{SEED}"
    todo = [(folder / f"IMG_{i:04d}.jpg", i) for i in range(n)]
    missing = [t for t in todo if not t[0].exists()]
    if missing:
        with ProcessPoolExecutor(max_workers=min(2, len(missing))) as pool:
            list(pool.map(_photo, missing))
    return [p for p, _ in todo]


def small(n: int) -> list[Path]:
    folder = CACHE / f"small-{SMALL_SIZE[0]}x{SMALL_SIZE[1]}-q90-{SEED}"
    out = []
    for i in range(n):
        path = folder / f"IMG_{i:04d}.jpg"
        out.append(_atomic(path, lambda p, i=i: media.make_jpeg(p, SMALL_SIZE, quality=90, seed=SEED + 10_000 + i)))
    return out


def tiny() -> Path:
    return _atomic(CACHE / "tiny-16x16.jpg", lambda p: media.make_jpeg(p, (16, 16), quality=90, detail=False))


def link_into(files: list[Path], folder: Path) -> list[Path]:
    """Hard links (copies across file systems) of ``files`` in ``folder``: a fresh inbox without sidecars."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for src in files:
        dst = folder / src.name
        try:
            os.link(src, dst)
        except OSError:
            dst.write_bytes(src.read_bytes())
        out.append(dst)
    return out
