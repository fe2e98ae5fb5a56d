"""The filter and the walk: which names are never processed, a root's globs, and the scandir walk, on real files."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from mmwatchd.model import WatchRoot
from mmwatchd.walk import is_ignored, scan, wanted

SIDECAR = ".json"


def write(path: Path, data: bytes = b"x" * 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------------------------------------------------
# is_ignored / wanted


class TestIsIgnored:
    @pytest.mark.parametrize(
        "rel",
        [
            ".hidden.jpg",
            "album/.hidden/a.jpg",
            ".DS_Store",
            "._IMG_0001.JPG",
            "IMG_1.jpg.part",
            "IMG_1.jpg.partial",
            "IMG_1.jpg.tmp",
            "IMG_1.JPG.TMP",
            "x.temp",
            "x.jpg.crdownload",
            "x.jpg.download",
            "x.jpg.!qB",
            "~$report.jpg",
            "~x.jpg",
            ".syncthing.IMG_1.jpg.tmp",
            ".~lock.IMG_1.jpg#",
            "@eaDir/IMG_1.jpg/SYNOPHOTO_THUMB_XL.jpg",
            "a/#recycle/IMG_1.jpg",
            "$RECYCLE.BIN/x.jpg",
            "Thumbs.db",
            "sub/thumbs.DB",
            "desktop.ini",
            ".@__thumb/x.jpg",
            "IMG_1.jpg.json",
            "album/IMG_1.JPG.json",
            ".IMG_1.jpg.json.mmwatchd-tmp-3fa9",
            "assembling.tmp/IMG_1.jpg",
            "",
        ],
    )
    def test_ignored(self, rel: str) -> None:
        assert is_ignored(rel, sidecar_suffix=SIDECAR)

    @pytest.mark.parametrize(
        "rel",
        [
            "IMG_1.jpg",
            "album/2024/IMG_1.HEIC",
            "a.b.c.mp4",
            "partial.jpg",
            "tmp/x.jpg",
            "x.jpg.json.jpg",
            "@home/x.jpg",
        ],
    )
    def test_kept(self, rel: str) -> None:
        assert not is_ignored(rel, sidecar_suffix=SIDECAR)

    def test_sidecar_suffix_is_configurable(self) -> None:
        assert not is_ignored("IMG_1.jpg.json", sidecar_suffix=".desc.json")
        assert is_ignored("IMG_1.jpg.desc.json", sidecar_suffix=".desc.json")


class TestWanted:
    ROOT = Path("/photos")

    @pytest.mark.parametrize(
        ("root", "path", "expected"),
        [
            (WatchRoot(path=ROOT), ROOT / "a.jpg", True),
            (WatchRoot(path=ROOT), ROOT / "deep/er/a.jpg", True),
            (WatchRoot(path=ROOT), ROOT, False),
            (WatchRoot(path=ROOT), Path("/elsewhere/a.jpg"), False),
            (WatchRoot(path=ROOT), Path("/photos2/a.jpg"), False),
            (WatchRoot(path=ROOT), ROOT / "a.jpg.part", False),
            (WatchRoot(path=ROOT), ROOT / "a.jpg.json", False),
            (WatchRoot(path=ROOT), ROOT / ".cache/a.jpg", False),
            (WatchRoot(path=ROOT, recursive=False), ROOT / "a.jpg", True),
            (WatchRoot(path=ROOT, recursive=False), ROOT / "sub/a.jpg", False),
            (WatchRoot(path=ROOT, include=("*.jpg",)), ROOT / "sub/A.JPG", True),
            (WatchRoot(path=ROOT, include=("*.jpg",)), ROOT / "sub/a.png", False),
            (WatchRoot(path=ROOT, include=("2024/**",)), ROOT / "2024/x/a.png", True),
            (WatchRoot(path=ROOT, include=("2024/**",)), ROOT / "2023/a.png", False),
            (WatchRoot(path=ROOT, exclude=("raw/**",)), ROOT / "raw/a.jpg", False),
            (WatchRoot(path=ROOT, exclude=("raw/**",)), ROOT / "cooked/raw.jpg", True),
            (WatchRoot(path=ROOT, include=("*.jpg",), exclude=("*_thumb.jpg",)), ROOT / "a_thumb.jpg", False),
        ],
    )
    def test_table(self, root: WatchRoot, path: Path, expected: bool) -> None:
        assert wanted(root, path, sidecar_suffix=SIDECAR) is expected

    def test_relative_root(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(tmp_path)
        assert wanted(WatchRoot(path=Path("in")), tmp_path / "in" / "a.jpg", sidecar_suffix=SIDECAR)


# --------------------------------------------------------------------------------------------------------------------
# scan


class TestScan:
    def test_nested_sorted_and_filtered(self, tmp_path: Path) -> None:
        for rel in [
            "b.jpg",
            "a.jpg",
            "a.jpg.json",
            "z/2.jpg",
            "z/1.jpg",
            "m/deep/x.jpg",
            "m/c.jpg",
            ".hidden/h.jpg",
            "@eaDir/a.jpg/thumb.jpg",
            "#recycle/old.jpg",
            "part.jpg.part",
        ]:
            write(tmp_path / rel)
        (tmp_path / "empty").mkdir()
        got = [p.relative_to(tmp_path).as_posix() for p in scan(WatchRoot(path=tmp_path), sidecar_suffix=SIDECAR)]
        assert got == ["a.jpg", "b.jpg", "m/c.jpg", "m/deep/x.jpg", "z/1.jpg", "z/2.jpg"]

    def test_yields_absolute_paths(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        write(tmp_path / "in" / "a.jpg")
        monkeypatch.chdir(tmp_path)
        assert list(scan(WatchRoot(path=Path("in")), sidecar_suffix=SIDECAR)) == [tmp_path / "in" / "a.jpg"]

    def test_ignored_folders_are_not_entered(self, tmp_path: Path) -> None:
        write(tmp_path / "ok" / "a.jpg")
        blocked = tmp_path / "@eaDir"
        blocked.mkdir()
        errors: list[Path] = []
        blocked.chmod(0)  # would be reported if it were listed (when not running as root)
        try:
            got = list(scan(WatchRoot(path=tmp_path), sidecar_suffix=SIDECAR, on_error=lambda p, e: errors.append(p)))
        finally:
            blocked.chmod(0o755)
        assert got == [tmp_path / "ok" / "a.jpg"]
        assert errors == []

    def test_symlinks_are_not_followed(self, tmp_path: Path) -> None:
        root, other = tmp_path / "root", tmp_path / "other"
        write(other / "linked.jpg")
        write(root / "real.jpg")
        (root / "dirlink").symlink_to(other, target_is_directory=True)
        (root / "filelink.jpg").symlink_to(other / "linked.jpg")
        (root / "loop").symlink_to(root, target_is_directory=True)
        assert list(scan(WatchRoot(path=root), sidecar_suffix=SIDECAR)) == [root / "real.jpg"]

    def test_non_recursive_and_include_exclude(self, tmp_path: Path) -> None:
        for rel in ["a.jpg", "b.png", "sub/c.jpg", "raw/d.jpg"]:
            write(tmp_path / rel)
        flat = WatchRoot(path=tmp_path, recursive=False)
        assert [p.name for p in scan(flat, sidecar_suffix=SIDECAR)] == ["a.jpg", "b.png"]
        picky = WatchRoot(path=tmp_path, include=("*.jpg",), exclude=("raw/**",))
        assert [p.name for p in scan(picky, sidecar_suffix=SIDECAR)] == ["a.jpg", "c.jpg"]

    def test_unreadable_folders_are_reported_and_skipped(self, tmp_path: Path) -> None:
        errors: list[tuple[Path, OSError]] = []
        missing = tmp_path / "gone"
        got = list(scan(WatchRoot(path=missing), sidecar_suffix=SIDECAR, on_error=lambda p, e: errors.append((p, e))))
        assert got == []
        assert errors[0][0] == missing and isinstance(errors[0][1], FileNotFoundError)

    @pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder")
    def test_permission_denied_folder(self, tmp_path: Path) -> None:
        write(tmp_path / "a.jpg")
        locked = tmp_path / "locked"
        write(locked / "b.jpg")
        locked.chmod(0)
        errors: list[Path] = []
        try:
            got = list(scan(WatchRoot(path=tmp_path), sidecar_suffix=SIDECAR, on_error=lambda p, e: errors.append(p)))
        finally:
            locked.chmod(0o755)
        assert got == [tmp_path / "a.jpg"]
        assert errors == [locked]

    def test_default_error_report_is_a_log_line(self, tmp_path: Path) -> None:
        with capture_logs() as logs:
            assert list(scan(WatchRoot(path=tmp_path / "gone"), sidecar_suffix=SIDECAR)) == []
        assert [e["event"] for e in logs] == ["watch.scan_unreadable"]

    def test_two_thousand_files(self, tmp_path: Path) -> None:
        for d in range(20):
            folder = tmp_path / f"d{d:02}"
            folder.mkdir()
            for f in range(100):
                os.close(os.open(folder / f"IMG_{f:04}.jpg", os.O_WRONLY | os.O_CREAT))
            for f in range(0, 100, 10):
                os.close(os.open(folder / f"IMG_{f:04}.jpg.json", os.O_WRONLY | os.O_CREAT))
        start = time.perf_counter()
        got = list(scan(WatchRoot(path=tmp_path, include=("*.jpg",)), sidecar_suffix=SIDECAR))
        elapsed = time.perf_counter() - start
        assert len(got) == 2000
        assert got == sorted(got)
        assert elapsed < 2.0  # typically ~20 ms; a per-file stat or a glob per file would still pass, a bug would not
