"""mmwatchd against a real OpenAI-compatible server: ``transformers serve`` with a tiny, randomly initialised VLM.

Opt-in, as it needs ``pip install -e '.[test,realserver]'`` (transformers[serving] and CPU torch): run it with
``MMWATCHD_REALSERVER=1 python -m pytest tests/test_realserver.py`` or ``python -m pytest -m realserver``.
Otherwise it is skipped without importing either.

The model (LLaVA-NeXT, built offline by ``tests/realserver/build_tiny_vlm.py`` and cached under
``$XDG_CACHE_HOME/mmwatchd-tests``) talks nonsense, so the assertions are about what does not depend on its weights:
every reply is ``max_tokens`` letters cut off at the limit, and the prompt token count proves the server decoded each
image: LLaVA-NeXT spends a number of ``<image>`` tokens that depends on the decoded width and height, so a request
has exactly ``image_tokens(w, h)`` more prompt tokens than the same prompt without an image.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
from configs import write_config
from media import make_heic, make_jpeg, make_png
from optin import opted_in
from realserver import (
    build_tiny_vlm,  # plain Python: importing it loads neither torch nor transformers
)

from mmwatchd.cli import main

HERE = Path(__file__).resolve().parent
BUILDER = HERE / "realserver" / "build_tiny_vlm.py"

PROMPT = "Describe this photo."  # no placeholders: every request has the same text, so one baseline serves all
MAX_TOKENS = 8
SERVER_START_S = 180.0


def _opted_in(config: pytest.Config) -> bool:
    return opted_in(config, "realserver", "MMWATCHD_REALSERVER")


pytestmark = [
    pytest.mark.realserver,
    pytest.mark.skipif(
        "not _opted_in(config)",
        reason="needs transformers serve: set MMWATCHD_REALSERVER=1 or pass -m realserver",
    ),
]


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


# -- the model and the server ----------------------------------------------------------------------------------------


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mmwatchd-tests"


@pytest.fixture(scope="session")
def tiny_vlm() -> Path:
    """The tiny model's folder, built once per builder version, transformers and torch version, then reused."""
    versions = {}
    for dist in ("transformers", "torch", "tokenizers", "fastapi", "uvicorn"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{dist} is not installed: pip install -e '.[test,realserver]'", pytrace=False)
    key = hashlib.sha256(BUILDER.read_bytes())
    key.update(repr([versions[d] for d in ("transformers", "torch", "tokenizers")]).encode())
    root = _cache_root()
    model = root / f"tiny-llava-next-{key.hexdigest()[:16]}"
    if (model / "config.json").is_file() and (model / "model.safetensors").is_file():
        return model
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{model.name}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, str(BUILDER), str(staging)], env=env, capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        pytest.fail(f"building the tiny model failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}", pytrace=False)
    try:
        staging.rename(model)
    except OSError:  # another run finished the same build first
        shutil.rmtree(staging, ignore_errors=True)
    return model


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http_json(url: str, body: dict | None = None, *, timeout: float = 120) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@dataclass(frozen=True)
class Server:
    base_url: str  # ends in /v1
    model: str  # the served model folder, as requests must name it
    log: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def text_only_prompt_tokens(self) -> int:
        """Prompt tokens of the request mmwatchd sends, minus its image."""
        reply = _http_json(
            f"{self.base_url}/chat/completions",
            {
                "model": self.model,
                "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
                "max_tokens": 1,
            },
        )
        return int(reply["usage"]["prompt_tokens"])


@pytest.fixture(scope="session")
def vlm_server(tiny_vlm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``transformers serve`` on a free local port, pinned to the tiny model; stopped at the end of the session."""
    home = tmp_path_factory.mktemp("transformers-serve")
    (home / "hf" / "hub").mkdir(parents=True)  # GET /v1/models lists this (empty) cache
    log = home / "serve.log"
    port = _free_port()
    server = Server(base_url=f"http://127.0.0.1:{port}/v1", model=str(tiny_vlm), log=log)
    env = dict(
        os.environ,
        HF_HOME=str(home / "hf"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
    )
    command = [
        sys.executable, "-m", "transformers.cli.transformers", "serve", str(tiny_vlm),
        "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited with {proc.returncode}:\n{server.log_tail()}", pytrace=False)
            try:
                _http_json(f"{server.base_url}/models", timeout=2)
                break
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"transformers serve did not answer GET /v1/models within {SERVER_START_S:g} s:\n"
                        f"{server.log_tail()}",
                        pytrace=False,
                    )
                time.sleep(0.25)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(scope="session")
def baseline_tokens(vlm_server: Server) -> int:
    return vlm_server.text_only_prompt_tokens()


# -- helpers ---------------------------------------------------------------------------------------------------------


def sidecar(path: Path) -> dict:
    return json.loads(path.with_name(path.name + ".json").read_text())


def config_for(folder: Path, server: Server) -> Path:
    return write_config(
        folder,
        base_url=server.base_url,
        endpoint={"model": server.model, "max_tokens": MAX_TOKENS, "timeout_s": 120, "concurrency": 2},
        rule={"prompt": PROMPT},
    )


def assert_described(photo: Path, server: Server, baseline: int) -> int:
    """Check ``photo``'s sidecar against what the server must have done; return the image's token count."""
    car = sidecar(photo)
    assert car["status"] == "ok", car.get("error")
    (part,) = car["media"]["parts"]
    expected_image_tokens = build_tiny_vlm.image_tokens(part["width"], part["height"])
    response = car["response"]
    assert isinstance(response["text"], str)
    # The generation config only lets the model pick letters and never end early.
    assert re.fullmatch(f"[a-z]{{{MAX_TOKENS}}}", response["text"]), response["text"]
    assert response["finish_reason"] == "length"
    usage = response["usage"]
    assert usage["completion_tokens"] == MAX_TOKENS
    # The server decoded the image to exactly the size mmwatchd sent: anything else would change the count.
    assert usage["prompt_tokens"] == baseline + expected_image_tokens, (part, usage, server.log_tail())
    assert usage["total_tokens"] == usage["prompt_tokens"] + MAX_TOKENS
    assert car["model"] in (server.model, f"{server.model}@main")  # the server names its revision too
    return expected_image_tokens


# -- the tests -------------------------------------------------------------------------------------------------------


def test_once_jpeg_png_with_alpha_and_heic(
    tmp_path: Path, vlm_server: Server, baseline_tokens: int, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config_for(tmp_path, vlm_server)
    photos = [
        make_jpeg(tmp_path / "in" / "photo.jpg", (320, 240), seed=1),
        make_png(tmp_path / "in" / "alpha.png", (200, 120), mode="RGBA", seed=2),
        make_heic(tmp_path / "in" / "phone.heic", (96, 160), seed=3),
    ]
    assert main(["once", "-c", str(cfg), *map(str, photos)]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert all(f"ok       {p}" in out for p in photos), out

    counts = [assert_described(p, vlm_server, baseline_tokens) for p in photos]
    assert len(set(counts)) == len(counts), counts  # three sizes, three different token counts
    assert sidecar(photos[2])["media"]["parts"][0]["mime"] == "image/jpeg"  # HEIC is converted before sending


def test_scan_a_folder(
    tmp_path: Path, vlm_server: Server, baseline_tokens: int, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config_for(tmp_path, vlm_server)
    inbox = tmp_path / "inbox"
    photos = [
        make_jpeg(inbox / "a.jpg", (64, 48), seed=4),
        make_png(inbox / "sub" / "b.png", (150, 300), seed=5),
        make_jpeg(inbox / "c.jpg", (1024, 512), seed=6),
    ]
    assert main(["scan", "-c", str(cfg)]) == 0, capsys.readouterr()
    assert "scan done: 3 described, 0 failed" in capsys.readouterr().out
    for photo in photos:
        assert_described(photo, vlm_server, baseline_tokens)
    # Everything is up to date now.
    assert main(["scan", "-c", str(cfg)]) == 0
    assert "scan done: 0 described, 0 failed" in capsys.readouterr().out


# -- a real vLLM (../shared/realvllm): video_url and its frame limit -------------------------------------------------

REALVLLM = Path(__file__).resolve().parents[2] / "shared" / "realvllm"
REALVLLM_HOME = Path(os.environ.get("REALVLLM_HOME") or Path.home() / ".cache" / "realvllm")
CLIP_PROMPT = "Describe the clip."


@pytest.fixture(scope="module")
def real_vllm() -> Iterator[Server]:
    """vLLM on a CPU with a tiny random Qwen2-VL (``../shared/realvllm/setup.sh`` must have run once)."""
    if not (REALVLLM_HOME / "venv" / "bin" / "python").exists() or not (REALVLLM / "serve.sh").exists():
        pytest.skip(f"needs the real vLLM: run {REALVLLM}/setup.sh once")
    port = _free_port()
    started = subprocess.run([str(REALVLLM / "serve.sh"), str(port)], capture_output=True, text=True, timeout=420)
    log = REALVLLM_HOME / f"server.{port}.log"
    try:
        if started.returncode != 0:
            pytest.fail(f"vLLM did not start:\n{started.stderr[-3000:]}", pytrace=False)
        yield Server(base_url=f"http://127.0.0.1:{port}/v1", model="tiny-qwen2-vl", log=log)
    finally:
        subprocess.run([str(REALVLLM / "stop.sh"), str(port)], capture_output=True, timeout=60)


def _clip_tokens(server: Server, frames: int) -> int:
    """Prompt tokens of CLIP_PROMPT with a ``frames``-frame 224x168 video_url, as mmwatchd sends it."""
    import base64
    import io

    from PIL import Image

    chunks = []
    for i in range(frames):
        buf = io.BytesIO()
        Image.new("RGB", (224, 168), (i * 9 % 256, 90, 160)).save(buf, "JPEG", quality=80)
        chunks.append(base64.b64encode(buf.getvalue()).decode())
    content = [{"type": "text", "text": CLIP_PROMPT},
               {"type": "video_url", "video_url": {"url": "data:video/jpeg;base64," + ",".join(chunks)}}]  # fmt: skip
    reply = _http_json(f"{server.base_url}/chat/completions",
                       {"model": server.model, "messages": [{"role": "user", "content": content}], "max_tokens": 1})  # fmt: skip
    return int(reply["usage"]["prompt_tokens"])


def test_real_vllm_frame_limit_proven_by_token_counts(real_vllm: Server, tmp_path: Path) -> None:
    """Under mode auto mmwatchd knows the server is vLLM (GET /version) and sends one video_url; with
    max_video_frames 32 every frame sent is one the model saw, spread over the whole clip; without it the server
    keeps the first 32 of 48 and the tokens show the rest unseen."""
    from media import make_numbered_video

    per_pair = _clip_tokens(real_vllm, 4) - _clip_tokens(real_vllm, 2)
    assert per_pair == (224 // 28) * (168 // 28)  # one token per 28x28 pixels, frames in pairs
    thirty_two = _clip_tokens(real_vllm, 2) + 15 * per_pair
    clip = make_numbered_video(tmp_path / "src" / "clip.mp4", (224, 168), frames=60, fps=10, gop=10)
    rule = {"name": "clips", "match": {"kind": "video"}, "prompt": CLIP_PROMPT,
            "video": {"frames": 48, "align": 28, "max_side": 224}}  # fmt: skip
    seen = {}
    for cap in (32, None):
        folder = tmp_path / f"cap-{cap}"
        cfg = write_config(folder, base_url=real_vllm.base_url, rule=rule,
                           endpoint={"model": real_vllm.model, "max_video_frames": cap, "timeout_s": 300})  # fmt: skip
        target = folder / "inbox" / "clip.mp4"
        target.write_bytes(clip.read_bytes())
        assert main(["once", "-c", str(cfg), str(target)]) == 0, real_vllm.log_tail()
        doc = sidecar(target)
        assert doc["media"]["mode"] == "video_url" and "vLLM" in doc["media"]["mode_reason"]
        seen[cap] = (
            len(doc["media"]["frames"]),
            doc["media"]["frames"][-1]["t"],
            doc["response"]["usage"]["prompt_tokens"],
        )
    assert seen[32] == (32, pytest.approx(5.9, abs=0.05), thirty_two)  # all 32 seen, the clip's end among them
    frames, _, tokens = seen[None]
    assert frames == 48 and tokens == thirty_two  # 48 sent and paid for, 32 seen
