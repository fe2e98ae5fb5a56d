from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import mounts
import pytest

from mmwatchd import sidecar
from mmwatchd.errors import ForeignSidecar, SidecarError

REPO = Path(__file__).resolve().parents[1]
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
        with pytest.raises(SidecarError, match=r"No space left on device.*tried again") as info:
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
        with pytest.raises(SidecarError, match=r"Read-only file system.*write access") as info:
            sidecar.write(small_tmpfs / "a.json", OURS)
        assert info.value.retryable


def test_sha256_file(tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_bytes(b"abc")
    assert sidecar.sha256_file(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


class TestReserve:
    """The temp file is made, with room, before anything is paid for."""

    def test_commit_puts_the_sidecar_in_place_and_gives_back_the_room(self, tmp_path: Path) -> None:
        target = tmp_path / "a.jpg.json"
        r = sidecar.reserve(target, size=64 << 10)
        (tmp,) = os.listdir(tmp_path)
        assert tmp.startswith(".a.jpg.json" + sidecar.TEMP_MARK) and sidecar.temp_writer(tmp) == os.getpid()
        assert os.stat(tmp_path / tmp).st_blocks * 512 >= 64 << 10  # allocated now, not at commit
        r.commit(OURS)
        r.discard()  # nothing to do after a commit
        assert os.listdir(tmp_path) == ["a.jpg.json"] and sidecar.read(target) == OURS
        assert target.stat().st_size == len(target.read_bytes()) < 1024

    def test_discard_leaves_nothing(self, tmp_path: Path) -> None:
        sidecar.reserve(tmp_path / "a.jpg.json", size=4096).discard()
        assert os.listdir(tmp_path) == []

    def test_a_temp_file_removed_meanwhile_is_written_anyway(self, tmp_path: Path) -> None:
        r = sidecar.reserve(tmp_path / "a.jpg.json", size=4096)
        os.unlink(r.tmp)  # another process's start-up cleanup took it for a killed writer's
        r.commit(OURS)
        assert os.listdir(tmp_path) == ["a.jpg.json"]

    def test_a_foreign_file_that_appeared_meanwhile_is_kept(self, tmp_path: Path) -> None:
        r = sidecar.reserve(tmp_path / "a.jpg.json", size=4096)
        (tmp_path / "a.jpg.json").write_text("mine")
        with pytest.raises(ForeignSidecar):
            r.commit(OURS)
        assert os.listdir(tmp_path) == ["a.jpg.json"] and (tmp_path / "a.jpg.json").read_text() == "mine"

    def test_a_full_disk_is_found_at_once(self, small_tmpfs: Path) -> None:
        (small_tmpfs / "filler").write_bytes(b"x" * 40_000)
        with pytest.raises(SidecarError, match=f"{small_tmpfs}: cannot write sidecars into this folder: No space"):
            sidecar.reserve(small_tmpfs / "a.jpg.json", size=32 << 10)
        assert os.listdir(small_tmpfs) == ["filler"]

    def test_a_read_only_folder_is_named_with_what_to_do(self, small_tmpfs: Path) -> None:
        mounts.read_only(small_tmpfs)
        with pytest.raises(SidecarError) as info:
            sidecar.reserve(small_tmpfs / "a.jpg.json", size=4096)
        assert info.value.message.startswith(f"{small_tmpfs}: cannot write sidecars into this folder: Read-only")
        assert "fix its permissions, or set sidecar.dir" in info.value.message


class TestClaim:
    def test_one_holder_at_a_time_and_nothing_left_after(self, tmp_path: Path) -> None:
        side = tmp_path / "a.jpg.json"
        first = sidecar.claim(side)
        assert first is not None
        assert os.listdir(tmp_path) == [".a.jpg.json.mmwatchd-lock"]
        assert sidecar.claim(side) is None  # another job, of this process or another
        first.release()
        first.release()
        assert os.listdir(tmp_path) == []
        again = sidecar.claim(side)
        assert again is not None
        again.release()

    def test_a_killed_holders_lock_file_is_claimed_and_removed(self, tmp_path: Path) -> None:
        side = tmp_path / "a.jpg.json"
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sys; from pathlib import Path; from mmwatchd import sidecar; "
             "c = sidecar.claim(Path(sys.argv[1])); print('held', flush=True); sys.stdin.read()", str(side)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        assert sidecar.claim(side) is None
        holder.kill()  # no cleanup of any kind: its lock file stays
        holder.wait()
        assert os.listdir(tmp_path) == [".a.jpg.json.mmwatchd-lock"]
        c = sidecar.claim(side)
        assert c is not None
        c.release()
        assert os.listdir(tmp_path) == []

    def test_two_paths_to_one_file_are_two_claims(self, tmp_path: Path) -> None:
        a, b = sidecar.claim(tmp_path / "a.jpg.json"), sidecar.claim(tmp_path / "alias.jpg.json")
        assert a is not None and b is not None
        a.release()
        b.release()

    def test_a_read_only_folder_cannot_be_claimed_in(self, small_tmpfs: Path) -> None:
        mounts.read_only(small_tmpfs)
        with pytest.raises(SidecarError, match=f"{small_tmpfs}: cannot write sidecars into this folder: Read-only"):
            sidecar.claim(small_tmpfs / "a.jpg.json")

    def test_a_lock_file_belongs_to_the_folder_owner(self, tmp_path: Path) -> None:
        if os.geteuid() != 0:
            pytest.skip("only root can give files away")
        os.chown(tmp_path, 4321, 4321)  # a user's photo folder; the service runs as root
        c = sidecar.claim(tmp_path / "a.jpg.json")
        assert c is not None
        st = c.path.stat()
        c.release()
        assert (st.st_uid, st.st_gid) == (4321, 4321)

    def test_claims_race_only_one_wins(self, tmp_path: Path) -> None:
        side = tmp_path / "a.jpg.json"
        holders: list[int] = []
        won = [0] * 4
        problems: list[BaseException] = []
        lock = threading.Lock()

        def contend(i: int) -> None:
            try:
                for _ in range(200):
                    c = sidecar.claim(side)
                    if c is None:
                        continue
                    with lock:
                        holders.append(i)
                        two = len(holders) > 1
                    won[i] += 1
                    with lock:
                        holders.remove(i)
                    c.release()
                    assert not two, "two holders at once"
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread below
                problems.append(exc)

        threads = [threading.Thread(target=contend, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert problems == [] and sum(won) > 0
        assert os.listdir(tmp_path) == []


def test_mirrored_sidecars_outside_the_roots_keep_the_full_path(tmp_path: Path) -> None:
    mirror = tmp_path / "m"
    assert sidecar.locate(Path("/done/sub/a.jpg"), suffix=".json", mirror=mirror, roots=[Path("/photos")]) == (
        mirror / "done" / "sub" / "a.jpg.json")  # fmt: skip
    assert sidecar.locate(Path("/photos/sub/a.jpg"), suffix=".json", mirror=mirror, roots=[Path("/photos")]) == (
        mirror / "photos" / "sub" / "a.jpg.json")  # fmt: skip
