"""One file through the whole pipeline: real files, the real openai client, a real HTTP server on loopback."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import mounts
import pytest
from configs import load_config
from fakevlm import FakeVLM, chat_completion, error_body
from media import make_empty, make_heic, make_jpeg, make_named_text, make_png, make_truncated
from PIL import Image
from rewrite import padded_jpeg, rewrite_keeping_size_and_mtime

from mmwatchd.errors import SidecarError
from mmwatchd.model import Config
from mmwatchd.pipeline import IN_PROGRESS, Pipeline
from mmwatchd.vlm import VLMClient

KEY = "sk-test-secret-123456"


@pytest.fixture
def env(tmp_path: Path, fake_vlm: FakeVLM, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.setenv("MMWATCHD_TEST_KEY", KEY)
    e = Env(tmp_path, fake_vlm)
    try:
        yield e
    finally:
        e.close()


class Env:
    def __init__(self, tmp_path: Path, fake: FakeVLM) -> None:
        self.tmp = tmp_path
        self.fake = fake
        self.inbox = tmp_path / "inbox"
        self._clients: list[VLMClient] = []
        self.configure()

    def configure(self, **changes: object) -> Config:
        self.config = load_config(self.tmp, base_url=self.fake.base_url, **changes)
        client = VLMClient(self.config.endpoint, api_key=os.environ.get("MMWATCHD_TEST_KEY"))
        self._clients.append(client)
        self.processor = Pipeline(self.config, client)
        return self.config

    def close(self) -> None:
        for c in self._clients:
            c.close()

    def sidecar(self, path: Path) -> dict:
        return json.loads(path.with_name(path.name + ".json").read_text())


def fill(folder: Path) -> Path:
    """Fill the filesystem of ``folder`` to the last block."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, bytes(4096))
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"x")
    finally:
        os.close(fd)
    return filler


def sent_image(fake: FakeVLM, index: int = -1) -> Image.Image:
    url = fake.chat_requests[index].content[1]["image_url"]["url"]
    head, b64 = url.split(",", 1)
    assert head.startswith("data:image/") and head.endswith(";base64")
    return Image.open(io.BytesIO(base64.b64decode(b64)))


class TestOk:
    def test_photo_is_described_and_sidecar_records_everything(self, env: Env) -> None:
        photo = make_jpeg(env.inbox / "IMG_1.jpg", (3000, 2000), taken=datetime(2024, 6, 1, 12, 30, 5))
        out = env.processor.process(photo)
        assert out.status == "ok", out.reason

        (req,) = env.fake.chat_requests
        body = req.json
        assert body["model"] == "fake-vlm" and body["max_tokens"] == 512
        (user,) = body["messages"]
        assert [p["type"] for p in user["content"]] == ["text", "image_url"]
        assert user["content"][0]["text"] == 'Describe "IMG_1.jpg" (3000x2000).'
        assert req.headers["authorization"] == f"Bearer {KEY}"
        img = sent_image(env.fake)
        assert img.format == "JPEG" and img.size == (1500, 1000)  # 1/2-scale decode, 2% under max_side 1536

        doc = env.sidecar(photo)
        assert doc["mmwatchd"]["schema"] == 1 and doc["status"] == "ok"
        st = photo.stat()
        assert doc["source"] == {
            "name": "IMG_1.jpg",
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "inode": st.st_ino,
            "ctime_ns": st.st_ctime_ns,
            "sha256": doc["source"]["sha256"],
        }
        assert len(doc["source"]["sha256"]) == 64
        assert doc["rule"] == "photos" and doc["model"] == "fake-vlm"
        assert doc["fingerprint"].startswith("sha256:")
        assert doc["media"]["taken"] == "2024-06-01 12:30:05"
        (part,) = doc["media"]["parts"]
        assert part["mime"] == "image/jpeg" and (part["width"], part["height"]) == (1500, 1000)
        assert doc["media"]["request_bytes"] >= req.content_length  # the recorded bound holds on the wire
        assert doc["response"]["text"] == "saw 1 images and 0 videos"
        assert doc["response"]["finish_reason"] == "stop" and doc["response"]["usage"]["total_tokens"] == 15
        assert KEY not in json.dumps(doc)
        assert sorted(os.listdir(env.inbox)) == ["IMG_1.jpg", "IMG_1.jpg.json"]  # no temp file left

    def test_schema_reply_is_parsed_and_system_message_sent(self, env: Env) -> None:
        schema = {"type": "object", "properties": {"caption": {"type": "string"}}, "required": ["caption"]}
        env.configure(rule={"schema": schema, "system": "You archive {folder}."})
        env.fake.enqueue(json=chat_completion('```json\n{"caption": "a cat"}\n```'))
        photo = make_jpeg(env.inbox / "cat.jpg", (200, 100))
        assert env.processor.process(photo).status == "ok"
        body = env.fake.chat_requests[0].json
        assert body["messages"][0] == {"role": "system", "content": 'You archive "inbox".'}
        assert body["response_format"]["json_schema"]["schema"] == schema
        assert env.sidecar(photo)["response"]["data"] == {"caption": "a cat"}

    def test_heic_from_an_iphone_is_sent_as_jpeg(self, env: Env) -> None:
        photo = make_heic(env.inbox / "IMG_2.HEIC", (640, 480))
        assert env.processor.process(photo).status == "ok"
        img = sent_image(env.fake)
        assert img.format == "JPEG" and img.size == (640, 480)
        assert env.sidecar(photo)["media"]["format"] in ("HEIF", "HEIC")

    def test_small_upright_jpeg_passes_through_untouched(self, env: Env) -> None:
        photo = make_jpeg(env.inbox / "small.jpg", (320, 240))
        assert env.processor.process(photo).status == "ok"
        url = env.fake.chat_requests[0].content[1]["image_url"]["url"]
        assert base64.b64decode(url.split(",", 1)[1]) == photo.read_bytes()
        assert env.sidecar(photo)["media"]["parts"][0]["origin"] == "original"


class TestBudget:
    def test_request_is_fitted_under_the_gateway_cap(self, env: Env) -> None:
        cap = 120_000
        env.fake.max_body_bytes = cap  # the server answers 413 above this, like a gateway
        env.configure(endpoint={"max_request_bytes": cap})
        photo = make_jpeg(env.inbox / "big.jpg", (4000, 3000), quality=95)
        assert photo.stat().st_size > cap
        out = env.processor.process(photo)
        assert out.status == "ok", out.reason
        (req,) = env.fake.chat_requests
        assert req.content_length <= cap
        assert out.request_bytes is not None and req.content_length <= out.request_bytes <= cap

    def test_prompt_too_large_for_the_cap_is_a_clear_error_sidecar(self, env: Env) -> None:
        env.configure(endpoint={"max_request_bytes": 2000}, rule={"prompt": "x" * 3000 + " {name}"})
        photo = make_jpeg(env.inbox / "a.jpg", (100, 100))
        out = env.processor.process(photo)
        assert out.status == "error"
        err = env.sidecar(photo)["error"]
        assert err["kind"] == "budget" and "endpoint.max_request_bytes" in err["message"]
        assert env.fake.chat_requests == []


class TestFreshness:
    def test_up_to_date_files_are_not_sent_again(self, env: Env) -> None:
        photo = make_jpeg(env.inbox / "a.jpg", (100, 100))
        assert env.processor.process(photo).status == "ok"
        out = env.processor.process(photo)
        assert (out.status, out.reason) == ("skipped", "up to date")
        assert len(env.fake.chat_requests) == 1

    def test_touch_without_change_is_settled_by_the_hash(self, env: Env) -> None:
        photo = make_jpeg(env.inbox / "a.jpg", (100, 100))
        env.processor.process(photo)
        os.utime(photo, ns=(1, 1))
        assert env.processor.process(photo).reason == "up to date"
        assert len(env.fake.chat_requests) == 1

    def test_changed_content_or_prompt_is_described_again(self, env: Env) -> None:
        photo = make_jpeg(env.inbox / "a.jpg", (100, 100))
        env.processor.process(photo)
        make_jpeg(photo, (100, 100), seed=7)
        assert env.processor.process(photo).status == "ok"
        env.configure(rule={"prompt": "Something else about {name}."})
        assert env.processor.process(photo).status == "ok"
        assert len(env.fake.chat_requests) == 3
        assert env.fake.chat_requests[-1].content[0]["text"] == 'Something else about "a.jpg".'

    def test_force_describes_again(self, env: Env) -> None:
        photo = make_jpeg(env.inbox / "a.jpg", (100, 100))
        env.processor.process(photo)
        assert env.processor.process(photo, force=True).status == "ok"
        assert len(env.fake.chat_requests) == 2

    def test_foreign_file_at_sidecar_path_is_left_alone(self, env: Env) -> None:
        photo = make_jpeg(env.inbox / "a.jpg", (100, 100))
        foreign = env.inbox / "a.jpg.json"
        foreign.write_text('{"mine": true}')
        for force in (False, True):
            out = env.processor.process(photo, force=force)
            assert out.status == "skipped" and "did not write" in out.reason
        assert foreign.read_text() == '{"mine": true}'
        assert env.fake.chat_requests == []

    def test_file_changed_during_the_request_is_not_recorded(self, env: Env) -> None:
        photo = make_jpeg(env.inbox / "a.jpg", (100, 100))
        env.fake.enqueue(json=chat_completion("late"), delay_s=0.5)
        changer = threading.Timer(0.2, lambda: make_jpeg(photo, (120, 100), seed=3))
        changer.start()
        try:
            out = env.processor.process(photo)
        finally:
            changer.join()
        assert out.status == "retry" and "changed" in out.reason
        assert not (env.inbox / "a.jpg.json").exists()

    def test_a_same_size_rewrite_with_its_mtime_put_back_is_described_again(self, env: Env) -> None:
        photo = padded_jpeg(env.inbox / "a.jpg", seed=1)
        assert env.processor.process(photo).status == "ok"
        rewrite_keeping_size_and_mtime(photo, seed=2)
        out = env.processor.process(photo)
        assert out.status == "ok", out.reason
        assert len(env.fake.chat_requests) == 2
        st = photo.stat()
        src = env.sidecar(photo)["source"]
        assert (src["size"], src["mtime_ns"], src["inode"], src["ctime_ns"]) == (
            st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)  # fmt: skip
        assert src["sha256"] == hashlib.sha256(photo.read_bytes()).hexdigest()
        assert out.identity == (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
        assert env.processor.process(photo).reason == "up to date"  # and now it is the same file again

    @pytest.mark.parametrize(
        "answer",
        [
            pytest.param({"json": chat_completion("late")}, id="an-answer"),
            pytest.param({"status": 400, "json": error_body("image too small")}, id="an-error-found-meanwhile"),
        ],
    )
    def test_a_same_size_rewrite_during_the_request_is_not_recorded(self, env: Env, answer: dict[str, Any]) -> None:
        """Neither the answer nor an error found while the file changed is recorded against the new version."""
        photo = padded_jpeg(env.inbox / "a.jpg", seed=1)
        env.fake.enqueue(**answer, delay_s=0.5)
        changer = threading.Timer(0.2, lambda: rewrite_keeping_size_and_mtime(photo, seed=2))
        changer.start()
        try:
            out = env.processor.process(photo)
        finally:
            changer.join()
        assert out.status == "retry" and "changed" in out.reason
        assert not (env.inbox / "a.jpg.json").exists()

    def test_a_sidecar_from_before_inodes_were_recorded_is_settled_by_its_hash(self, env: Env) -> None:
        photo = padded_jpeg(env.inbox / "a.jpg", seed=1)
        assert env.processor.process(photo).status == "ok"
        side = env.inbox / "a.jpg.json"
        doc = json.loads(side.read_text())
        del doc["source"]["inode"], doc["source"]["ctime_ns"]
        side.write_text(json.dumps(doc))
        assert env.processor.process(photo).reason == "up to date"  # same bytes: nothing is sent again
        rewrite_keeping_size_and_mtime(photo, seed=2)
        assert env.processor.process(photo).status == "ok"  # other bytes, same size and mtime: described again
        assert len(env.fake.chat_requests) == 2


class TestBadInput:
    @pytest.mark.parametrize(
        ("make", "name", "kind", "message"),
        [
            (make_empty, "empty.jpg", "unsupported", "empty.jpg: empty file"),
            (make_named_text, "notes.jpg", "unsupported", "notes.jpg: not an image: looks like text"),
        ],
    )
    def test_files_that_claim_to_be_photos_get_an_error_sidecar(
        self, env: Env, make: object, name: str, kind: str, message: str
    ) -> None:
        path = make(env.inbox / name)  # type: ignore[operator]
        out = env.processor.process(path)
        assert out.status == "error"
        doc = env.sidecar(path)
        assert doc["status"] == "error" and doc["error"] == {"kind": kind, "message": message}
        assert doc["rule"] == "photos" and doc["source"]["size"] == path.stat().st_size
        # Permanent: not retried until the file changes.
        assert env.processor.process(path).reason == "up to date"
        assert env.fake.chat_requests == []

    def test_truncated_jpeg(self, env: Env) -> None:
        good = make_jpeg(env.tmp / "good.jpg", (800, 600))
        bad = make_truncated(good, env.inbox / "cut.jpg", keep=0.5)
        assert env.processor.process(bad).status == "error"
        err = env.sidecar(bad)["error"]
        assert err["kind"] == "decode" and "cut.jpg" in err["message"] and "truncated" in err["message"]

    def test_other_files_are_skipped_without_a_sidecar(self, env: Env) -> None:
        notes = make_named_text(env.inbox / "notes.txt")
        out = env.processor.process(notes)
        assert (out.status, out.reason) == ("skipped", "not a photo or video")
        assert not (env.inbox / "notes.txt.json").exists()

    def test_named_files_are_never_skipped_silently(self, env: Env) -> None:
        notes = make_named_text(env.inbox / "notes.txt")
        out = env.processor.process(notes, explicit=True)
        assert out.status == "error" and "looks like text" in out.reason

    def test_content_decides_not_the_name(self, env: Env) -> None:
        png_named_jpg = make_png(env.inbox / "really-a-png.jpg", (64, 48))
        assert env.processor.process(png_named_jpg).status == "ok"

    def test_no_matching_rule(self, env: Env) -> None:
        env.configure(rule={"match": {"kind": "image", "glob": "*.png"}})
        photo = make_jpeg(env.inbox / "a.jpg", (64, 48))
        out = env.processor.process(photo)
        assert (out.status, out.reason) == ("skipped", "no rule matches this image")


class TestEndpointFailures:
    def test_refusal_is_permanent(self, env: Env) -> None:
        env.fake.enqueue(status=400, json=error_body("image too small"))
        photo = make_jpeg(env.inbox / "a.jpg", (64, 48))
        assert env.processor.process(photo).status == "error"
        err = env.sidecar(photo)["error"]
        assert err["kind"] == "rejected" and "image too small" in err["message"]
        assert KEY not in err["message"]

    @pytest.mark.parametrize("status", [429, 500, 503])
    def test_transient_failures_write_nothing(self, env: Env, status: int) -> None:
        env.fake.enqueue(status=status, json=error_body("busy"), headers={"Retry-After": "7"})
        photo = make_jpeg(env.inbox / "a.jpg", (64, 48))
        out = env.processor.process(photo)
        assert out.status == "retry"
        assert out.retry_after == 7
        assert not (env.inbox / "a.jpg.json").exists()

    def test_endpoint_down_writes_nothing(self, env: Env) -> None:
        env.fake.pause()
        photo = make_jpeg(env.inbox / "a.jpg", (64, 48))
        out = env.processor.process(photo)
        assert out.status == "retry" and env.fake.base_url in out.reason
        assert not (env.inbox / "a.jpg.json").exists()

    def test_invalid_json_twice_is_recorded_as_bad_reply(self, env: Env) -> None:
        env.configure(rule={"schema": {"type": "object"}})
        env.fake.enqueue(json=chat_completion("not json"))
        env.fake.enqueue(json=chat_completion("still not json"))
        photo = make_jpeg(env.inbox / "a.jpg", (64, 48))
        assert env.processor.process(photo).status == "error"
        assert env.sidecar(photo)["error"]["kind"] == "bad_reply"
        assert len(env.fake.chat_requests) == 2


class TestDryRun:
    def test_plan_without_calling_or_writing(self, env: Env) -> None:
        photo = make_jpeg(env.inbox / "a.jpg", (2000, 1000))
        out = env.processor.process(photo, dry_run=True)
        assert out.status == "planned" and out.plan is not None
        (part,) = out.plan["media"]["parts"]
        # Decoded at 6/8 scale, 2% under max_side 1536: sent at that size rather than resized.
        assert (part["mime"], part["width"], part["height"]) == ("image/jpeg", 1500, 750)
        assert out.plan["rule"] == "photos" and out.plan["model"] == "fake-vlm"
        content = out.plan["request"]["messages"][0]["content"]
        assert content[1] == {
            "type": "image_url",
            "image_url": {"url": f"data:image/jpeg;base64,…({part['url_bytes']} bytes)"},
        }
        assert env.fake.requests == [] and not (env.inbox / "a.jpg.json").exists()


HOOK = """\
import json, sys
with open(sys.argv[1], "w") as fh:
    json.dump(sys.argv[2:], fh)
"""


class TestActionsFromThePipeline:
    def test_a_hook_gets_names_as_they_are_not_quoted(self, env: Env) -> None:
        hook, out = env.tmp / "hook.py", env.tmp / "argv.json"
        hook.write_text(HOOK)
        argv = [sys.executable, str(hook), str(out), "{relpath}", "{name}", "{stem}", "{folder}", "{path}"]
        env.configure(rule={"on_success": {"exec": argv}})
        photo = make_jpeg(env.inbox / "sub" / 'IMG "1".jpg', (64, 48))
        out_ = env.processor.process(photo)
        assert out_.status == "ok" and out_.action_problems == ()
        assert json.loads(out.read_text()) == ['sub/IMG "1".jpg', 'IMG "1".jpg', 'IMG "1"', "sub", str(photo)]
        # The prompt still gets them quoted: there they are data inside text.
        assert env.fake.chat_requests[0].content[0]["text"] == 'Describe "IMG \\"1\\".jpg" (64x48).'

    def test_move_to_takes_a_mirrored_sidecar_along(self, env: Env) -> None:
        mirror, done = env.tmp / "mirror", env.tmp / "done"
        env.configure(sidecar={"dir": str(mirror)}, rule={"on_success": {"move_to": str(done)}})
        photo = make_jpeg(env.inbox / "sub" / "a.jpg", (64, 48))
        make_jpeg(done / "sub" / "a.jpg", (64, 48), seed=3)  # a clash at the destination
        out = env.processor.process(photo)
        assert out.status == "ok" and out.action_problems == ()
        moved = done / "sub" / "a (1).jpg"
        assert out.moved_to == moved and moved.is_file() and not photo.exists()

        def mirrored(p: Path) -> Path:
            return mirror / str(p).lstrip("/")

        assert not mirrored(photo.with_name("a.jpg.json")).exists()
        doc = json.loads(mirrored(moved.with_name("a (1).jpg.json")).read_text())
        assert doc["status"] == "ok" and doc["source"]["sha256"] == hashlib.sha256(moved.read_bytes()).hexdigest()
        # Where it is now, the file is found up to date: its sidecar is where the mirror says it belongs.
        assert env.processor.process(moved, explicit=True).reason == "up to date"
        assert len(env.fake.chat_requests) == 1


class TestPayingOnlyWhenTheAnswerCanBeKept:
    def test_a_file_another_process_is_describing_is_skipped_as_in_progress(self, env: Env) -> None:
        photo = make_jpeg(env.inbox / "a.jpg", (64, 48))
        holder = subprocess.Popen(  # another mmwatchd process, as far as the claim can tell
            [sys.executable, "-c", "import sys; from pathlib import Path; from mmwatchd import sidecar; "
             "c = sidecar.claim(Path(sys.argv[1])); print('held', flush=True); sys.stdin.read()",
             str(env.inbox / "a.jpg.json")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )  # fmt: skip
        try:
            assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
            out = env.processor.process(photo)
            assert (out.status, out.reason) == ("skipped", IN_PROGRESS)
            assert env.fake.chat_requests == []
            assert sorted(os.listdir(env.inbox)) == [".a.jpg.json.mmwatchd-lock", "a.jpg"]
        finally:
            holder.communicate(b"")
        assert env.processor.process(photo).status == "ok"  # its holder is done
        assert sorted(os.listdir(env.inbox)) == ["a.jpg", "a.jpg.json"]

    def test_a_lock_file_left_by_a_killed_process_beside_a_done_file_is_removed(self, env: Env) -> None:
        photo = make_jpeg(env.inbox / "a.jpg", (64, 48))
        assert env.processor.process(photo).status == "ok"
        leftover = env.inbox / ".a.jpg.json.mmwatchd-lock"  # killed between writing the sidecar and removing it
        leftover.touch()
        assert env.processor.process(photo).reason == "up to date"
        assert sorted(os.listdir(env.inbox)) == ["a.jpg", "a.jpg.json"]

    def test_an_unwritable_folder_costs_no_request_and_on_the_last_attempt_is_final(
        self, env: Env, tmp_path: Path
    ) -> None:
        with mounts.tmpfs(tmp_path / "inbox" / "ro", "1m") as ro:
            photo = make_jpeg(ro / "a.jpg", (64, 48))
            mounts.read_only(ro)
            out = env.processor.process(photo)
            assert out.status == "retry" and isinstance(out.error, SidecarError)
            assert f"{ro}: cannot write sidecars into this folder: Read-only file system" in out.reason
            assert "sidecar.dir" in out.reason
            out = env.processor.process(photo, last_attempt=True)
            assert out.status == "error" and out.reason.startswith("gave up after repeated failures: ")
            assert out.answer is None and out.identity is None  # no sidecar: nothing for the done-index
            assert os.listdir(ro) == ["a.jpg"]
        assert env.fake.chat_requests == []

    def test_a_full_disk_is_found_before_the_request(self, env: Env, tmp_path: Path) -> None:
        with mounts.tmpfs(tmp_path / "inbox" / "full", "256k") as full:
            photo = make_jpeg(full / "a.jpg", (64, 48))
            filler = fill(full)
            out = env.processor.process(photo)
            assert out.status == "retry" and "No space left on device (free some space" in out.reason
            assert sorted(os.listdir(full)) == ["a.jpg", "filler"]  # no temp file left behind
            assert env.fake.chat_requests == []
            filler.unlink()
            assert env.processor.process(photo).status == "ok"
            assert sorted(os.listdir(full)) == ["a.jpg", "a.jpg.json"]
