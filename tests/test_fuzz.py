"""Mutated JPEG/PNG/HEIC/MP4/WebM bytes: every input ends in an ok or an error sidecar, never in an exception.

The decoders run isolated, as in the daemon, so a mutation that makes a C decoder hang or crash is part of the test.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from configs import load_config
from fakevlm import FakeVLM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from media import make_heic, make_jpeg, make_numbered_video, make_png

from mmwatchd.isolate import Isolator
from mmwatchd.pipeline import Processor
from mmwatchd.vlm import VLMClient


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("seeds")
    return {
        ".jpg": make_jpeg(d / "a.jpg", (96, 64), orientation=6, taken="2024:01:02 03:04:05").read_bytes(),
        ".png": make_png(d / "a.png", (64, 48), mode="RGBA").read_bytes(),
        ".heic": make_heic(d / "a.heic", (64, 48)).read_bytes(),
        ".mp4": make_numbered_video(d / "a.mp4", (96, 64), frames=12, fps=6).read_bytes(),
        ".webm": make_numbered_video(d / "a.webm", (96, 64), frames=12, fps=6).read_bytes(),
    }


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Processor, Path]]:
    root = tmp_path_factory.mktemp("fuzz")
    fake = FakeVLM().start()
    cfg = load_config(root, base_url=fake.base_url, rule={"match": {"kind": "any"}, "video": {"frames": 4}},
                      limits={"decode_timeout_s": 10})  # fmt: skip
    isolator = Isolator(workers=1, timeout_s=10, memory_bytes=1 << 30, preload=("mmwatchd.encode",))
    client = VLMClient(cfg.endpoint, api_key=None)
    try:
        yield Processor(cfg, client, isolator=isolator), root / "inbox"
    finally:
        isolator.close()
        client.close()
        fake.stop()


mutation = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=12)),
    st.tuples(st.just("cut"), st.floats(0, 1)),
    st.tuples(st.just("insert"), st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=64))),
    st.tuples(st.just("zero"), st.tuples(st.floats(0, 1), st.integers(1, 512))),
)


_serial = itertools.count()


def mutate(data: bytes, how: tuple) -> bytes:  # type: ignore[type-arg]
    kind, arg = how
    buf = bytearray(data)
    if kind == "flip":
        for where, value in arg:
            buf[min(len(buf) - 1, int(where * len(buf)))] = value
    elif kind == "cut":
        del buf[int(arg * len(buf)) :]
    elif kind == "insert":
        where, chunk = arg
        buf[int(where * len(buf)) : int(where * len(buf))] = chunk
    else:
        where, n = arg
        start = int(where * len(buf))
        buf[start : start + n] = bytes(len(buf[start : start + n]))
    return bytes(buf)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ext=st.sampled_from([".jpg", ".png", ".heic", ".mp4", ".webm"]), how=mutation)
def test_every_mutation_ends_in_a_sidecar(
    seeds: dict[str, bytes], fuzz_env: tuple[Processor, Path], ext: str, how: tuple  # type: ignore[type-arg]
) -> None:
    processor, inbox = fuzz_env
    path = inbox / f"f{next(_serial)}{ext}"  # a new file each time: a reused name would be "up to date"
    path.write_bytes(mutate(seeds[ext], how))
    out = processor.process(path)
    assert out.status in ("ok", "error"), (out.status, out.reason)
    doc = json.loads(path.with_name(path.name + ".json").read_text())
    assert doc["status"] == out.status
    if out.status == "error":
        assert doc["error"]["message"].startswith(path.name) or path.name in doc["error"]["message"]
    assert "Traceback" not in json.dumps(doc)
