"""Which version of a file an answer belongs to, and what the state store keeps about files that failed or went
away: the done-index, retry rows, and sidecars that cannot be written, through the real daemon and state store."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import mounts
import pytest
from configs import write_config
from fakevlm import FakeVLM
from media import make_jpeg
from rewrite import padded_jpeg, rewrite_keeping_size_and_mtime

from mmwatchd import config
from mmwatchd.daemon import Daemon
from mmwatchd.index import DoneIndex
from mmwatchd.state import State
from mmwatchd.vlm import VLMClient


class FastClock:
    """Monotonic time running a thousand times faster: retry backoffs of seconds pass in milliseconds."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self) -> float:
        return self.start + (time.monotonic() - self.start) * 1000


class Service:
    """The daemon as the service runs it (a state store, no one-shot attempt limit), without the watcher."""

    def __init__(self, tmp_path: Path, fake: FakeVLM, **changes: object) -> None:
        self.cfg = config.load(write_config(tmp_path, base_url=fake.base_url, **changes))
        self.state = State(tmp_path / "state" / "state.sqlite3")
        self.client = VLMClient(self.cfg.endpoint, api_key=None)
        self.daemon = Daemon(self.cfg, self.client, state=self.state, clock=FastClock())
        self.daemon.check_endpoint()
        self.daemon.start(prober=False)

    def run(self, *paths: Path) -> None:
        self.daemon.submit_all(paths)
        assert self.daemon.wait_idle(timeout=30)

    def close(self) -> None:
        self.daemon.close()
        self.client.close()


@pytest.fixture
def service(tmp_path: Path, fake_vlm: FakeVLM) -> Iterator[Service]:
    s = Service(tmp_path, fake_vlm, endpoint={"max_attempts": 3})
    try:
        yield s
    finally:
        s.close()


class TestDoneIndex:
    def test_a_same_size_rewrite_with_its_mtime_put_back_is_not_done(self, service: Service) -> None:
        photo = padded_jpeg(service.cfg.watch[0].path / "a.jpg", seed=1)
        service.run(photo)
        root = service.cfg.watch[0]
        index = DoneIndex(service.cfg, service.state.done_index())
        assert [row is not None for _, row in index.walk(root)] == [True]
        rewrite_keeping_size_and_mtime(photo, seed=2)
        index = DoneIndex(service.cfg, service.state.done_index())
        assert [(name, row) for name, row in index.walk(root)] == [(str(photo), None)]  # to be looked at again
        assert list(service.daemon.needing_work()) == [photo]

    def test_entries_from_before_the_upgrade_are_trusted_once_and_then_see_a_rewrite(self, service: Service) -> None:
        photo = padded_jpeg(service.cfg.watch[0].path / "a.jpg", seed=1)
        service.run(photo)
        row = service.state.done_index()[str(photo)]
        st = photo.stat()
        assert (row.size, row.mtime_ns, row.ino, row.ctime_ns) == (st.st_size, st.st_mtime_ns, st.st_ino,
                                                                    st.st_ctime_ns)  # fmt: skip
        # As an older mmwatchd left it: no inode, no ctime.
        service.state.mark_done(photo, size=row.size, mtime_ns=row.mtime_ns, media_kind=row.media_kind,
                                fingerprint=row.fingerprint, answer="ok")  # fmt: skip
        assert list(service.daemon.needing_work()) == []  # trusted on size and mtime: nothing read, nothing sent
        assert service.state.done_index()[str(photo)].ino == st.st_ino  # ...and given the file's inode and ctime
        rewrite_keeping_size_and_mtime(photo, seed=2)
        assert list(service.daemon.needing_work()) == [photo]


class TestRetryRows:
    def test_a_file_that_is_gone_leaves_no_retry_row(self, service: Service, tmp_path: Path) -> None:
        gone = tmp_path / "inbox" / "a.jpg"
        service.state.record_attempt(gone, root=str(tmp_path / "inbox"), kind="unavailable", message="503",
                                     retry_at=None)  # fmt: skip
        service.state.record_attempt(gone, root=str(tmp_path / "inbox"), kind="unavailable", message="503",
                                     retry_at=None)  # fmt: skip
        service.run(gone)
        assert service.state.retrying() == []
        # A new file of that name starts with no attempts.
        assert service.state.attempts(gone) == 0

    def test_a_folder_that_cannot_take_sidecars_ends_in_a_recorded_error_without_a_request(
        self, service: Service, tmp_path: Path, fake_vlm: FakeVLM
    ) -> None:
        with mounts.tmpfs(tmp_path / "inbox" / "ro", "1m") as ro:
            photo = make_jpeg(ro / "a.jpg", (32, 24))
            mounts.read_only(ro)
            service.run(photo)
            (outcome,) = service.daemon.outcomes
            assert outcome.status == "error" and "cannot write sidecars into this folder" in outcome.reason
            (error,) = service.state.last_errors()
            assert error.path == photo and error.kind == "sidecar"
            assert "Read-only file system" in error.message and str(ro) in error.message
            assert service.state.retrying() == [] and str(photo) not in service.state.done_index()
            assert os.listdir(ro) == ["a.jpg"]
        assert fake_vlm.chat_requests == []
