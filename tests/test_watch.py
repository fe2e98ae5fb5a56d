"""The live watcher, on real files and real watchdog observers (the filter and walk: test_walk.py; readiness:
test_settle.py)."""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from clock import FakeClock
from structlog.testing import capture_logs

from mmwatchd import watch
from mmwatchd.errors import ConfigError
from mmwatchd.model import WatchRoot
from mmwatchd.watch import Watcher

# A warning raised on a watchdog thread kills that thread and silently stops events: treat every warning as an error.
pytestmark = pytest.mark.filterwarnings("error")

SIDECAR = ".json"
SETTLE = 0.3
POLL = 0.2
#: After the last expected path came out, wait this long for anything more: events for a change arrive within one
#: poll, and a file touched again would be reported at most settle_s later. Under load a late duplicate could slip
#: past this window (a missed failure), but it can never make a correct run fail.
QUIET = POLL + SETTLE

needs_inotify = pytest.mark.skipif(watch.InotifyFD is None, reason="inotify is Linux only")


def write(path: Path, data: bytes = b"x" * 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Watcher, end to end


@dataclass
class Harness:
    watcher: Watcher
    root: Path
    outside: Path
    sizes: dict[Path, int] = field(default_factory=dict)

    def collect(
        self,
        expected: set[Path],
        *,
        timeout: float = 10.0,
        busy: threading.Thread | None = None,
        quiet: float = QUIET,
    ) -> list[Path]:
        """Every ready path, until all of ``expected`` came out (and ``busy`` ended) and ``quiet`` seconds passed with
        nothing new. Records each file's size at the moment it was reported.
        """
        got: list[Path] = []
        end = time.monotonic() + timeout
        quiet_until: float | None = None
        while time.monotonic() < end:
            batch = self.watcher.ready(0.05)
            for path in batch:
                self.sizes.setdefault(path, path.stat().st_size)
            got += batch
            now = time.monotonic()
            if busy is not None and busy.is_alive():
                continue
            if not expected <= set(got):
                continue
            if quiet_until is None or batch:
                quiet_until = now + quiet
            elif now >= quiet_until:
                break
        return got


BACKENDS = [pytest.param("inotify", marks=needs_inotify), "polling"]


@pytest.fixture(params=BACKENDS)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    polling = request.param == "polling"
    watcher = Watcher(
        [WatchRoot(path=root, polling=polling, poll_interval_s=POLL)], settle_s=SETTLE, sidecar_suffix=SIDECAR
    )
    with watcher:
        assert watcher.backends == {root: request.param}
        yield Harness(watcher, root, outside)


class TestWatcher:
    @pytest.mark.parametrize("backend", BACKENDS)
    def test_slow_chunked_write_comes_out_once_complete(self, backend: str, tmp_path: Path) -> None:
        """Pauses between chunks longer than half of settle_s but shorter than it: the file must not be reported in
        between. Time is a fake clock, so however late the machine delivers an event, settle_s only passes when
        the test says so."""
        clock = FakeClock()
        root = tmp_path / "root"
        root.mkdir()
        target = root / "clip.mp4"
        chunk = b"v" * 65536
        roots = [WatchRoot(path=root, polling=backend == "polling", poll_interval_s=POLL)]
        with Watcher(roots, settle_s=SETTLE, sidecar_suffix=SIDECAR, clock=clock) as watcher:
            with open(target, "wb") as fh:
                for _ in range(5):
                    fh.write(chunk)
                    fh.flush()
                    time.sleep(POLL + 0.05)  # let the watcher see it (how soon does not matter)
                    clock.advance(0.6 * SETTLE)
                    assert watcher.ready(0) == []
            got: list[Path] = []
            sizes = []
            deadline = time.monotonic() + 10
            while target not in got:  # the copy is done: time may pass now
                assert time.monotonic() < deadline, "never reported"
                clock.advance(0.1)
                batch = watcher.ready(0.05)
                sizes += [p.stat().st_size for p in batch]
                got += batch
            clock.advance(5 * SETTLE)
            time.sleep(POLL + 0.05)
            got += watcher.ready(0.05)
        assert got == [target]
        assert sizes == [5 * len(chunk)]

    def test_atomic_move_in(self, harness: Harness) -> None:
        staged = write(harness.outside / "IMG_0001.jpg")
        target = harness.root / "IMG_0001.jpg"
        os.rename(staged, target)
        assert harness.collect({target}) == [target]

    def test_temp_name_renamed_to_final(self, harness: Harness) -> None:
        part = harness.root / "IMG_0002.jpg.part"
        target = harness.root / "IMG_0002.jpg"
        with part.open("wb") as fh:
            fh.write(b"a" * 1000)
            fh.flush()
            time.sleep(SETTLE / 2)
            fh.write(b"b" * 1000)
        os.rename(part, target)
        assert harness.collect({target}) == [target]
        assert harness.sizes[target] == 2000

    def test_new_folders_bring_their_files(self, harness: Harness) -> None:
        album = harness.outside / "album"
        for rel in ["a.jpg", "deep/er/b.jpg", ".hidden.jpg", "a.jpg.json", "@eaDir/a.jpg/thumb.jpg"]:
            write(album / rel)
        os.rename(album, harness.root / "album")
        # And a folder made in place, filled right away (before or after its watch exists).
        made = harness.root / "2024" / "06"
        made.mkdir(parents=True)
        expected = {harness.root / "album/a.jpg", harness.root / "album/deep/er/b.jpg"}
        expected |= {write(made / f"{n}.jpg") for n in range(3)}
        got = harness.collect(expected)
        assert sorted(got) == sorted(expected)

    def test_ignored_names_and_vanished_files_never_come_out(self, harness: Harness) -> None:
        for rel in [
            ".hidden.jpg",
            "x.jpg.tmp",
            "y.jpg.crdownload",
            "~lock.jpg",
            "Thumbs.db",
            "@eaDir/z.jpg",
            ".git/objects/ab",
            "a.jpg.json",
            ".a.jpg.json.mmwatchd-tmp-1a2b",
        ]:
            write(harness.root / rel)
        write(harness.root / "deleted.jpg").unlink()
        os.rename(write(harness.root / "moved.jpg"), harness.outside / "moved.jpg")
        os.rename(write(harness.root / "renamed.jpg"), harness.root / ".renamed.jpg")
        folder = harness.root / "folder"
        write(folder / "inside.jpg")
        os.rename(folder, harness.outside / "folder")
        sentinel = write(harness.root / "sentinel.jpg")
        assert harness.collect({sentinel}) == [sentinel]
        assert harness.watcher.pending() == 0

    def test_reading_and_writing_the_sidecar_does_not_retrigger(self, harness: Harness) -> None:
        photo = write(harness.root / "IMG_0003.jpg", b"\xff\xd8" + b"p" * 5000)
        assert harness.collect({photo}, quiet=0) == [photo]  # the window below catches a duplicate too
        # What the pipeline does with a ready file: read it, then write the sidecar atomically beside it.
        assert photo.read_bytes()
        tmp = harness.root / ".IMG_0003.jpg.json.mmwatchd-tmp-9f3c"
        with tmp.open("w") as fh:
            fh.write('{"description": "a photo"}')
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, harness.root / "IMG_0003.jpg.json")
        assert harness.collect(set()) == []


@needs_inotify
class TestWatcherInotify:
    def test_symlinked_root_reports_paths_under_the_link(self, tmp_path: Path) -> None:
        real = tmp_path / "real"
        real.mkdir()
        link = tmp_path / "link"
        link.symlink_to(real, target_is_directory=True)
        with Watcher([WatchRoot(path=link)], settle_s=SETTLE, sidecar_suffix=SIDECAR) as watcher:
            write(real / "a.jpg")
            harness = Harness(watcher, link, tmp_path)
            assert harness.collect({link / "a.jpg"}) == [link / "a.jpg"]

    def test_overflow_is_reported(self, tmp_path: Path) -> None:
        from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent

        calls: list[int] = []
        write(tmp_path / "sub" / "old.jpg")
        with Watcher(
            [WatchRoot(path=tmp_path)], settle_s=SETTLE, sidecar_suffix=SIDECAR, on_overflow=lambda: calls.append(1)
        ) as watcher:
            # What the kernel queues when events were dropped (wd -1, IN_Q_OVERFLOW), fed to the real reader.
            watcher._inotify_fd.handle_event(InotifyEvent(-1, InotifyConstants.IN_Q_OVERFLOW, 0, b""))
            assert calls == [1]
            assert watcher.ready(5.0) == []  # returns at once so the caller can rescan
            assert watcher.take_overflow() is True
            assert watcher.take_overflow() is False
            # watchdog rebuilt its recursive watches: events still arrive from the subfolder.
            new = write(tmp_path / "sub" / "new.jpg")
            assert Harness(watcher, tmp_path, tmp_path).collect({new}) == [new]


@needs_inotify
class TestWatchLimit:
    """Stand in for a full ``fs.inotify.max_user_watches``: the kernel refuses some watches with ENOSPC."""

    @staticmethod
    def refusing(refused: str) -> type:
        class Refusing(watch.InotifyFD):  # type: ignore[misc,valid-type]
            def add_callback(self, path: bytes, *args: object) -> object:
                if os.fsdecode(path).endswith(refused):
                    raise OSError(errno.ENOSPC, "inotify watch limit reached")
                return super().add_callback(path, *args)

        # Our reader first, then the refusal, then watchdog's real reader.
        return type("LimitedFD", (watch._InotifyFD, Refusing), {})

    @pytest.mark.parametrize("refused", ["root", "deep"], ids=["root", "subfolder"])
    def test_falls_back_to_polling_with_a_clear_message(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused: str
    ) -> None:
        root = tmp_path / "root"
        (root / "sub" / "deep").mkdir(parents=True)
        monkeypatch.setattr(watch, "_InotifyFD", self.refusing(refused))
        watcher = Watcher([WatchRoot(path=root, poll_interval_s=POLL)], settle_s=SETTLE, sidecar_suffix=SIDECAR)
        with capture_logs() as logs, watcher:
            assert watcher.backends == {root: "polling"}
            if refused == "deep":
                new = write(root / "sub" / "deep" / "a.jpg")
                assert Harness(watcher, root, tmp_path).collect({new}) == [new]
        [fallback] = [e for e in logs if e["event"] == "watch.polling_fallback"]
        assert "fs.inotify.max_user_watches" in fallback["reason"]
        assert "watch[0].path" in fallback["reason"]
        assert fallback["log_level"] == "warning"


class TestWatcherLifecycle:
    def test_missing_root_is_a_config_error(self, tmp_path: Path) -> None:
        (tmp_path / "file").write_text("")
        roots = [WatchRoot(path=tmp_path), WatchRoot(path=tmp_path / "nope"), WatchRoot(path=tmp_path / "file")]
        watcher = Watcher(roots, settle_s=SETTLE, sidecar_suffix=SIDECAR)
        with pytest.raises(ConfigError) as info:
            watcher.start()
        watcher.stop()
        assert info.value.problems == [
            f"watch[1].path: {tmp_path / 'nope'} does not exist (not mounted? `create: true` makes it)",
            f"watch[2].path: {tmp_path / 'file'} is not a folder",
        ]

    def test_stop_is_idempotent_and_wakes_ready(self, tmp_path: Path) -> None:
        root = WatchRoot(path=tmp_path, polling=True, poll_interval_s=POLL)
        watcher = Watcher([root], settle_s=SETTLE, sidecar_suffix=SIDECAR)
        watcher.start()
        result: list[list[Path]] = []
        waiter = threading.Thread(target=lambda: result.append(watcher.ready(30.0)))
        waiter.start()
        time.sleep(0.05)
        watcher.stop()
        waiter.join(5.0)
        assert not waiter.is_alive()
        assert result == [[]]
        watcher.stop()

    def test_several_roots(self, tmp_path: Path) -> None:
        a, b = tmp_path / "a", tmp_path / "b"
        a.mkdir()
        b.mkdir()
        roots = [WatchRoot(path=a, include=("*.jpg",)), WatchRoot(path=b, polling=True, poll_interval_s=POLL)]
        with Watcher(roots, settle_s=SETTLE, sidecar_suffix=SIDECAR) as watcher:
            if sys.platform.startswith("linux"):
                assert watcher.backends == {a: "inotify", b: "polling"}
            fa, fb, skipped = write(a / "x.jpg"), write(b / "y.png"), write(a / "z.png")
            got = Harness(watcher, tmp_path, tmp_path).collect({fa, fb})
            assert sorted(got) == [fa, fb] and skipped not in got
