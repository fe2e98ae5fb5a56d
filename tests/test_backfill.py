"""Batch backfill (issue 14): the backlog through the OpenAI Batch API (a fake Files/Batches server driven by the real
``openai`` client), or exported as JSONL for ``vllm run-batch`` and imported back; the same sidecars as the online
path, resumable from the state store, files changed since they were batched sent the online way."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from configs import write_config
from described import SCHEMA
from fakebatch import Batch, FakeBatchVLM
from fakevlm import FakeVLM, Recorded, error_body
from media import make_jpeg, make_png

from mmwatchd import sidecar
from mmwatchd.backfill import Backfill, _ShardWriter
from mmwatchd.cli import _one_shot_daemon, main
from mmwatchd.config import load
from mmwatchd.pipeline import Outcome, Prepared
from mmwatchd.state import FILENAME, State

#: Only what differs from one run to the next: when it was written and how long it took.
VOLATILE = ("created", "elapsed_s")
#: A backfill that writes one line into a new shard and is killed before the shard is complete.
_KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from mmwatchd.backfill import Backfill, _ShardWriter
from mmwatchd.cli import _one_shot_daemon
from mmwatchd.config import load
if __name__ == "__main__":
    daemon = _one_shot_daemon(load(Path(sys.argv[1])))
    backfill = Backfill(daemon)
    writer = _ShardWriter(backfill, backfill.shard_dir, "api")
    prepared = daemon.processor.prepare(Path(sys.argv[2]))
    assert writer.add(prepared)
    os.kill(os.getpid(), signal.SIGKILL)
"""


#: Another backfill acting on a shard: holds the shard's lease until its stdin closes or it is killed.
_LEASE_HOLDER = """
import sys
from pathlib import Path
from mmwatchd.state import State
if __name__ == "__main__":
    with State(Path(sys.argv[1])) as state, state.batch_lease(sys.argv[2]) as row:
        print("held" if row is not None else "busy", flush=True)
        sys.stdin.read()
"""


@contextlib.contextmanager
def _held(tmp_path: Path, batch_id: str) -> Iterator[None]:
    """A real process holds ``batch_id``'s lease meanwhile, and is then killed (SIGKILL): its lock goes with it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _LEASE_HOLDER, str(tmp_path / "state" / FILENAME), batch_id],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        yield
    finally:
        holder.kill()
        holder.communicate(timeout=30)


def _batch_requests(fake: FakeBatchVLM) -> list[str]:
    """The Files and Batches API requests so far (method and path)."""
    return [f"{r.method} {r.path}" for r in fake.requests if "/files" in r.path or "/batches" in r.path]


@pytest.fixture
def fake() -> Iterator[FakeBatchVLM]:
    server = FakeBatchVLM().start()
    try:
        yield server
    finally:
        server.stop()


def _config(tmp_path: Path, fake: FakeVLM, **changes: Any) -> Path:
    rule = {"match": {"kind": "image"}, "schema": SCHEMA, **changes.pop("rule", {})}
    batch = {"poll_interval_s": 0.01, **changes.pop("batch", {})}
    return write_config(tmp_path, base_url=fake.base_url, rule=rule, batch=batch, **changes)


def _photos(inbox: Path, n: int = 3) -> list[Path]:
    photos = [make_jpeg(inbox / f"p{i}.jpg", (96 + 8 * i, 64), seed=i) for i in range(n)]
    return [*photos, make_png(inbox / "sub" / "drawing.png", (50, 40))]


def _sidecar(path: Path) -> dict[str, Any]:
    return json.loads(path.with_name(path.name + ".json").read_text())


def _stable(doc: dict[str, Any]) -> dict[str, Any]:
    doc = {k: v for k, v in doc.items() if k not in VOLATILE}
    if "response" in doc:
        doc["response"] = {k: v for k, v in doc["response"].items() if k != "latency_s"}
    return doc


class _Run:
    """A backfill in this process over a one-shot daemon, as the command makes it; polls do not sleep."""

    def __init__(self, cfg: Path, **kw: Any) -> None:
        self.daemon = _one_shot_daemon(load(cfg), metrics=True)
        self.backfill = Backfill(self.daemon, sleep=lambda s: None, **kw)

    def __enter__(self) -> Backfill:
        return self.backfill

    def __exit__(self, *exc: object) -> None:
        self.daemon.close()


def _writing(backfill: Backfill, photo: Path) -> _ShardWriter:
    """A shard ``backfill`` is still filling, with ``photo``'s line written (and recorded) in it."""
    writer = _ShardWriter(backfill, backfill.shard_dir, "api")
    prepared = backfill.daemon.processor.prepare(photo)
    assert isinstance(prepared, Prepared)
    try:
        assert writer.add(prepared)
    finally:
        prepared.release()
    return writer


def _where(fake: FakeBatchVLM, batch: Batch, name: str) -> str:
    """The custom_id of the line about the file ``name`` (its prompt names it)."""
    for line in fake.input_lines(batch.id):
        if f'\\"{name}\\"' in json.dumps(line["body"]["messages"]):
            return str(line["custom_id"])
    raise AssertionError(f"{name} is in no line of {batch.id}")


class TestSameAsOnline:
    def test_a_backfill_writes_the_sidecars_and_xmp_the_online_path_writes(
        self, tmp_path: Path, fake: FakeBatchVLM
    ) -> None:
        cfg = _config(tmp_path, fake, sidecar={"xmp": {"prefix": "AI/"}})
        photos = _photos(tmp_path / "inbox")
        assert main(["scan", "-c", str(cfg), "--log-level", "error"]) == 0
        online = {p: _sidecar(p) for p in photos}
        online_xmp = {p: p.with_name(p.name + ".xmp").read_bytes() for p in photos}
        bodies = sorted(json.dumps(r.json, sort_keys=True) for r in fake.chat_requests)
        for p in photos:  # start again from nothing: no sidecars, no state
            p.with_name(p.name + ".json").unlink()
            p.with_name(p.name + ".xmp").unlink()
        shutil.rmtree(tmp_path / "state")
        sent = len(fake.chat_requests)

        assert main(["backfill", "-c", str(cfg), "--batch", "--log-level", "error"]) == 0

        assert len(fake.chat_requests) == sent, "nothing went the online way"
        assert fake.problems == [] and len(fake.batches) == 1
        (batch,) = fake.batches.values()
        assert sorted(json.dumps(line["body"], sort_keys=True) for line in fake.input_lines(batch.id)) == bodies
        for p in photos:
            assert _stable(_sidecar(p)) == _stable(online[p]), p
            assert p.with_name(p.name + ".xmp").read_bytes() == online_xmp[p], p
        with State(tmp_path / "state" / FILENAME) as state:
            (row,) = state.batches()
            assert row.status == "applied" and row.remote_id == batch.id and state.batch_items(row.id) == {}
            assert set(state.done_index()) == {str(p) for p in photos}  # the next scan skips them from a stat
        assert list((tmp_path / "state" / "batches").iterdir()) == []  # uploaded and answered: not kept
        assert main(["scan", "-c", str(cfg), "--log-level", "error"]) == 0
        assert len(fake.chat_requests) == sent

    def test_the_rules_actions_run_with_the_same_values(self, tmp_path: Path, fake: FakeBatchVLM) -> None:
        log = tmp_path / "actions.log"
        hook = ["sh", "-c", 'printf "%s|%s|%s|%s\\n" "$1" "$2" "$3" "$4" >> "$0"', str(log),
                "{name}", "{relpath}", "{width}x{height}", "{status}"]  # fmt: skip
        cfg = _config(tmp_path, fake, rule={"on_success": {"exec": hook}})
        _photos(tmp_path / "inbox")
        assert main(["scan", "-c", str(cfg), "--log-level", "error"]) == 0
        online = sorted(log.read_text().splitlines())
        assert len(online) == 4 and "p1.jpg|p1.jpg|104x64|ok" in online
        for side in (tmp_path / "inbox").rglob("*.json"):
            side.unlink()
        shutil.rmtree(tmp_path / "state")
        log.unlink()
        assert main(["backfill", "-c", str(cfg), "--batch", "--log-level", "error"]) == 0
        assert sorted(log.read_text().splitlines()) == online
        assert fake.chat_requests[4:] == []

    def test_output_out_of_order_and_the_error_file_follow_the_online_rules(
        self, tmp_path: Path, fake: FakeBatchVLM
    ) -> None:
        cfg = _config(tmp_path, fake)
        inbox = tmp_path / "inbox"
        photos = {name: make_jpeg(inbox / name, (64, 48), seed=i) for i, name in
                  enumerate(["ok.jpg", "refused.jpg", "busy.jpg", "expired.jpg", "garbled.jpg"])}  # fmt: skip

        def errors(batch: Batch) -> None:
            fake.line_errors[_where(fake, batch, "refused.jpg")] = (400, error_body("prompt violates the policy"))
            fake.line_errors[_where(fake, batch, "busy.jpg")] = (503, error_body("overloaded"))
            fake.line_unanswered.add(_where(fake, batch, "expired.jpg"))

        fake.on_finish = errors
        # One of the lines the batch answers has a reply that does not match the schema: the online path asks again.
        real_default = FakeVLM._default

        def garbled(self: FakeVLM, request: Recorded) -> Any:
            answer = real_default(self, request)
            if request.json and '\\"garbled.jpg\\"' in json.dumps(request.json) and self is fake and \
                    request in fake.batch_answered:  # fmt: skip
                answer.json["choices"][0]["message"]["content"] = "not json"
            return answer

        FakeVLM._default = garbled  # type: ignore[method-assign]
        try:
            with _Run(cfg) as backfill:
                summary = backfill.run()
        finally:
            FakeVLM._default = real_default  # type: ignore[method-assign]
        refused = _sidecar(photos["refused.jpg"])
        assert refused["status"] == "error" and refused["error"]["kind"] == "rejected"
        assert "HTTP 400" in refused["error"]["message"] and "violates the policy" in refused["error"]["message"]
        for name in ("ok.jpg", "busy.jpg", "expired.jpg", "garbled.jpg"):
            assert _sidecar(photos[name])["status"] == "ok", name
        online = sorted(re.search(r'\\"(\w+\.jpg)\\"', json.dumps(r.json))[1] for r in fake.chat_requests)
        assert online == ["busy.jpg", "expired.jpg", "garbled.jpg"]
        assert sorted(p.name for p in summary.online) == online
        assert summary.outcomes == {"ok": 1, "error": 1}

    def test_a_file_changed_after_batching_gets_no_stale_answer(self, tmp_path: Path, fake: FakeBatchVLM) -> None:
        cfg = _config(tmp_path, fake)
        inbox = tmp_path / "inbox"
        same = make_jpeg(inbox / "same.jpg", (64, 48), seed=1)
        changed = make_jpeg(inbox / "changed.jpg", (64, 48), seed=2)
        fake.on_finish = lambda batch: make_jpeg(changed, (80, 60), seed=3)  # rewritten while the batch ran
        with _Run(cfg) as backfill:
            summary = backfill.run()
        assert summary.online == [changed]
        doc = _sidecar(changed)
        assert doc["status"] == "ok" and doc["media"]["width"] == 80  # described again, as it is now
        assert doc["source"]["size"] == changed.stat().st_size
        assert len(fake.chat_requests) == 1 and "(80x60)" in json.dumps(fake.chat_requests[0].json)
        assert _sidecar(same)["status"] == "ok"


class TestResume:
    def test_a_restart_picks_up_the_batch_from_the_state_store(
        self, tmp_path: Path, fake: FakeBatchVLM, capsys: pytest.CaptureFixture[str]
    ) -> None:
        cfg = _config(tmp_path, fake)
        photos = _photos(tmp_path / "inbox", 2)
        with _Run(cfg) as first:
            first.run(wait=False)  # sent; the process stops before any answer
        assert not any(p.with_name(p.name + ".json").exists() for p in photos)
        (batch,) = fake.batches.values()
        assert main(["backfill", "-c", str(cfg), "--status", "--log-level", "error"]) == 0
        out = capsys.readouterr().out
        assert batch.id in out and f"{len(photos)} files waiting" in out and "api" in out

        with _Run(cfg) as second:  # another process: nothing in memory, all from the state store
            summary = second.run()
        assert len(fake.batches) == 1 and len(fake.files) == 2  # no second upload: the input and its output
        assert summary.batched == 0 and summary.outcomes == {"ok": len(photos)}
        assert all(_sidecar(p)["status"] == "ok" for p in photos)
        assert fake.chat_requests == []

    def test_a_scan_meanwhile_leaves_the_batched_files_to_the_backfill(
        self, tmp_path: Path, fake: FakeBatchVLM, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The service or a scan running while a shard is out does not pay for its files a second time: they are
        skipped, saying which shard has them, until the backfill applies the answers."""
        cfg = _config(tmp_path, fake)
        photos = _photos(tmp_path / "inbox", 2)
        with _Run(cfg) as first:
            first.run(wait=False)
        assert len(fake.batches) == 1  # sent, not answered yet
        assert main(["scan", "-c", str(cfg), "--log-level", "error"]) == 0
        assert f"0 described, 0 failed, 0 not reached, {len(photos)} skipped" in capsys.readouterr().out
        assert main(["once", "-c", str(cfg), "--log-level", "error", str(photos[0])]) == 0
        out = capsys.readouterr().out
        assert "in batch backfill shard mmw-" in out and "mmwatchd backfill --cancel" in out
        assert fake.chat_requests == []

        with _Run(cfg) as second:
            assert second.run().outcomes == {"ok": len(photos)}
        assert all(_sidecar(p)["status"] == "ok" for p in photos) and fake.chat_requests == []

    def test_a_file_another_process_is_describing_is_left_to_it(self, tmp_path: Path, fake: FakeBatchVLM) -> None:
        """The service has claimed a file's sidecar (its request is on the wire) when the backfill reaches it: the
        backfill leaves it to the service instead of batching it too."""
        cfg = _config(tmp_path, fake)
        photos = _photos(tmp_path / "inbox", 2)
        held = sidecar.claim(photos[0].with_name(photos[0].name + ".json"))  # as the service's worker holds it
        assert held is not None
        try:
            with _Run(cfg) as backfill:
                summary = backfill.run()
        finally:
            held.release()
        (batch,) = fake.batches.values()
        batched = json.dumps([line["body"] for line in fake.input_lines(batch.id)])
        assert photos[0].name not in batched and photos[1].name in batched
        assert summary.batched == len(photos) - 1 and summary.online == [] and fake.chat_requests == []
        assert not photos[0].with_name(photos[0].name + ".json").exists()  # the service writes it

    def test_a_shard_holds_each_file_from_the_moment_its_line_is_written(
        self, tmp_path: Path, fake: FakeBatchVLM, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A scan (or the service) that reaches a file the backfill has just written into a shard it is still
        filling leaves it to the backfill: the line is recorded while the file is claimed, not when the shard is
        full, which can take hours."""
        cfg = _config(tmp_path, fake)
        photos = _photos(tmp_path / "inbox", 2)
        with _Run(cfg) as backfill:
            writer = _writing(backfill, photos[0])
            assert main(["scan", "-c", str(cfg), "--log-level", "error"]) == 0
            assert f"{len(photos) - 1} described, 0 failed, 0 not reached, 1 skipped" in capsys.readouterr().out
            assert [r for r in fake.chat_requests if photos[0].name.encode() in r.body] == []
            writer.close()
            (row,) = backfill.state.batches()
            assert (row.status, row.requests) == ("written", 1)
            backfill.run()
        assert _sidecar(photos[0])["status"] == "ok" and len(fake.chat_requests) == len(photos) - 1

    def test_two_backfills_at_once_batch_each_file_once(self, tmp_path: Path, fake: FakeBatchVLM) -> None:
        """A second backfill started while the first is still filling its shard does not batch what the first
        has written meanwhile, after the second had listed the folders."""
        cfg = _config(tmp_path, fake)
        photos = _photos(tmp_path / "inbox", 2)
        with _Run(cfg) as first, _Run(cfg) as second:
            writer = _writing(first, photos[0])
            late = second.daemon.processor.prepare(photos[0])  # as if listed before the first wrote the line
            assert isinstance(late, Outcome) and late.status == "skipped"
            assert late.reason is not None and late.reason.startswith(f"in batch backfill shard {writer._open().id}")
            second.run()
            writer.close()
            first.run()
        lines = [line for batch in fake.batches for line in fake.input_lines(batch)]
        assert len(lines) == len(photos) and all(_sidecar(p)["status"] == "ok" for p in photos)

    def test_a_shard_whose_backfill_was_killed_holds_nothing(
        self, tmp_path: Path, fake: FakeBatchVLM, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A backfill killed (SIGKILL) while it writes a shard leaves lines recorded for an incomplete shard that is
        never sent: the online path describes those files, and the next backfill drops the shard."""
        cfg = _config(tmp_path, fake)
        photos = _photos(tmp_path / "inbox", 1)
        child = subprocess.run(
            [sys.executable, "-c", _KILLED_WRITER, str(cfg), str(photos[0])], capture_output=True, text=True, timeout=60
        )
        assert child.returncode == -signal.SIGKILL, child.stderr
        with State(tmp_path / "state" / FILENAME) as state:
            (row,) = state.batches()
        assert row.status == "writing" and Path(row.shard).exists()
        assert main(["backfill", "-c", str(cfg), "--status"]) == 0
        assert "abandoned (its backfill stopped while writing it)" in capsys.readouterr().out
        assert main(["scan", "-c", str(cfg), "--log-level", "error"]) == 0
        assert f"{len(photos)} described" in capsys.readouterr().out
        with _Run(cfg) as backfill:
            backfill.run()
            assert backfill.state.batches() == [] and not Path(row.shard).exists()
        assert fake.batches == {} and len(fake.chat_requests) == len(photos)

    def test_a_shard_another_backfill_is_sending_is_sent_once(self, tmp_path: Path, fake: FakeBatchVLM) -> None:
        """Two backfills at once (a cron job while another still runs): a written shard the other is uploading is
        neither uploaded nor made a batch a second time (it would be paid for twice)."""
        cfg = _config(tmp_path, fake)
        photos = _photos(tmp_path / "inbox", 2)
        with _Run(cfg) as first, _Run(cfg) as second:
            (row,) = first.write_shards(first.shard_dir, mode="api")
            with _held(tmp_path, row.id):
                second.run(wait=False)
                assert _batch_requests(fake) == []
            second.run()
        assert [r for r in _batch_requests(fake) if r.startswith("POST")] == ["POST /v1/files", "POST /v1/batches"]
        assert all(_sidecar(p)["status"] == "ok" for p in photos)

    def test_a_batch_another_backfill_is_applying_is_left_to_it(self, tmp_path: Path, fake: FakeBatchVLM) -> None:
        """While another process holds a batch (looks at it, downloads and applies its answers), this backfill
        does not even ask about it; once that process is gone (killed here), the batch is this one's to finish."""
        cfg = _config(tmp_path, fake)
        photos = _photos(tmp_path / "inbox", 2)
        with _Run(cfg) as backfill:
            backfill.run(wait=False)
            (row,) = backfill.state.batches()
            asked = len(_batch_requests(fake))
            with _held(tmp_path, row.id):
                backfill.poll(wait=False)
                assert len(_batch_requests(fake)) == asked
            backfill.poll(wait=True)
        assert all(_sidecar(p)["status"] == "ok" for p in photos)
        assert not (tmp_path / "state" / "batch-locks" / f"{row.id}.lock").exists()  # gone with the closed shard

    def test_a_batch_applied_meanwhile_is_not_applied_again(
        self, tmp_path: Path, fake: FakeBatchVLM, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A backfill that listed the shards before another (a real ``mmwatchd backfill`` process) applied one
        reads it again under its lease: it neither downloads nor applies it a second time, and the record the
        other left (its message) stays."""
        cfg = _config(tmp_path, fake)
        photos = _photos(tmp_path / "inbox", 2)
        with _Run(cfg) as backfill:
            backfill.run(wait=False)
            listed = backfill._open()
            other = subprocess.run(
                [sys.executable, "-m", "mmwatchd", "backfill", "-c", str(cfg), "--batch", "--log-level", "error"],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert other.returncode == 0, other.stderr
            (applied,) = backfill.state.batches()
            assert applied.status == "applied"
            written = {p: p.with_name(p.name + ".json").stat().st_mtime_ns for p in photos}
            asked = len(_batch_requests(fake))
            monkeypatch.setattr(backfill, "_open", lambda *statuses: listed)
            backfill.poll(wait=False)
            assert len(_batch_requests(fake)) == asked
            assert backfill.state.batch(applied.id) == applied
            assert backfill.daemon.counts["ok"] == 0
        assert {p: p.with_name(p.name + ".json").stat().st_mtime_ns for p in photos} == written

    def test_cancel_leaves_a_batch_another_backfill_holds_and_says_so(
        self, tmp_path: Path, fake: FakeBatchVLM, capsys: pytest.CaptureFixture[str]
    ) -> None:
        cfg = _config(tmp_path, fake)
        _photos(tmp_path / "inbox", 1)
        with _Run(cfg) as first:
            first.run(wait=False)
            (row,) = first.state.batches()
        (batch,) = fake.batches.values()
        status = batch.status
        with _held(tmp_path, row.id):
            assert main(["backfill", "-c", str(cfg), "--cancel", "--log-level", "error"]) == 1
            err = capsys.readouterr().err
            assert f"{row.id}: another backfill was sending, applying or cancelling it" in err
            assert "run backfill --cancel again" in err and batch.status == status
        assert main(["backfill", "-c", str(cfg), "--cancel", "--log-level", "error"]) == 0
        assert batch.status == "cancelling" and f"cancelled {row.id}" in capsys.readouterr().out

    def test_a_failed_poll_is_asked_again_at_the_next_interval(self, tmp_path: Path, fake: FakeBatchVLM) -> None:
        cfg = _config(tmp_path, fake)
        photos = _photos(tmp_path / "inbox", 1)
        waits: list[float] = []
        with _Run(cfg) as backfill:
            backfill.sleep = waits.append
            backfill.run(wait=False)
            (batch,) = fake.batches.values()
            fake.enqueue(status=503, json=error_body("try later"), path=f"/v1/batches/{batch.id}")
            backfill.run()
        assert all(_sidecar(p)["status"] == "ok" for p in photos)
        assert waits and set(waits) == {0.01}  # batch.poll_interval_s between looks, never a real sleep
        assert batch.looks == fake.polls_to_finish + 1

    def test_answers_for_a_rule_changed_meanwhile_are_not_applied(self, tmp_path: Path, fake: FakeBatchVLM) -> None:
        cfg = _config(tmp_path, fake)
        photos = _photos(tmp_path / "inbox", 1)
        with _Run(cfg) as first:
            first.run(wait=False)
        cfg = _config(tmp_path, fake, rule={"prompt": "Caption {name} for a photo book."})
        with _Run(cfg) as second:
            summary = second.run()
        assert sorted(summary.online) == sorted(photos) and summary.outcomes == {}
        assert len(fake.chat_requests) == len(photos)
        assert all("photo book" in json.dumps(r.json) for r in fake.chat_requests)
        assert main(["scan", "-c", str(cfg), "--log-level", "error"]) == 0  # up to date under the new rule
        assert len(fake.chat_requests) == len(photos)

    def test_a_clip_goes_online_until_the_endpoint_is_known_to_take_video_url(
        self, tmp_path: Path, fake: FakeBatchVLM
    ) -> None:
        from media import make_video

        clips = {"name": "clips", "match": {"kind": "video"}, "prompt": "Describe {name}.",
                 "video": {"frames": 2, "max_side": 64}}  # fmt: skip
        photos = {"name": "photos", "match": {"kind": "image"}, "prompt": "Describe {name}."}
        cfg = _config(tmp_path, fake, rules=[photos, clips])
        inbox = tmp_path / "inbox"
        first = make_video(inbox / "first.mp4", (64, 48), frames=4, fps=4)
        with _Run(cfg) as backfill:
            summary = backfill.run()
        assert summary.online == [first] and fake.batches == {}  # the online request asked, and taught it
        assert _sidecar(first)["media"]["mode"] == "video_url"
        second = make_video(inbox / "second.mp4", (64, 48), frames=4, fps=4)
        with _Run(cfg) as backfill:
            summary = backfill.run()
        assert summary.online == [] and summary.outcomes == {"ok": 1}
        (batch,) = fake.batches.values()
        (line,) = fake.input_lines(batch.id)
        assert line["body"]["messages"][-1]["content"][1]["type"] == "video_url"
        assert _sidecar(second)["media"]["mode"] == "video_url"

    def test_cancel_then_the_files_go_the_online_way(
        self, tmp_path: Path, fake: FakeBatchVLM, capsys: pytest.CaptureFixture[str]
    ) -> None:
        cfg = _config(tmp_path, fake)
        photos = _photos(tmp_path / "inbox", 2)
        with _Run(cfg) as first:
            first.run(wait=False)
        (batch,) = fake.batches.values()
        assert main(["backfill", "-c", str(cfg), "--cancel", "--log-level", "error"]) == 0
        assert batch.status == "cancelling" and "cancelled mmw-" in capsys.readouterr().out
        assert main(["backfill", "-c", str(cfg), "--batch", "--log-level", "error"]) == 0
        assert batch.status == "cancelled" and len(fake.batches) == 1
        assert all(_sidecar(p)["status"] == "ok" for p in photos)
        assert len(fake.chat_requests) == len(photos)
        with State(tmp_path / "state" / FILENAME) as state:
            (row,) = state.batches()
        assert row.status == "applied" and row.message == f"cancelled: {len(photos)} online"


class TestShards:
    def test_shards_stay_under_the_byte_and_request_limits(self, tmp_path: Path, fake: FakeBatchVLM) -> None:
        inbox = tmp_path / "inbox"
        photos = [make_jpeg(inbox / f"p{i}.jpg", (64, 48), seed=i) for i in range(5)]
        cfg = _config(tmp_path, fake)
        with _Run(cfg) as probe:  # how long one line is
            prepared = probe.daemon.processor.prepare(photos[0])
            assert isinstance(prepared, Prepared)
            prepared.release()
            line = len(json.dumps({"body": prepared.body}))
        limit = int(line * 2.6)  # two lines fit, three do not
        cfg = _config(tmp_path, fake, batch={"max_file_bytes": limit})
        with _Run(cfg) as backfill:
            summary = backfill.run()
        sizes = sorted(len(fake.input_lines(b)) for b in fake.batches)
        assert sizes == [1, 2, 2] and len(summary.shards) == 3
        assert all(len(fake.files[b.input_file_id]) <= limit for b in fake.batches.values())
        assert all(_sidecar(p)["status"] == "ok" for p in photos)

        for p in photos:
            p.with_name(p.name + ".json").unlink()
        cfg = _config(tmp_path, fake, batch={"max_requests": 2}, rule={"prompt": "Again: {name}"})
        with _Run(cfg) as backfill:
            backfill.run()
        assert sorted(len(fake.input_lines(b)) for b in list(fake.batches)[3:]) == [1, 2, 2]

    def test_a_request_too_large_for_any_shard_goes_online(self, tmp_path: Path, fake: FakeBatchVLM) -> None:
        photo = make_jpeg(tmp_path / "inbox" / "a.jpg", (64, 48))
        cfg = _config(tmp_path, fake, batch={"max_file_bytes": 100})
        with _Run(cfg) as backfill:
            summary = backfill.run()
        assert summary.online == [photo] and fake.batches == {} and _sidecar(photo)["status"] == "ok"


class TestExportImport:
    def test_export_run_elsewhere_import(
        self, tmp_path: Path, fake: FakeBatchVLM, capsys: pytest.CaptureFixture[str]
    ) -> None:
        cfg = _config(tmp_path, fake)
        photos = _photos(tmp_path / "inbox", 2)
        out_dir = tmp_path / "shards"
        assert main(["backfill", "-c", str(cfg), "--export", str(out_dir), "--log-level", "error"]) == 0
        (shard,) = out_dir.glob("*.jsonl")
        assert f"shard    {shard}" in capsys.readouterr().out
        assert main(["backfill", "-c", str(cfg), "--status", "--log-level", "error"]) == 0
        assert "exported" in capsys.readouterr().out
        # A second export while the first is out holds nothing new.
        assert main(["backfill", "-c", str(cfg), "--export", str(out_dir), "--log-level", "error"]) == 0
        assert len(list(out_dir.glob("*.jsonl"))) == 1

        # What vllm run-batch writes: one line per request, its own order, errors as null.
        lines = [json.loads(raw) for raw in shard.read_text().splitlines()]
        output = tmp_path / "out.jsonl"
        with output.open("w") as f:
            for line in reversed(lines):
                if '\\"drawing.png\\"' in json.dumps(line["body"]):  # vLLM's error line: no body, the error beside
                    vllm_error = {"error": {"message": "image is too small to encode", "type": "BadRequestError",
                                            "param": None, "code": 400}}  # fmt: skip
                    f.write(json.dumps({"id": "vllm-2", "custom_id": line["custom_id"],
                                        "response": {"status_code": 400, "request_id": "r", "body": None},
                                        "error": vllm_error}) + "\n")  # fmt: skip
                    continue
                fakeline = Recorded(method="POST", path="/v1/chat/completions", headers={}, body=b"",
                                    json=line["body"], content_length=None)  # fmt: skip
                body = FakeVLM._default(fake, fakeline).json
                f.write(json.dumps({"id": "vllm-1", "custom_id": line["custom_id"],
                                    "response": {"status_code": 200, "request_id": "r", "body": body},
                                    "error": None}) + "\n")  # fmt: skip
        assert main(["backfill", "-c", str(cfg), "--import", str(output), "--log-level", "error"]) == 1
        assert "backfill imported: 2 described, 1 failed" in capsys.readouterr().out
        assert [_sidecar(p)["status"] for p in photos] == ["ok", "ok", "error"]
        error = _sidecar(photos[2])["error"]
        assert error["kind"] == "rejected" and "HTTP 400" in error["message"]
        assert "image is too small to encode" in error["message"]
        assert fake.chat_requests == [] and fake.batches == {}
        # The same output again: its lines belong to no open shard any more.
        assert main(["backfill", "-c", str(cfg), "--import", str(output), "--log-level", "error"]) == 0
        assert "belong to no batch" in capsys.readouterr().err


class TestCommand:
    def test_metrics_textfile(self, tmp_path: Path, fake: FakeBatchVLM) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        cfg = _config(tmp_path, fake)
        _photos(tmp_path / "inbox", 2)
        prom = tmp_path / "backfill.prom"
        assert (
            main(["backfill", "-c", str(cfg), "--batch", "--metrics-textfile", str(prom), "--log-level", "error"]) == 0
        )
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(prom.read_text()) for s in fam.samples}  # fmt: skip
        ok = [
            v for (name, labels), v in samples.items() if name == "mmwatchd_files_total" and ("outcome", "ok") in labels
        ]
        assert sum(ok) == 3
        tokens = [v for (name, _labels), v in samples.items() if name == "mmwatchd_tokens_total"]
        assert sum(tokens) > 0

    def test_unknown_endpoint_name_is_a_usage_error(
        self, tmp_path: Path, fake: FakeBatchVLM, capsys: pytest.CaptureFixture[str]
    ) -> None:
        cfg = _config(tmp_path, fake)
        assert main(["backfill", "-c", str(cfg), "--batch", "--endpoint", "gpu2"]) == 2
        err = capsys.readouterr().err
        assert "--endpoint gpu2: no endpoint of that name" in err and "Traceback" not in err
        assert main(["backfill", "-c", str(cfg), "--status", "--endpoint", "default"]) == 0
        assert "no batches yet" in capsys.readouterr().out

    def test_an_endpoint_without_a_batch_api_says_what_to_do_instead(
        self, tmp_path: Path, fake_vlm: FakeVLM, capsys: pytest.CaptureFixture[str]
    ) -> None:
        cfg = _config(tmp_path, fake_vlm)
        _photos(tmp_path / "inbox", 1)
        assert main(["backfill", "-c", str(cfg), "--batch", "--log-level", "error"]) == 1
        err = capsys.readouterr().err
        assert "has no Batch API (HTTP 404 at /v1/files)" in err and "backfill --export" in err, err
        assert "Traceback" not in err
        assert main(["backfill", "-c", str(cfg), "--status"]) == 0
        assert " written " in capsys.readouterr().out  # kept: --cancel drops it, or a later --batch sends it
        assert main(["backfill", "-c", str(cfg), "--cancel", "--log-level", "error"]) == 0
        assert main(["backfill", "-c", str(cfg), "--status"]) == 0
        assert " dropped " in capsys.readouterr().out


class TestStateStore:
    def test_shards_and_their_lines_survive_a_reopen(self, tmp_path: Path) -> None:
        from mmwatchd.state import BatchItem, BatchRow

        db = tmp_path / FILENAME
        row = BatchRow("mmw-1", "api", "default", str(tmp_path / "mmw-1.jsonl"), 2, 1234, "written", None, None,
                       None, None, None, 1.0, 1.0)  # fmt: skip
        odd = Path(tmp_path / "caf\udce9.jpg")  # a name that is not UTF-8
        record = {"rule": "photos", "media": {"kind": "image"}}
        items = [
            BatchItem(f"mmw-1-0000{i}", "mmw-1", path, 10 + i, 20 + i, 30 + i, 40 + i, f"sha{i}", "fp", record)
            for i, path in enumerate([tmp_path / "a.jpg", odd])
        ]
        with State(db) as state:
            state.add_batch(row, items)
            state.update_batch("mmw-1", status="in_progress", remote_id="batch_9", input_file_id="file-1")
            with pytest.raises(ValueError, match="not batch fields"):
                state.update_batch("mmw-1", shard="elsewhere")
        with State(db) as state:  # another process
            (again,) = state.batches()
            assert (again.status, again.remote_id, again.input_file_id, again.requests) == (
                "in_progress",
                "batch_9",
                "file-1",
                2,
            )
            assert state.batch_items("mmw-1") == {i.custom_id: i for i in items}
            assert state.batch_items(custom_ids=["mmw-1-00001", "nope"]) == {"mmw-1-00001": items[1]}
            assert state.batched_paths(["in_progress"]) == {str(tmp_path / "a.jpg"), str(odd)}
            assert state.batched_paths(["applied"]) == set()
            state.forget_batch_items("mmw-1")
            assert state.batch_items("mmw-1") == {} and len(state.batches()) == 1
