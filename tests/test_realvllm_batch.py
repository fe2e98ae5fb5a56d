"""``backfill --export``, a real ``vllm run-batch`` over the shard, ``backfill --import``: the sidecars a real vLLM's
batch answers give (issue 14).

Opt-in like tests/test_realserver.py (``MMWATCHD_REALSERVER=1`` or ``-m realserver``), and skipped when the shared
real-vLLM setup is not on this machine: ``../shared/realvllm`` (see its README) and the venv and tiny random Qwen2-VL
its setup leaves under ``$REALVLLM_HOME`` (default ``~/.cache/realvllm``). About a minute or two of CPU.

The model's weights are random, so the assertions are about what does not depend on them: every line answered, each
file's sidecar applied from its own line (the prompt token count grows with the pixels the model was sent), the
sidecar's record of the request equal to what the online path plans for the same file.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from configs import write_config
from media import make_jpeg, make_png, make_video
from optin import opted_in

from mmwatchd.cli import main

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "realvllm"
HOME = Path(os.environ.get("REALVLLM_HOME") or Path.home() / ".cache" / "realvllm")
PYTHON = HOME / "venv" / "bin" / "python"
MODEL = HOME / "model"
SERVED = "tiny-qwen2-vl"


def _opted_in(config: pytest.Config) -> bool:
    return opted_in(config, "realserver", "MMWATCHD_REALSERVER")


pytestmark = [
    pytest.mark.realserver,
    pytest.mark.skipif("not _opted_in(config)", reason="needs a real vLLM: set MMWATCHD_REALSERVER=1 or -m realserver"),
    pytest.mark.skipif(
        not (SHARED.is_dir() and PYTHON.is_file() and (MODEL / "config.json").is_file()),
        reason=f"the shared real vLLM is not set up here ({SHARED}, {PYTHON}, {MODEL}): see {SHARED}/README.md",
    ),
]


def _sidecar(path: Path) -> dict:
    return json.loads(path.with_name(path.name + ".json").read_text())


def test_export_run_batch_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inbox = tmp_path / "inbox"
    small = make_jpeg(inbox / "small.jpg", (112, 112), seed=1)
    large = make_jpeg(inbox / "large.jpg", (448, 336), seed=2)
    drawing = make_png(inbox / "drawing.png", (224, 168))
    clip = make_video(inbox / "clip.mp4", (224, 168), frames=8, fps=4)
    photos = {"name": "photos", "match": {"kind": "image"}, "prompt": "Describe this photo.", "max_tokens": 8}
    clips = {"name": "clips", "match": {"kind": "video"}, "prompt": "Describe this clip.", "max_tokens": 8,
             "video": {"mode": "video_url", "frames": 4, "align": 28}}  # fmt: skip
    # Nothing listens at the endpoint: export and import never call it.
    cfg = write_config(tmp_path, base_url="http://127.0.0.1:9/v1", endpoint={"model": SERVED}, rules=[photos, clips])

    assert main(["once", "-c", str(cfg), "--dry-run", str(small), str(large), str(drawing), str(clip)]) == 0
    plans = {Path(p["path"]).name: p for p in json.loads(capsys.readouterr().out)["files"]}

    shards = tmp_path / "shards"
    assert main(["backfill", "-c", str(cfg), "--export", str(shards), "--log-level", "error"]) == 0
    (shard,) = shards.glob("*.jsonl")
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}  # fmt: skip
    env.pop("PYTHONPATH", None)
    run = subprocess.run(
        [str(PYTHON), "-m", "vllm.entrypoints.openai.run_batch", "-i", str(shard), "-o", str(out),
         "--model", str(MODEL), "--served-model-name", SERVED, "--dtype", "float32", "--max-model-len", "8192",
         "--enforce-eager"],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    lines = [json.loads(raw) for raw in out.read_text().splitlines()]
    assert len(lines) == 4 and all(line["response"]["status_code"] == 200 for line in lines), lines

    capsys.readouterr()
    assert main(["backfill", "-c", str(cfg), "--import", str(out), "--log-level", "error"]) == 0
    assert "backfill imported: 4 described, 0 failed" in capsys.readouterr().out
    docs = {p.name: _sidecar(p) for p in (small, large, drawing, clip)}
    for name, doc in docs.items():
        plan = plans[name]
        assert doc["status"] == "ok" and doc["model"] == SERVED, (name, doc)
        assert doc["rule"] == plan["rule"] and doc["fingerprint"] == plan["fingerprint"]
        assert doc["media"] == plan["media"], name  # the same request, recorded the same way
        assert doc["response"]["finish_reason"] == "length" and doc["response"]["usage"]["completion_tokens"] == 8
    tokens = {name: doc["response"]["usage"]["prompt_tokens"] for name, doc in docs.items()}
    assert tokens["small.jpg"] < tokens["drawing.png"] < tokens["large.jpg"]  # each got its own image's answer
    assert docs["clip.mp4"]["media"]["mode"] == "video_url"
    assert main(["backfill", "-c", str(cfg), "--status", "--log-level", "error"]) == 0
    assert "applied" in capsys.readouterr().out
