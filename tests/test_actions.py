from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mounts
import pytest
from media import make_jpeg

from mmwatchd.actions import (
    ActionResult,
    _link_noreplace,
    _reserve_noreplace,
    run_actions,
)
from mmwatchd.model import ActionSpec
from mmwatchd.sidecar import TEMP_MARK

SUFFIX = ".json"


def make_pair(path: Path, *, seed: int = 0) -> tuple[Path, Path]:
    """A JPEG and its sidecar, the sidecar recording the JPEG's hash so pairs can be matched after a move."""
    make_jpeg(path, (32, 24), seed=seed)
    side = path.with_name(path.name + SUFFIX)
    side.write_text(json.dumps({"sha256": sha(path)}))
    return path, side


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_pair(media: Path, side: Path | None) -> None:
    assert side is not None
    assert side.name == media.name + SUFFIX
    assert json.loads(side.read_text())["sha256"] == sha(media)


def files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def act(spec: ActionSpec, media: Path, side: Path | None, root: Path | None, status: str = "ok") -> ActionResult:
    values = {"name": media.name, "stem": media.stem, "path": str(media), "kind": "image", "width": 32}
    return run_actions(spec, path=media, sidecar=side, root=root, values=values, status=status)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs, i.e. another filesystem than ``tmp_path``."""
    with mounts.tmpfs(tmp_path / "mnt") as mnt:
        yield mnt


class TestMove:
    def test_keeps_subfolders_relative_to_root(self, tmp_path: Path) -> None:
        root = tmp_path / "in"
        media, side = make_pair(root / "2024" / "trip" / "IMG_1.jpg")
        digest = sha(media)
        done = tmp_path / "done"

        result = act(ActionSpec(move_to=done), media, side, root)

        assert result.problems == ()
        assert result.moved
        assert result.path == done / "2024" / "trip" / "IMG_1.jpg"
        assert result.sidecar == done / "2024" / "trip" / "IMG_1.jpg.json"
        assert sha(result.path) == digest
        assert_pair(result.path, result.sidecar)
        assert files(root) == []
        assert (done / "2024").stat().st_mode & 0o777 == 0o755 & ~_umask()

    def test_outside_any_root_uses_the_name_only(self, tmp_path: Path) -> None:
        media, side = make_pair(tmp_path / "a" / "b" / "IMG_1.jpg")
        result = act(ActionSpec(move_to=tmp_path / "done"), media, side, None)
        assert result.problems == ()
        assert files(tmp_path / "done") == ["IMG_1.jpg", "IMG_1.jpg.json"]

    def test_without_sidecar(self, tmp_path: Path) -> None:
        media = make_jpeg(tmp_path / "in" / "IMG_1.jpg")
        result = act(ActionSpec(move_to=tmp_path / "done"), media, media.with_name("IMG_1.jpg.json"), tmp_path / "in")
        assert result.problems == ()
        assert result.sidecar is None
        assert files(tmp_path / "done") == ["IMG_1.jpg"]

    def test_clash_numbers_file_and_sidecar(self, tmp_path: Path) -> None:
        done = tmp_path / "done"
        _old_media, _old_side = make_pair(done / "IMG_1.jpg", seed=1)
        make_pair(done / "IMG_1 (1).jpg", seed=2)
        before = {name: (done / name).read_bytes() for name in files(done)}
        media, side = make_pair(tmp_path / "in" / "IMG_1.jpg", seed=3)

        result = act(ActionSpec(move_to=done), media, side, tmp_path / "in")

        assert result.problems == ()
        assert result.path == done / "IMG_1 (2).jpg"
        assert_pair(result.path, result.sidecar)
        for name, data in before.items():  # nothing replaced
            assert (done / name).read_bytes() == data

    def test_clash_on_the_sidecar_name_only(self, tmp_path: Path) -> None:
        done = tmp_path / "done"
        done.mkdir()
        foreign = done / "IMG_1.jpg.json"
        foreign.write_text("not ours")
        media, side = make_pair(tmp_path / "in" / "IMG_1.jpg")

        result = act(ActionSpec(move_to=done), media, side, tmp_path / "in")

        assert result.problems == ()
        assert result.path == done / "IMG_1 (1).jpg"
        assert result.sidecar == done / "IMG_1 (1).jpg.json"
        assert_pair(result.path, result.sidecar)
        assert foreign.read_text() == "not ours"
        assert not (done / "IMG_1.jpg").exists()

    def test_already_in_move_to_stays_put(self, tmp_path: Path) -> None:
        media, side = make_pair(tmp_path / "done" / "IMG_1.jpg")
        result = act(ActionSpec(move_to=tmp_path / "done"), media, side, tmp_path / "done")
        assert (result.path, result.sidecar, result.moved, result.problems) == (media, side, False, ())

    def test_dotdot_escape_refused(self, tmp_path: Path) -> None:
        root = tmp_path / "in"
        root.mkdir()
        media, side = make_pair(tmp_path / "outside" / "IMG_1.jpg")
        sneaky = root / ".." / "outside" / "IMG_1.jpg"

        result = act(ActionSpec(move_to=tmp_path / "done"), sneaky, sneaky.with_name(side.name), root)

        assert not result.moved
        assert len(result.problems) == 1 and "refusing" in result.problems[0]
        assert_pair(media, side)
        assert not (tmp_path / "done").exists()

    def test_symlinked_subfolder_escape_refused(self, tmp_path: Path) -> None:
        done, elsewhere = tmp_path / "done", tmp_path / "elsewhere"
        done.mkdir()
        elsewhere.mkdir()
        (done / "sub").symlink_to(elsewhere)
        media, side = make_pair(tmp_path / "in" / "sub" / "IMG_1.jpg")

        result = act(ActionSpec(move_to=done), media, side, tmp_path / "in")

        assert not result.moved and "outside" in result.problems[0]
        assert_pair(media, side)
        assert files(elsewhere) == []

    @pytest.mark.parametrize("target", ["same-fs", "cross-fs"])
    def test_concurrent_same_names_none_lost(self, tmp_path: Path, request: pytest.FixtureRequest, target: str) -> None:
        done = (request.getfixturevalue("tmpfs") if target == "cross-fs" else tmp_path) / "done"
        n = 20
        pairs = [make_pair(tmp_path / f"src{i}" / "IMG_1.jpg", seed=i) for i in range(n)]
        digests = {sha(media) for media, _ in pairs}
        barrier = threading.Barrier(n)
        results: list[ActionResult] = []
        lock = threading.Lock()

        def worker(media: Path, side: Path) -> None:
            barrier.wait()
            result = act(ActionSpec(move_to=done), media, side, media.parent)
            with lock:
                results.append(result)

        threads = [threading.Thread(target=worker, args=pair) for pair in pairs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        assert all(r.problems == () and r.moved for r in results)
        assert len(files(done)) == 2 * n
        assert {r.path.name for r in results} == {"IMG_1.jpg"} | {f"IMG_1 ({k}).jpg" for k in range(1, n)}
        assert {sha(r.path) for r in results} == digests
        for r in results:
            assert_pair(r.path, r.sidecar)


class TestNoReplaceFallbacks:
    """The fallbacks used where renameat2(RENAME_NOREPLACE) is missing never replace an existing file either."""

    @pytest.mark.parametrize("move", [_link_noreplace, _reserve_noreplace])
    def test_refuses_existing_target(self, tmp_path: Path, move: object) -> None:
        src, dst = tmp_path / "a", tmp_path / "b"
        src.write_text("new")
        dst.write_text("old")
        with pytest.raises(FileExistsError):
            move(src, dst)  # type: ignore[operator]
        assert (src.read_text(), dst.read_text()) == ("new", "old")
        move(src, tmp_path / "c")  # type: ignore[operator]
        assert files(tmp_path) == ["b", "c"]


class TestCrossFilesystem:
    def test_copies_then_removes_source(self, tmp_path: Path, tmpfs: Path) -> None:
        root = tmp_path / "in"
        media, side = make_pair(root / "sub" / "IMG_1.jpg")
        digest, mtime_ns = sha(media), media.stat().st_mtime_ns
        make_pair(tmpfs / "done" / "sub" / "IMG_1.jpg", seed=9)  # a clash on the other side too

        result = act(ActionSpec(move_to=tmpfs / "done"), media, side, root)

        assert result.problems == ()
        assert result.path == tmpfs / "done" / "sub" / "IMG_1 (1).jpg"
        assert sha(result.path) == digest
        assert result.path.stat().st_mtime_ns == mtime_ns
        assert_pair(result.path, result.sidecar)
        assert files(root) == []
        assert not any(TEMP_MARK in name for name in os.listdir(tmpfs / "done" / "sub"))

    def test_sidecar_that_cannot_follow_stays_readable(self, tmp_path: Path, tmpfs: Path) -> None:
        media = make_jpeg(tmp_path / "in" / "IMG_1.jpg")
        digest = sha(media)
        side = media.with_name(media.name + SUFFIX)
        side.mkdir()  # a folder cannot be copied to another filesystem
        (side / "keep").write_text("kept")

        result = act(ActionSpec(move_to=tmpfs), media, side, tmp_path / "in")

        assert result.moved and result.path == tmpfs / "IMG_1.jpg" and sha(result.path) == digest
        assert result.sidecar == side and (side / "keep").read_text() == "kept"
        [problem] = result.problems
        assert "but not its sidecar" in problem and str(side) in problem
        assert os.listdir(tmpfs) == ["IMG_1.jpg"]

    def test_no_space_leaves_everything_in_place(self, tmp_path: Path) -> None:
        with mounts.tmpfs(tmp_path / "small", "1m") as small:
            root = tmp_path / "in"
            media = root / "big.mov"
            media.parent.mkdir()
            media.write_bytes(os.urandom(3 << 20))
            side = media.with_name(media.name + SUFFIX)
            side.write_text("{}")

            result = act(ActionSpec(move_to=small), media, side, root)

            assert not result.moved and (result.path, result.sidecar) == (media, side)
            assert "No space left" in result.problems[0]
            assert media.stat().st_size == 3 << 20 and side.exists()
            assert os.listdir(small) == []  # the partial copy is gone

    @pytest.mark.parametrize("sub", ["", "new"])
    def test_read_only_target(self, tmp_path: Path, tmpfs: Path, sub: str) -> None:
        mounts.read_only(tmpfs)
        media, side = make_pair(tmp_path / "in" / "IMG_1.jpg")

        result = act(ActionSpec(move_to=tmpfs / sub if sub else tmpfs), media, side, tmp_path / "in")

        assert not result.moved and (result.path, result.sidecar) == (media, side)
        assert "Read-only file system" in result.problems[0]
        assert_pair(media, side)
        assert os.listdir(tmpfs) == []


HOOK = """\
import json, os, subprocess, sys, time
out, mode = sys.argv[1], sys.argv[2]
with open(out, "w") as fh:
    json.dump({"argv": sys.argv[3:], "pid": os.getpid()}, fh)
if mode == "fail":
    sys.stderr.write("x" * 150 + "\\nboom " + "y" * 300)
    sys.exit(3)
if mode == "sleep":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    with open(out + ".child", "w") as fh:
        fh.write(str(child.pid))
    time.sleep(30)
"""


@pytest.fixture
def hook(tmp_path: Path) -> Path:
    script = tmp_path / "hook.py"
    script.write_text(HOOK)
    return script


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # an orphan nobody has reaped yet is dead too


class TestExec:
    def test_argv_gets_placeholders_after_the_move(self, tmp_path: Path, hook: Path) -> None:
        out = tmp_path / "argv.json"
        media, side = make_pair(tmp_path / "in" / "IMG_1.jpg")
        make_pair(tmp_path / "done" / "IMG_1.jpg", seed=5)
        spec = ActionSpec(
            move_to=tmp_path / "done",
            exec=(sys.executable, str(hook), str(out), "ok", "{path}", "{sidecar}", "{status}", "{name}",
                  "{kind}/{width}", "{{path}}", "{unknown}"),
        )  # fmt: skip

        result = act(spec, media, side, tmp_path / "in")

        assert result.problems == () and result.exec_code == 0
        moved = tmp_path / "done" / "IMG_1 (1).jpg"
        assert json.loads(out.read_text())["argv"] == [
            str(moved),
            str(moved) + SUFFIX,
            "ok",
            "IMG_1 (1).jpg",
            "image/32",
            "{path}",
            "",
        ]

    def test_without_sidecar_and_move(self, tmp_path: Path, hook: Path) -> None:
        out = tmp_path / "argv.json"
        media = make_jpeg(tmp_path / "IMG_1.jpg")
        spec = ActionSpec(exec=(sys.executable, str(hook), str(out), "ok", "{path}", "{sidecar}", "{status}"))
        result = act(spec, media, None, None, status="error")
        assert (result.exec_code, result.moved, result.problems) == (0, False, ())
        assert json.loads(out.read_text())["argv"] == [str(media), "", "error"]

    def test_failing_hook_is_reported_and_loses_nothing(self, tmp_path: Path, hook: Path) -> None:
        media, side = make_pair(tmp_path / "in" / "IMG_1.jpg")
        spec = ActionSpec(move_to=tmp_path / "done", exec=(sys.executable, str(hook), str(tmp_path / "o"), "fail"))

        result = act(spec, media, side, tmp_path / "in")

        assert result.exec_code == 3 and result.moved
        [problem] = result.problems
        assert "exited with code 3" in problem
        tail = problem.split("stderr: ", 1)[1]
        assert tail == ("x" * 150 + "\nboom " + "y" * 300)[:200].replace("\n", " | ")
        assert_pair(result.path, result.sidecar)

    def test_timeout_kills_the_process_group(self, tmp_path: Path, hook: Path) -> None:
        out = tmp_path / "o"
        media, side = make_pair(tmp_path / "in" / "IMG_1.jpg")
        spec = ActionSpec(
            move_to=tmp_path / "done", exec=(sys.executable, str(hook), str(out), "sleep"), exec_timeout_s=0.5
        )

        started = time.monotonic()
        result = act(spec, media, side, tmp_path / "in")

        assert time.monotonic() - started < 5
        assert result.exec_code is None
        assert "still running after 0.5 s" in result.problems[0]
        assert_pair(result.path, result.sidecar)
        pids = [json.loads(out.read_text())["pid"], int(Path(str(out) + ".child").read_text())]
        deadline = time.monotonic() + 2
        while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert all(_gone(pid) for pid in pids)

    def test_missing_program(self, tmp_path: Path) -> None:
        media, side = make_pair(tmp_path / "in" / "IMG_1.jpg")
        spec = ActionSpec(move_to=tmp_path / "done", exec=(str(tmp_path / "no-such-hook"), "{path}"))

        result = act(spec, media, side, tmp_path / "in")

        assert result.exec_code is None and result.moved
        assert result.problems == (f"exec: program not found: {tmp_path / 'no-such-hook'}",)
        assert_pair(result.path, result.sidecar)

    def test_not_executable(self, tmp_path: Path, hook: Path) -> None:
        media = make_jpeg(tmp_path / "IMG_1.jpg")
        result = act(ActionSpec(exec=(str(hook),)), media, None, None)
        assert result.exec_code is None and "permission denied" in result.problems[0]

    def test_runs_with_the_actual_place_when_the_move_failed(self, tmp_path: Path, hook: Path) -> None:
        out = tmp_path / "argv.json"
        (tmp_path / "in").mkdir()
        _media, side = make_pair(tmp_path / "outside" / "IMG_1.jpg")
        sneaky = tmp_path / "in" / ".." / "outside" / "IMG_1.jpg"
        spec = ActionSpec(move_to=tmp_path / "done", exec=(sys.executable, str(hook), str(out), "ok", "{path}"))

        result = act(spec, sneaky, sneaky.with_name(side.name), tmp_path / "in", status="error")

        assert result.exec_code == 0 and len(result.problems) == 1
        assert json.loads(out.read_text())["argv"] == [str(sneaky)]


def _umask() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    return 0o022
