"""Files rewritten the way that fools a size + mtime check: same size, the old mtime put back."""

from __future__ import annotations

import os
from pathlib import Path

from media import make_jpeg


def padded_jpeg(path: Path, *, seed: int, size: int = 40_000) -> Path:
    """A JPEG of exactly ``size`` bytes (decoders ignore what follows the end-of-image marker)."""
    data = make_jpeg(path, (120, 90), seed=seed).read_bytes()
    assert len(data) < size
    path.write_bytes(data + bytes(size - len(data)))
    return path


def rewrite_keeping_size_and_mtime(path: Path, *, seed: int) -> None:
    """Other pictures, same size, and the old mtime put back (``touch -r``, ``rsync --times``, a restore)."""
    st = path.stat()
    other = padded_jpeg(path.with_name(".other"), seed=seed, size=st.st_size).read_bytes()
    path.with_name(".other").unlink()
    assert other != path.read_bytes()
    with open(path, "r+b") as fh:  # in place: same inode
        fh.write(other)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
