"""Works with each server as it is: the README's quick starts against fake servers shaped like the real
ones, with the shipped example config, through ``mmwatchd scan`` (one of them as a real child process)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from fakevlm import SHAPES, FakeVLM
from media import make_gif, make_heic, make_jpeg, make_numbered_video, make_with_metadata
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "config.example.yaml"
#: The URL and model the quick starts name for each server (the fake serves that model).
MODELS = {"ollama": "qwen2.5vl:7b", "lmstudio": "qwen2.5-vl-7b-instruct", "openai": "gpt-4o-mini",
          "vllm": "Qwen/Qwen2.5-VL-7B-Instruct"}  # fmt: skip


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def quick_start_config(folder: Path, base_url: str, model: str) -> Path:
    """The shipped config.example.yaml with only the URL and the model changed, as the README says."""
    text = EXAMPLE.read_text()
    assert text.count("base_url: http://127.0.0.1:11434/v1") == 1 and text.count("model: qwen2.5vl:7b ") == 1
    text = text.replace("base_url: http://127.0.0.1:11434/v1", f"base_url: {base_url}")
    text = text.replace("model: qwen2.5vl:7b ", f"model: {model} ")
    path = folder / "mmwatchd.yaml"
    path.write_text(text)
    return path


def scan(cfg: Path, cwd: Path, *, child: bool = False) -> subprocess.CompletedProcess[str]:
    """``mmwatchd scan`` as the README runs it: in a child process when ``child`` (the quick start as typed), else
    through the same ``main`` in this process (the same command, without paying for a new interpreter)."""
    env = {"XDG_STATE_HOME": str(cwd / "state")}
    argv = ["scan", "-c", str(cfg), "--log-format", "json"]
    if child:
        full = {**os.environ, "PYTHONPATH": str(REPO), **env}
        full.pop("STATE_DIRECTORY", None)
        return subprocess.run(
            [sys.executable, "-m", "mmwatchd", *argv], cwd=cwd, env=full, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    from mmwatchd.cli import main

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as out, \
            contextlib.redirect_stderr(io.StringIO()) as err:  # fmt: skip
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("STATE_DIRECTORY", raising=False)
        mp.chdir(cwd)
        code = main(argv)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def library(inbox: Path, tag: str = "") -> list[Path]:
    """Photos as phones and chats make them, GIFs, a HEIC, and videos."""
    return [
        make_with_metadata(inbox / f"phone{tag}.jpg", "jpeg"),
        make_jpeg(inbox / f"big{tag}.jpg", (1800, 1200), detail=False),
        make_with_metadata(inbox / f"screenshot{tag}.png", "png"),
        make_with_metadata(inbox / f"sticker{tag}.webp", "webp"),
        make_gif(inbox / f"still{tag}.gif"),
        make_gif(inbox / f"animated{tag}.gif", frames=3),
        make_heic(inbox / f"iphone{tag}.heic"),
        make_numbered_video(inbox / f"clip{tag}.mp4", (160, 120), frames=30, fps=10),
        make_numbered_video(inbox / f"clip{tag}.mov", (160, 120), frames=20, fps=10),
    ]


def _sent_images(fake: FakeVLM) -> list[tuple[str, bytes]]:
    out = []
    for request in fake.chat_requests:
        for part in request.content:
            if part["type"] == "image_url":
                head, _, payload = part["image_url"]["url"].partition(",")
                out.append((head, base64.b64decode(payload)))
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_quick_start_describes_everything_on_each_server(tmp_path: Path, shape: str) -> None:
    with FakeVLM(shape=shape, models=[MODELS[shape]]) as fake:  # type: ignore[arg-type]
        cfg = quick_start_config(tmp_path, fake.base_url, MODELS[shape])
        files = library(tmp_path / "inbox")
        run = scan(cfg, tmp_path, child=shape == "ollama")  # the shipped config's own server, as a real process
        assert run.returncode == 0, run.stdout + run.stderr[-3000:]
        docs = {p.name: json.loads(p.with_name(p.name + ".json").read_text()) for p in files}
        assert {name: doc["status"] for name, doc in docs.items()} == dict.fromkeys(docs, "ok")
        # At most one refused request while it learns what the endpoint takes; none where the server says.
        assert len(fake.refused) == (1 if shape == "openai" else 0)
        clip = docs["clip.mp4"]["media"]
        assert clip["mode"] == ("video_url" if shape == "vllm" else "images")
        assert clip["mode_reason"]
        if shape == "openai":
            assert "endpoint refused video_url (400 Invalid value: 'video_url'" in docs["clip.mov"]["media"]["mode_reason"] or \
                "endpoint refused video_url (400 Invalid value: 'video_url'" in clip["mode_reason"]  # fmt: skip
        # No GPS, XMP or comment reached the server (the phone photo went as it is, its metadata cut out); every
        # image type sent is one the server takes.
        assert docs["phone.jpg"]["media"]["parts"][0]["origin"] == "original"
        for head, data in _sent_images(fake):
            with Image.open(io.BytesIO(data)) as im:
                assert not im.getexif().get_ifd(0x8825) and "xmp" not in im.info
            assert head.split(";")[0] in ("data:image/jpeg", "data:image/png", "data:image/webp") or (
                shape in ("openai", "vllm") and head.startswith("data:image/gif")
            )

        if shape != "openai":
            return
        # What was learned is remembered: a second run with new files pays no second refusal.
        make_numbered_video(tmp_path / "inbox" / "clip-2.mp4", (96, 64), frames=12, fps=6)
        refused_before = len(fake.refused)
        run = scan(cfg, tmp_path)
        assert run.returncode == 0, run.stdout + run.stderr[-3000:]
        assert len(fake.refused) == refused_before
        again = json.loads((tmp_path / "inbox" / "clip-2.mp4.json").read_text())["media"]
        assert again["mode"] == clip["mode"]


def test_learning_costs_one_refusal_however_many_workers(tmp_path: Path) -> None:
    """Eight clips, four workers, a server nobody identifies that refuses video_url: one refused request."""
    with FakeVLM(shape="openai", models=["gpt-4o-mini"]) as fake:
        cfg = quick_start_config(tmp_path, fake.base_url, "gpt-4o-mini")
        for i in range(8):
            make_numbered_video(tmp_path / "inbox" / f"c{i}.mp4", (96, 64), frames=12 + i, fps=6)
        run = scan(cfg, tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        assert len(fake.refused) == 1
        assert len(fake.chat_requests) == 9
        modes = {json.loads((tmp_path / "inbox" / f"c{i}.mp4.json").read_text())["media"]["mode"] for i in range(8)}
        assert modes == {"images"}
        assert "scan done: 8 described, 0 failed" in run.stdout


class TestCheckEndpoint:
    """``mmwatchd check --endpoint``: a short table of what the endpoint takes; exit 1 when the config needs more."""

    @pytest.mark.parametrize(
        ("shape", "video", "server"),
        [("ollama", "no  ", "Ollama 0.12.6"), ("lmstudio", "no  ", "LM Studio"), ("openai", "no  ", "did not say"),
         ("vllm", "ok  ", "vLLM 0.11.0")],
    )  # fmt: skip
    def test_each_server(self, tmp_path: Path, shape: str, video: str, server: str,
                         capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
        from mmwatchd.cli import main

        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
        monkeypatch.delenv("STATE_DIRECTORY", raising=False)
        with FakeVLM(shape=shape, models=[MODELS[shape]]) as fake:  # type: ignore[arg-type]
            cfg = quick_start_config(tmp_path, fake.base_url, MODELS[shape])
            assert main(["check", "--endpoint", "-c", str(cfg)]) == 0
            out = capsys.readouterr().out
            rows = {line[6:23].strip(): line for line in out.splitlines()[2:]}
            assert rows["reachable"].startswith("ok") and rows["model listed"].startswith("ok")
            assert server in rows["server"] and rows["takes an image"].startswith("ok")
            assert rows["takes video_url"].startswith(video) and rows["json_schema"].startswith("ok")
            assert "20000000 bytes accepted" in rows["largest request"]
            if shape == "vllm":
                assert "keeps 32 of 34 frames" in rows["takes video_url"]
            if shape != "openai":  # the others say what they are; this one is known from its answer
                return
            # What it found is what video.mode: auto uses: the scan after it is refused nothing.
            refused = len(fake.refused)
            make_numbered_video(tmp_path / "inbox" / "clip.mp4", (96, 64), frames=12, fps=6)
            assert scan(cfg, tmp_path).returncode == 0
            assert len(fake.refused) == refused
            media = json.loads((tmp_path / "inbox" / "clip.mp4.json").read_text())["media"]
            assert media["mode"] == "images" and media["mode_reason"].startswith("mmwatchd check --endpoint: refused")

    def test_size_limit_found_with_few_requests(self, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
        from mmwatchd.cli import main
        from mmwatchd.doctor import MAX_SIZE_PROBES

        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
        with FakeVLM(max_body_bytes=3_000_000) as fake:
            cfg = quick_start_config(tmp_path, fake.base_url, "fake-vlm")
            before = len(fake.chat_requests)
            assert main(["doctor", "-c", str(cfg)]) == 1
            sizes = [len(r.body) for r in fake.chat_requests[before:]
                     if r.content[1].get("image_url", {}).get("url", "").startswith("data:image/png")]  # fmt: skip
        out = capsys.readouterr().out
        assert 19_999_000 < sizes[0] <= 20_000_000  # endpoint.max_request_bytes first
        assert len(sizes) <= MAX_SIZE_PROBES and max(s for s in sizes if s <= 3_000_000) > 2_000_000
        line = next(x for x in out.splitlines() if "largest request" in x)
        assert line.startswith("FAIL") and "set endpoint.max_request_bytes to at most" in line

    def test_unreachable(self, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
        from mmwatchd.cli import main

        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
        fake = FakeVLM().start()
        url = fake.base_url
        fake.stop()
        cfg = quick_start_config(tmp_path, url, "fake-vlm")
        assert main(["check", "--endpoint", "-c", str(cfg)]) == 1
        out = capsys.readouterr().out
        assert "FAIL  reachable" in out and "cannot reach the model endpoint" in out


def test_explicit_video_url_refused_says_what_to_change(tmp_path: Path) -> None:
    """A rule that insists on video_url gets no fallback, but its error sidecar names the fix."""
    from configs import write_config

    from mmwatchd.cli import main

    with FakeVLM(shape="ollama") as fake:
        cfg = write_config(tmp_path, base_url=fake.base_url,
                           rule={"name": "clips", "match": {"kind": "video"}, "prompt": "What happens?",
                                 "video": {"frames": 4, "mode": "video_url"}})  # fmt: skip
        clip = make_numbered_video(tmp_path / "inbox" / "clip.mp4", (96, 64), frames=12, fps=6)
        assert main(["once", "-c", str(cfg), str(clip)]) == 1
    error = json.loads(clip.with_name("clip.mp4.json").read_text())["error"]
    assert error["kind"] == "rejected" and "invalid message format" in error["message"]
    assert "this endpoint takes no video_url: remove rules: clips: video.mode" in error["message"]


class TestConfigKeys:
    def test_defaults(self, tmp_path: Path) -> None:
        from configs import load_config

        cfg = load_config(tmp_path, base_url="http://127.0.0.1:9/v1",
                          rule={"match": {"kind": "video"}, "video": {"frames": 8}})  # fmt: skip
        assert cfg.rules[0].video is not None and cfg.rules[0].video.mode == "auto"
        assert cfg.endpoint.max_video_frames == 32 and cfg.rules[0].image.keep_metadata is False

    def test_no_limit_and_bad_values(self, tmp_path: Path) -> None:
        from configs import load_config

        from mmwatchd.errors import ConfigError

        assert load_config(tmp_path, base_url="http://127.0.0.1:9/v1",
                           endpoint={"max_video_frames": None}).endpoint.max_video_frames is None  # fmt: skip
        with pytest.raises(ConfigError) as caught:
            load_config(tmp_path, base_url="http://127.0.0.1:9/v1", endpoint={"max_video_frames": 0})
        assert any("endpoint.max_video_frames" in line for line in caught.value.problems)


def test_a_refused_passthrough_image_is_sent_again_encoded_and_remembered(tmp_path: Path) -> None:
    """A gateway that takes no PNG as it is: the photo is re-sent at once as a JPEG, and PNGs go encoded after."""
    from configs import write_config
    from fakevlm import error_body

    from mmwatchd.cli import main

    with FakeVLM() as fake:
        fake.enqueue(status=400, json=error_body("Invalid image: unsupported format image/png"),
                     path="/v1/chat/completions")  # fmt: skip
        cfg = write_config(tmp_path, base_url=fake.base_url)
        first = make_with_metadata(tmp_path / "inbox" / "a.png", "png")
        assert main(["once", "-c", str(cfg), str(first)]) == 0
        second = make_with_metadata(tmp_path / "inbox" / "b.png", "png")
        assert main(["once", "-c", str(cfg), str(second)]) == 0
        sent = [r.content[1]["image_url"]["url"].partition(";")[0] for r in fake.chat_requests]
    assert sent == ["data:image/png", "data:image/jpeg", "data:image/jpeg"]
    media = json.loads(first.with_name("a.png.json").read_text())["media"]
    assert media["parts"][0]["origin"] == "encoded"
    assert media["passthrough_refused"] == "400 Invalid image: unsupported format image/png"
