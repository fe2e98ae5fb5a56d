"""StabilityTracker: when a file has stopped changing, on real files with a fake clock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from clock import FakeClock

from mmwatchd.settle import StabilityTracker


def write(path: Path, data: bytes = b"x" * 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------------------------------------------------
# StabilityTracker


class TestStabilityTracker:
    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock()

    @pytest.fixture
    def tracker(self, clock: FakeClock) -> StabilityTracker:
        return StabilityTracker(settle_s=1.0, clock=clock)

    def test_not_ready_before_settle(self, tmp_path: Path, clock: FakeClock, tracker: StabilityTracker) -> None:
        f = write(tmp_path / "a.jpg")
        tracker.touch(f)
        assert tracker.next_deadline() == clock.now + 1.0
        clock.advance(0.99)
        assert tracker.due() == []
        clock.advance(0.01)
        assert tracker.due() == [f]
        assert len(tracker) == 0
        assert tracker.next_deadline() is None

    def test_events_push_the_deadline(self, tmp_path: Path, clock: FakeClock, tracker: StabilityTracker) -> None:
        f = write(tmp_path / "a.jpg")
        tracker.touch(f)
        for _ in range(5):
            clock.advance(0.6)
            tracker.touch(f)
            assert tracker.due() == []
        clock.advance(1.0)
        assert tracker.due() == [f]

    def test_growing_file_waits_until_it_stops(
        self, tmp_path: Path, clock: FakeClock, tracker: StabilityTracker
    ) -> None:
        f = write(tmp_path / "a.jpg", b"1")
        tracker.touch(f)
        for n in range(2, 5):  # grows with no event reaching us (e.g. a lagging network share)
            clock.advance(1.0)
            with f.open("ab") as fh:
                fh.write(b"x" * n)
            assert tracker.due() == []
            assert tracker.next_deadline() == clock.now + 1.0
        clock.advance(0.5)
        assert tracker.due() == []
        clock.advance(0.5)
        assert tracker.due() == [f]

    def test_same_size_rewrite_is_noticed_by_mtime(
        self, tmp_path: Path, clock: FakeClock, tracker: StabilityTracker
    ) -> None:
        f = write(tmp_path / "a.jpg", b"aaaa")
        tracker.touch(f)
        clock.advance(1.0)
        f.write_bytes(b"bbbb")
        os.utime(f, ns=(0, f.stat().st_mtime_ns + 1_000_000))
        assert tracker.due() == []
        clock.advance(1.0)
        assert tracker.due() == [f]

    def test_closed_is_ready_after_short_confirm(
        self, tmp_path: Path, clock: FakeClock, tracker: StabilityTracker
    ) -> None:
        assert tracker.confirm_s == pytest.approx(0.2)
        f = write(tmp_path / "a.jpg")
        tracker.touch(f)
        clock.advance(0.1)
        tracker.touch(f, closed=True)
        clock.advance(0.19)
        assert tracker.due() == []
        clock.advance(0.01)
        assert tracker.due() == [f]

    def test_reopened_after_close_waits_for_settle(
        self, tmp_path: Path, clock: FakeClock, tracker: StabilityTracker
    ) -> None:
        f = write(tmp_path / "a.jpg")
        tracker.touch(f, closed=True)
        clock.advance(0.1)
        tracker.touch(f)  # a scanner reopens to append
        clock.advance(0.2)
        assert tracker.due() == []
        clock.advance(0.8)
        assert tracker.due() == [f]

    def test_closed_but_still_changing(self, tmp_path: Path, clock: FakeClock, tracker: StabilityTracker) -> None:
        f = write(tmp_path / "a.jpg", b"1")
        tracker.touch(f, closed=True)
        f.write_bytes(b"12")  # written again, event not seen yet
        clock.advance(0.2)
        assert tracker.due() == []
        clock.advance(1.0)
        assert tracker.due() == [f]

    def test_vanished_file_is_dropped(self, tmp_path: Path, clock: FakeClock, tracker: StabilityTracker) -> None:
        f = write(tmp_path / "a.jpg")
        tracker.touch(f)
        f.unlink()
        clock.advance(1.0)
        assert tracker.due() == []
        assert len(tracker) == 0
        assert tracker.next_deadline() is None

    def test_a_dropped_path_is_reported(self, tmp_path: Path, clock: FakeClock) -> None:
        dropped: list[Path] = []
        tracker = StabilityTracker(settle_s=1.0, clock=clock, on_drop=dropped.append)
        gone, kept = write(tmp_path / "gone.jpg"), write(tmp_path / "kept.jpg")
        tracker.touch(gone)
        tracker.touch(kept)
        gone.unlink()
        clock.advance(1.0)
        assert tracker.due() == [kept]
        assert dropped == [gone]

    def test_replaced_by_a_folder_is_dropped(self, tmp_path: Path, clock: FakeClock, tracker: StabilityTracker) -> None:
        f = write(tmp_path / "a.jpg")
        tracker.touch(f)
        f.unlink()
        f.mkdir()
        clock.advance(1.0)
        assert tracker.due() == []
        assert len(tracker) == 0

    def test_missing_or_non_regular_is_never_tracked(self, tmp_path: Path, tracker: StabilityTracker) -> None:
        tracker.touch(tmp_path / "missing.jpg")
        (tmp_path / "dir.jpg").mkdir()
        tracker.touch(tmp_path / "dir.jpg")
        (tmp_path / "link.jpg").symlink_to(write(tmp_path / "target"))
        tracker.touch(tmp_path / "link.jpg")
        os.mkfifo(tmp_path / "fifo.jpg")
        tracker.touch(tmp_path / "fifo.jpg")
        assert len(tracker) == 0

    def test_one_ready_per_burst(self, tmp_path: Path, clock: FakeClock, tracker: StabilityTracker) -> None:
        f = write(tmp_path / "a.jpg")
        for _ in range(1000):
            tracker.touch(f)
            tracker.touch(f, closed=True)
            clock.advance(0.001)
        assert len(tracker) == 1
        clock.advance(1.0)
        assert tracker.due() == [f]
        clock.advance(10.0)
        assert tracker.due() == []
        tracker.touch(f)  # a later event starts a new burst
        clock.advance(1.0)
        assert tracker.due() == [f]

    def test_ready_in_deadline_order(self, tmp_path: Path, clock: FakeClock, tracker: StabilityTracker) -> None:
        files = [write(tmp_path / f"{n}.jpg") for n in range(5)]
        for f in reversed(files):
            tracker.touch(f)
            clock.advance(0.01)
        clock.advance(1.0)
        assert tracker.due() == list(reversed(files))

    def test_forget_and_forget_tree(self, tmp_path: Path, clock: FakeClock, tracker: StabilityTracker) -> None:
        a, b, c = write(tmp_path / "a.jpg"), write(tmp_path / "sub/b.jpg"), write(tmp_path / "sub2/c.jpg")
        for f in (a, b, c):
            tracker.touch(f)
        tracker.forget(a)
        tracker.forget_tree(tmp_path / "sub")
        assert len(tracker) == 1
        clock.advance(1.0)
        assert tracker.due() == [c]

    def test_settle_must_be_positive(self) -> None:
        with pytest.raises(ValueError, match="settle_s"):
            StabilityTracker(settle_s=-1)

    def test_zero_settle_is_ready_at_once_when_unchanged(self, tmp_path: Path) -> None:
        quick = StabilityTracker(settle_s=0, clock=FakeClock())
        f = write(tmp_path / "a.jpg")
        quick.touch(f, closed=True)
        assert quick.due() == [f]
