"""Mutated JPEG/PNG/HEIC/MP4/WebM bytes: every input ends in an ok or an error sidecar, never in an exception.

The decoders run isolated, as in the daemon, so a mutation that makes a C decoder hang or crash is part of the test.

Each run draws its inputs from one seed (see fuzzseed.py), printed in pytest's header; a failure names the seed, the
command that repeats the run, and the failing file's recipe: which seed file, which mutation, where the bytes are kept.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from configs import load_config
from fakevlm import FakeVLM
from fuzzseed import ENV, SEED, repeat_hint
from hypothesis import HealthCheck, given, note, seed, settings, strategies as st
from media import make_heic, make_jpeg, make_numbered_video, make_png
from mutations import mutate, mutation

from mmwatchd.isolate import Isolator
from mmwatchd.pipeline import Pipeline
from mmwatchd.vlm import VLMClient

#: How each seed file is made (tests/media.py), so a recipe can name it.
SEED_FILES = {
    ".jpg": "make_jpeg(path, (96, 64), orientation=6, taken='2024:01:02 03:04:05')",
    ".png": "make_png(path, (64, 48), mode='RGBA')",
    ".heic": "make_heic(path, (64, 48))",
    ".mp4": "make_numbered_video(path, (96, 64), frames=12, fps=6)",
    ".webm": "make_numbered_video(path, (96, 64), frames=12, fps=6)",
}


class SeedBytes(dict[str, bytes]):
    """The seed files' bytes by extension; the repr hypothesis prints with a failure gives sizes, not 50 kB of bytes."""

    def __repr__(self) -> str:
        return "SeedBytes(" + ", ".join(f"{ext}: {len(data)} bytes" for ext, data in self.items()) + ")"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("seeds")
    out = SeedBytes(
        {
            ".jpg": make_jpeg(d / "a.jpg", (96, 64), orientation=6, taken="2024:01:02 03:04:05").read_bytes(),
            ".png": make_png(d / "a.png", (64, 48), mode="RGBA").read_bytes(),
            ".heic": make_heic(d / "a.heic", (64, 48)).read_bytes(),
            ".mp4": make_numbered_video(d / "a.mp4", (96, 64), frames=12, fps=6).read_bytes(),
            ".webm": make_numbered_video(d / "a.webm", (96, 64), frames=12, fps=6).read_bytes(),
        }
    )
    assert out.keys() == SEED_FILES.keys()
    return out


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pipeline, Path]]:
    root = tmp_path_factory.mktemp("fuzz")
    fake = FakeVLM().start()
    cfg = load_config(root, base_url=fake.base_url, rule={"match": {"kind": "any"}, "video": {"frames": 4}},
                      limits={"decode_timeout_s": 10})  # fmt: skip
    isolator = Isolator(workers=1, timeout_s=10, memory_bytes=1 << 30, preload=("mmwatchd.encode",))
    client = VLMClient(cfg.endpoint, api_key=None)
    try:
        yield Pipeline(cfg, client, isolator=isolator), root / "inbox"
    finally:
        isolator.close()
        client.close()
        fake.stop()


_serial = itertools.count()


def recipe(ext: str, how: tuple, path: Path) -> str:  # type: ignore[type-arg]
    """Everything needed to rebuild a fuzzed file by hand, or to rerun the whole fuzz run that made it."""
    return (
        f"fuzz seed {SEED} (repeat the run: {repeat_hint()}); file {path} = "
        f"mutate(<{ext} seed file: {SEED_FILES[ext]}>, {how!r}); the file's bytes stay at that path"
    )


# The seed alone decides the inputs: no example database, whose replays would make a run depend on earlier ones.
@seed(SEED)
@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ext=st.sampled_from(list(SEED_FILES)), how=mutation)
def test_every_mutation_ends_in_a_sidecar(
    seeds: dict[str, bytes],
    fuzz_env: tuple[Pipeline, Path],
    ext: str,
    how: tuple,  # type: ignore[type-arg]
) -> None:
    processor, inbox = fuzz_env
    path = inbox / f"f{next(_serial)}{ext}"  # a new file each time: a reused name would be "up to date"
    path.write_bytes(mutate(seeds[ext], how))
    made = recipe(ext, how, path)
    note(made)  # hypothesis prints notes with the failing example, whatever was raised
    out = processor.process(path)
    assert out.status in ("ok", "error"), f"{out.status}: {out.reason}; {made}"
    doc = json.loads(path.with_name(path.name + ".json").read_text())
    assert doc["status"] == out.status, made
    if out.status == "error":
        assert doc["error"]["message"].startswith(path.name) or path.name in doc["error"]["message"], made
    assert "Traceback" not in json.dumps(doc), made


def test_the_seed_is_printed_and_taken_from_the_environment(pytestconfig: pytest.Config) -> None:
    """pytest's header names the seed this run uses; MMWATCHD_FUZZ_SEED makes a later run use it again."""
    header = pytestconfig.hook.pytest_report_header(config=pytestconfig, start_path=pytestconfig.rootpath)
    assert f"fuzz seed: {SEED} (repeat with: {ENV}={SEED} python -m pytest tests/test_fuzz.py)" in str(header)

    def seed_with(value: str | None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != ENV} | ({ENV: value} if value is not None else {})
        code = "import fuzzseed; print(fuzzseed.SEED)"
        return subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True,
                              text=True, timeout=60, check=False)  # fmt: skip

    assert seed_with("123456").stdout.strip() == "123456"
    fresh = {seed_with(None).stdout.strip() for _ in range(2)}
    assert len(fresh) == 2 and all(s.isdigit() for s in fresh)  # a new one each run, unless given
    bad = seed_with("abc")
    assert bad.returncode != 0 and f"{ENV}='abc': must be an integer" in bad.stderr
