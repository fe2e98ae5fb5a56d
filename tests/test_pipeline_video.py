"""Videos and multi-image requests end to end: real clips made with PyAV, the real client, the wire checked."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from configs import write_config
from fakevlm import FakeVLM
from media import make_audio, make_gif, make_jpeg, make_numbered_video, read_number
from PIL import Image

from mmwatchd.cli import main


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 s at 10 fps, every frame showing its number."""
    return make_numbered_video(tmp_path_factory.mktemp("clips") / "clip.mp4", (160, 120), frames=40, fps=10, gop=10)


def _once(tmp_path: Path, fake: FakeVLM, media: Path, *extra: str, **changes: object) -> dict:
    cfg = write_config(tmp_path, base_url=fake.base_url, **changes)
    target = tmp_path / "inbox" / media.name
    if not target.exists():
        target.write_bytes(media.read_bytes())
    code = main(["once", "-c", str(cfg), *extra, str(target)])
    side = target.with_name(target.name + ".json")
    return {"code": code, "doc": json.loads(side.read_text()) if side.exists() else None}


def _images(url: str) -> list[Image.Image]:
    _head, payload = url.split(",", 1)
    return [Image.open(io.BytesIO(base64.b64decode(chunk))) for chunk in payload.split(",")]


VIDEO_RULE = {"match": {"kind": "video"}, "prompt": "What happens in {name} ({duration_s} s, {frames} frames)?"}


class TestModes:
    def test_video_url_one_part_of_comma_separated_frames(self, tmp_path: Path, fake_vlm: FakeVLM, clip: Path) -> None:
        out = _once(tmp_path, fake_vlm, clip, rule={**VIDEO_RULE, "video": {"frames": 8, "max_side": 128}})
        assert out["code"] == 0
        (req,) = fake_vlm.chat_requests
        text, part = req.content
        assert text["text"] == 'What happens in "clip.mp4" (4.0 s, 8 frames)?'
        assert part["type"] == "video_url" and part["video_url"]["url"].startswith("data:video/jpeg;base64,")
        frames = _images(part["video_url"]["url"])
        assert len(frames) == 8 and {f.size for f in frames} == {(128, 96)}
        numbers = [read_number(f) for f in frames]
        assert numbers[0] == 0 and numbers == sorted(numbers) and numbers[-1] >= 35  # spread over the whole clip
        media = out["doc"]["media"]
        assert (
            media["kind"] == "video" and media["mode"] == "video_url" and media["duration_s"] == pytest.approx(4, 0.1)
        )
        assert [f["t"] for f in media["frames"]] == sorted(f["t"] for f in media["frames"])
        assert media["frames"][0]["t"] == 0 and len(media["frames"]) == 8
        assert media["request_bytes"] >= req.content_length

    def test_images_mode_for_image_only_apis(self, tmp_path: Path, fake_vlm: FakeVLM, clip: Path) -> None:
        out = _once(tmp_path, fake_vlm, clip, rule={**VIDEO_RULE, "video": {"frames": 4, "mode": "images"}})
        assert out["code"] == 0
        content = fake_vlm.chat_requests[0].content
        assert [p["type"] for p in content] == ["text"] + ["image_url"] * 4
        times = [f["t"] for f in out["doc"]["media"]["frames"]]
        stamps = ", ".join(f"{t:.1f} s" for t in times)
        assert content[0]["text"].endswith(f"The 4 images are frames of the video, in order, at {stamps}.")
        numbers = [read_number(_images(p["image_url"]["url"])[0]) for p in content[1:]]
        assert numbers == sorted(numbers) and numbers[0] == 0

    def test_file_mode_sends_the_original_and_falls_back_when_too_big(
        self, tmp_path: Path, fake_vlm: FakeVLM, clip: Path
    ) -> None:
        out = _once(tmp_path, fake_vlm, clip, rule={**VIDEO_RULE, "video": {"mode": "file"}})
        url = fake_vlm.chat_requests[0].content[1]["video_url"]["url"]
        assert url.startswith("data:video/mp4;base64,") and base64.b64decode(url.split(",", 1)[1]) == clip.read_bytes()
        assert out["doc"]["media"]["mode"] == "file"

        small = tmp_path / "small"
        small.mkdir()
        cap = clip.stat().st_size // 2
        out = _once(small, fake_vlm, clip, endpoint={"max_request_bytes": cap},
                    rule={**VIDEO_RULE, "video": {"mode": "file", "frames": 4, "max_side": 96}})  # fmt: skip
        media = out["doc"]["media"]
        assert media["mode"] == "video_url"
        assert any("file too large for the budget" in d for d in media["degradations"])
        assert fake_vlm.chat_requests[-1].content_length <= cap


class TestBudget:
    def test_degrades_and_records_what_was_sent(self, tmp_path: Path, fake_vlm: FakeVLM) -> None:
        noisy = make_numbered_video(tmp_path / "noisy.mp4", (320, 240), frames=40, fps=10, detail=True,
                                    bit_rate=4_000_000)  # fmt: skip
        cap = 60_000
        fake_vlm.max_body_bytes = cap
        out = _once(tmp_path, fake_vlm, noisy, endpoint={"max_request_bytes": cap},
                    rule={**VIDEO_RULE, "video": {"frames": 16, "max_side": 320}})  # fmt: skip
        assert out["code"] == 0
        media = out["doc"]["media"]
        assert media["degradations"] and media["request_bytes"] <= cap
        assert fake_vlm.chat_requests[0].content_length <= cap

    def test_prompt_frame_count_matches_what_was_sent(self, tmp_path: Path, fake_vlm: FakeVLM) -> None:
        noisy = make_numbered_video(tmp_path / "n.mp4", (320, 240), frames=40, fps=10, detail=True, bit_rate=4_000_000)
        out = _once(tmp_path, fake_vlm, noisy, endpoint={"max_request_bytes": 8_000},
                    rule={**VIDEO_RULE, "video": {"frames": 16, "max_side": 320}})  # fmt: skip
        sent = len(out["doc"]["media"]["frames"])
        assert sent < 16
        assert fake_vlm.chat_requests[0].content[0]["text"].endswith(f"{sent} frames)?")


class TestReferencesAndAnimation:
    def test_reference_images_come_first_in_order(self, tmp_path: Path, fake_vlm: FakeVLM) -> None:
        refs = [make_jpeg(tmp_path / "refs" / f"ref{i}.jpg", (40 + i * 10, 30)) for i in range(2)]
        photo = make_jpeg(tmp_path / "photo.jpg", (100, 80))
        out = _once(tmp_path, fake_vlm, photo, rule={"reference_images": [str(r) for r in refs]})
        assert out["code"] == 0
        sizes = [_images(p["image_url"]["url"])[0].size for p in fake_vlm.chat_requests[0].content[1:]]
        assert sizes == [(40, 30), (50, 30), (100, 80)]
        origins = [p["origin"] for p in out["doc"]["media"]["parts"]]
        assert origins == ["reference", "reference", "original"]

    def test_animated_gif_stays_an_image_unless_the_rule_says_video(self, tmp_path: Path, fake_vlm: FakeVLM) -> None:
        gif = make_gif(tmp_path / "anim.gif", (64, 48), frames=6)
        out = _once(tmp_path, fake_vlm, gif)
        assert out["doc"]["media"]["kind"] == "image"
        other = tmp_path / "other"
        other.mkdir()
        out = _once(other, fake_vlm, gif, rule={"video": {"frames": 3}})
        assert out["doc"]["media"]["kind"] == "video" and len(out["doc"]["media"]["frames"]) == 3


class TestBadVideos:
    def test_audio_only_with_a_video_name(self, tmp_path: Path, fake_vlm: FakeVLM) -> None:
        audio = make_audio(tmp_path / "song.mp4")
        out = _once(tmp_path, fake_vlm, audio, rule=VIDEO_RULE)
        assert out["code"] == 1
        err = out["doc"]["error"]
        assert err["kind"] == "unsupported" and "no video stream" in err["message"]
        assert fake_vlm.chat_requests == []

    def test_truncated_clip_is_an_error_or_sends_what_decodes(
        self, tmp_path: Path, fake_vlm: FakeVLM, clip: Path
    ) -> None:
        cut = tmp_path / "cut.mkv"
        whole = make_numbered_video(tmp_path / "whole.mkv", (160, 120), frames=40, fps=10)
        cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
        out = _once(tmp_path, fake_vlm, cut, rule=VIDEO_RULE)
        doc = out["doc"]
        if doc["status"] == "ok":
            assert doc["media"]["frames"] and any("stopped" in d or "ends" in d for d in doc["media"]["degradations"])
        else:
            assert doc["error"]["kind"] == "decode" and "cut.mkv" in doc["error"]["message"]


def test_dry_run_shows_the_frame_plan(
    tmp_path: Path, fake_vlm: FakeVLM, clip: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, base_url=fake_vlm.base_url, rule={**VIDEO_RULE, "video": {"frames": 6}})
    assert main(["once", "-c", str(cfg), "--dry-run", str(clip)]) == 0
    (plan,) = json.loads(capsys.readouterr().out)["files"]
    media = plan["media"]
    assert media["mode"] == "video_url" and len(media["frames"]) == 6
    assert {"t", "width", "height", "bytes"} <= set(media["frames"][0])
    assert plan["request"]["messages"][0]["content"][1]["video_url"]["url"].startswith("data:video/jpeg;base64,…(")
    assert fake_vlm.requests == []


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 s at 10 fps, every frame showing its number."""
    return make_numbered_video(tmp_path_factory.mktemp("long") / "long.mp4", (160, 120), frames=60, fps=10, gop=10)


class TestServerFrameLimit:
    """endpoint.max_video_frames: a vLLM keeps the first 32 frames of a video_url."""

    def test_frames_spread_over_the_whole_clip_within_the_limit(self, tmp_path: Path, long_clip: Path) -> None:
        with FakeVLM(shape="vllm") as fake:
            out = _once(tmp_path, fake, long_clip, rule={**VIDEO_RULE, "video": {"frames": 48, "align": 28}})
            seen = fake.frames_seen
        media = out["doc"]["media"]
        assert out["code"] == 0 and media["mode"] == "video_url"
        assert len(media["frames"]) == 32 and seen == [32]  # what was sent is what the model saw
        assert media["frames"][-1]["t"] == pytest.approx(5.9, abs=0.05)  # the end of the clip too
        assert media["degradations"][0] == "frames 48 -> 32 (endpoint.max_video_frames)"
        assert out["doc"]["response"]["usage"]["prompt_tokens"] == 10 + 64 * 32
        numbers = [read_number(im) for im in _images(fake.chat_requests[0].content[1]["video_url"]["url"])]
        assert numbers[0] == 0 and numbers[-1] == 59

    def test_without_a_limit_the_server_drops_the_end(self, tmp_path: Path, long_clip: Path) -> None:
        """What the limit is for: 48 frames sent, the server keeps the first 32, the model never sees the end."""
        with FakeVLM(shape="vllm") as fake:
            out = _once(tmp_path, fake, long_clip, endpoint={"max_video_frames": None},
                        rule={**VIDEO_RULE, "video": {"frames": 48, "align": 28}})  # fmt: skip
            seen = fake.frames_seen
        frames = out["doc"]["media"]["frames"]
        assert len(frames) == 48 and seen == [32] and frames[31]["t"] < 4.0

    def test_odd_limit_with_frame_pairing_stays_even(self, tmp_path: Path, long_clip: Path) -> None:
        with FakeVLM(shape="vllm") as fake:
            out = _once(tmp_path, fake, long_clip, endpoint={"max_video_frames": 9},
                        rule={**VIDEO_RULE, "video": {"frames": 20, "align": 28}})  # fmt: skip
            assert fake.frames_seen == [8]
        assert len(out["doc"]["media"]["frames"]) == 8

    def test_images_mode_is_not_limited(self, tmp_path: Path, long_clip: Path) -> None:
        with FakeVLM() as fake:
            out = _once(tmp_path, fake, long_clip, endpoint={"max_video_frames": 4},
                        rule={**VIDEO_RULE, "video": {"frames": 6, "mode": "images"}})  # fmt: skip
        assert len(out["doc"]["media"]["frames"]) == 6 and out["doc"]["media"]["degradations"] == []


class TestAutoMode:
    """video.mode: auto in one process: the fallback, the sidecar's reason, and a probe that is never sent."""

    def _processor(self, tmp_path: Path, fake: FakeVLM):  # type: ignore[no-untyped-def]
        from mmwatchd.config import load
        from mmwatchd.pipeline import Pipeline
        from mmwatchd.vlm import VLMClient

        cfg = load(write_config(tmp_path, base_url=fake.base_url, endpoint={"timeout_s": 2},
                                rule={**VIDEO_RULE, "video": {"frames": 4}}))  # fmt: skip
        client = VLMClient(cfg.endpoint, api_key=None)
        return Pipeline(cfg, client), client

    def test_refused_video_url_is_sent_again_as_images_at_once(self, tmp_path: Path, clip: Path) -> None:
        with FakeVLM(shape="ollama") as fake:
            processor, client = self._processor(tmp_path, fake)
            with client:
                # An Ollama that hides its version: only its answer to a video_url tells.
                fake.enqueue(status=404, text="404 page not found", path="/api/version")
                target = tmp_path / "inbox" / "clip.mp4"
                target.write_bytes(clip.read_bytes())
                outcome = processor.process(target)
            assert outcome.status == "ok", outcome.reason
            kinds = [[p["type"] for p in r.content[1:]] for r in fake.chat_requests]
            assert kinds == [["video_url"], ["image_url"] * 4] and len(fake.refused) == 1
        media = json.loads((tmp_path / "inbox" / "clip.mp4.json").read_text())["media"]
        assert media["mode"] == "images"
        assert media["mode_reason"] == "endpoint refused video_url (400 invalid message format); learned"

    def test_a_clip_that_fails_before_its_request_does_not_hold_the_next(self, tmp_path: Path, clip: Path) -> None:
        with FakeVLM(shape="openai") as fake:
            processor, client = self._processor(tmp_path, fake)
            with client:
                broken = make_audio(tmp_path / "inbox" / "voice.mp4")
                assert processor.process(broken).status == "error"  # it was to be the probe
                assert not client.knowledge.asking("fake-vlm")  # so nobody waits for its answer
                target = tmp_path / "inbox" / "clip.mp4"
                target.write_bytes(clip.read_bytes())
                outcome = processor.process(target)  # asks at once, rather than waiting for the first's answer
            assert outcome.status == "ok" and len(fake.refused) == 1
