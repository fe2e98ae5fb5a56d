from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import mounts
import pytest

from mmwatchd import sidecar
from mmwatchd.errors import ForeignSidecar, SidecarError

OURS = {"mmwatchd": {"version": "x", "schema": 1}, "status": "ok", "fingerprint": "f",
        "source": {"size": 3, "mtime_ns": 10, "sha256": "abc"}}  # fmt: skip


def test_naming() -> None:
    assert sidecar.sidecar_path(Path("/a/IMG_1.jpg"), ".json") == Path("/a/IMG_1.jpg.json")
    assert sidecar.sidecar_path(Path("/a/IMG_1.jpg"), ".desc.json") == Path("/a/IMG_1.jpg.desc.json")


class TestWrite:
    def test_atomic_write_leaves_only_the_sidecar(self, tmp_path: Path) -> None:
        p = tmp_path / "a.jpg.json"
        sidecar.write(p, OURS)
        sidecar.write(p, {**OURS, "status": "error"})
        assert json.loads(p.read_text())["status"] == "error"
        assert sorted(os.listdir(tmp_path)) == ["a.jpg.json"]
        assert sidecar.read(p) == {**OURS, "status": "error"}

    def test_non_ascii_is_kept_readable(self, tmp_path: Path) -> None:
        p = tmp_path / "a.json"
        sidecar.write(p, {**OURS, "text": "Köln 🐈"})
        assert "Köln 🐈" in p.read_text(encoding="utf-8")

    @pytest.mark.parametrize(
        "content",
        [b'{"caption": "made by hand"}', b"not json at all", b"\xff\xfe", b"[1, 2]", b'{"mmwatchd": "x"}'],
    )
    def test_foreign_files_are_never_overwritten(self, tmp_path: Path, content: bytes) -> None:
        p = tmp_path / "a.jpg.json"
        p.write_bytes(content)
        with pytest.raises(ForeignSidecar, match="did not write"):
            sidecar.read(p)
        with pytest.raises(ForeignSidecar):
            sidecar.write(p, OURS)
        assert p.read_bytes() == content
        assert os.listdir(tmp_path) == ["a.jpg.json"]

    def test_a_folder_in_the_way(self, tmp_path: Path) -> None:
        (tmp_path / "a.jpg.json").mkdir()
        with pytest.raises(ForeignSidecar, match="folder"):
            sidecar.write(tmp_path / "a.jpg.json", OURS)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB filesystem, so "disk full" and "read-only" are the kernel's answers, not a mock's."""
    with mounts.tmpfs(tmp_path / "mnt", "64k") as mnt:
        yield mnt


class TestFullOrReadOnlyDisk:
    def test_disk_full_is_a_clear_retryable_error_and_nothing_is_left(self, small_tmpfs: Path) -> None:
        (small_tmpfs / "filler").write_bytes(b"x" * 60_000)
        target = small_tmpfs / "a.jpg.json"
        with pytest.raises(SidecarError, match="No space left on device.*tried again") as info:
            sidecar.write(target, {**OURS, "text": "y" * 20_000})
        assert info.value.retryable
        assert sorted(os.listdir(small_tmpfs)) == ["filler"]

    def test_disk_full_never_tears_an_existing_sidecar(self, small_tmpfs: Path) -> None:
        target = small_tmpfs / "a.jpg.json"
        sidecar.write(target, OURS)
        before = target.read_bytes()
        (small_tmpfs / "filler").write_bytes(b"x" * 56_000)
        with pytest.raises(SidecarError):
            sidecar.write(target, {**OURS, "text": "y" * 20_000})
        assert target.read_bytes() == before
        assert sorted(os.listdir(small_tmpfs)) == ["a.jpg.json", "filler"]

    def test_read_only_filesystem(self, small_tmpfs: Path) -> None:
        mounts.read_only(small_tmpfs)
        with pytest.raises(SidecarError, match="Read-only file system.*write access") as info:
            sidecar.write(small_tmpfs / "a.json", OURS)
        assert info.value.retryable


class TestFresh:
    def _fresh(self, **kw: object) -> bool:
        args: dict[str, object] = {"size": 3, "mtime_ns": 10, "fingerprint": "f", "sha256": lambda: "abc"}
        args.update(kw)
        return sidecar.is_fresh(OURS, **args)  # type: ignore[arg-type]

    def test_same_version_and_rule(self) -> None:
        assert self._fresh()

    def test_other_rule_or_size_is_stale(self) -> None:
        assert not self._fresh(fingerprint="g")
        assert not self._fresh(size=4)

    def test_other_mtime_is_settled_by_hash_computed_only_then(self) -> None:
        calls: list[int] = []

        def sha() -> str:
            calls.append(1)
            return "abc"

        assert self._fresh(sha256=sha) and calls == []
        assert self._fresh(mtime_ns=11, sha256=sha) and calls == [1]
        assert not self._fresh(mtime_ns=11, sha256=lambda: "def")

    def test_sha256_file(self, tmp_path: Path) -> None:
        f = tmp_path / "x"
        f.write_bytes(b"abc")
        assert sidecar.sha256_file(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
