"""How much of a clip the video encoder decodes, and whether its memory stays flat in clip length.

    python bench/video.py

Writes (once; later runs reuse it) a seeded 2-minute 1080p H.264 clip with a 2 s GOP (libx264 at preset ultrafast
when FFmpeg has it, else the built-in mpeg4) and its first 30 s, under the system temp folder, then measures:

(a) decoding every frame, the reference;
(b) ``encode_video`` for 16 frames, ``mode: video_url``, ``max_side: 768``;
(c) the same with ``keyframes_only``;

(best of 2 for the reference, of 3 for ours)

and the peak RSS growth during (b) on the 30 s and the 120 s clip, each in a fresh process (VmHWM from
/proc/self/status, reset through /proc/self/clear_refs where the kernel allows; ru_maxrss otherwise), plus the
peak of Python allocations (tracemalloc; pixel buffers of Pillow and FFmpeg are not Python allocations).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import av

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmwatchd.encode.video import encode_video  # noqa: E402
from mmwatchd.model import Limits, VideoSpec  # noqa: E402

SEED = 20240601
FPS = 25
GOP_S = 2
WIDTH, HEIGHT = 1920, 1080
LONG_S, SHORT_S = 120, 30
CACHE = Path(tempfile.gettempdir()) / "mmwatchd-bench"
SPEC = VideoSpec(frames=16, mode="video_url", max_side=768)
BUDGET = 20_000_000


def _codec() -> str:
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def _frames(seconds: int) -> Callable[[int], av.VideoFrame]:
    """A panning view over a seeded canvas: smooth structure plus some grain, like a handheld shot."""
    rng = random.Random(SEED)
    cw, ch = WIDTH + 800, HEIGHT + 400
    from PIL import Image

    coarse = Image.frombytes("L", (cw // 16, ch // 16), rng.randbytes(cw // 16 * ch // 16))
    coarse = coarse.resize((cw, ch), Image.Resampling.BICUBIC)
    fine = Image.frombytes("L", (cw // 2, ch // 2), rng.randbytes(cw // 2 * ch // 2))
    fine = fine.resize((cw, ch), Image.Resampling.BILINEAR)
    ramp = Image.linear_gradient("L").resize((cw, ch))
    canvas = Image.merge("RGB", (coarse, Image.blend(fine, ramp, 0.6), Image.blend(coarse, fine, 0.3)))

    def offset(i: int) -> tuple[int, int]:
        x = int(400 + 350 * math.sin(i / 40))
        y = (i * 2) % 400
        return x - x % 2, y - y % 2

    try:
        import numpy as np
    except ImportError:
        return lambda i: av.VideoFrame.from_image(
            canvas.crop((*offset(i), offset(i)[0] + WIDTH, offset(i)[1] + HEIGHT))
        ).reformat(format="yuv420p")
    yuv = av.VideoFrame.from_image(canvas).reformat(format="yuv420p")
    planes = [np.frombuffer(p, np.uint8).reshape(-1, p.line_size)[:, : p.width] for p in yuv.planes]

    def frame(i: int) -> av.VideoFrame:
        x, y = offset(i)
        y_plane = planes[0][y : y + HEIGHT, x : x + WIDTH]
        u_plane = planes[1][y // 2 : y // 2 + HEIGHT // 2, x // 2 : x // 2 + WIDTH // 2]
        v_plane = planes[2][y // 2 : y // 2 + HEIGHT // 2, x // 2 : x // 2 + WIDTH // 2]
        stacked = np.concatenate([y_plane, u_plane.reshape(HEIGHT // 4, WIDTH), v_plane.reshape(HEIGHT // 4, WIDTH)])
        return av.VideoFrame.from_ndarray(stacked, format="yuv420p")

    return frame


def make_clip(seconds: int) -> Path:
    codec = _codec()
    path = CACHE / f"clip-{seconds}s-{HEIGHT}p-gop{GOP_S}s-{codec}-{SEED}.mp4"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part.mp4")
    frame_at = _frames(seconds)
    with av.open(str(partial), "w") as out:
        stream = out.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.gop_size = FPS * GOP_S
        stream.thread_type = "AUTO"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "28", "sc_threshold": "0"}
        else:
            stream.codec_context.bit_rate = 8_000_000
        for i in range(seconds * FPS):
            frame = frame_at(i)
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    partial.replace(path)
    return path


def cut_clip(source: Path, seconds: int) -> Path:
    """The first ``seconds`` of ``source``, remuxed (no re-encode)."""
    path = source.with_name(source.name.replace(f"-{LONG_S}s-", f"-{seconds}s-"))
    if path.exists():
        return path
    partial = path.with_suffix(".part.mp4")
    with av.open(str(source)) as src, av.open(str(partial), "w") as out:
        ins = src.streams.video[0]
        outs = out.add_stream_from_template(ins)
        for packet in src.demux(ins):
            if packet.dts is None or packet.pts is None:
                continue
            if packet.pts * ins.time_base >= seconds:
                break
            packet.stream = outs
            out.mux(packet)
    partial.replace(path)
    return path


def decode_all(path: Path) -> tuple[float, int]:
    start = time.perf_counter()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        count = sum(1 for _ in container.decode(stream))
    return time.perf_counter() - start, count


def run_encode(path: Path, spec: VideoSpec) -> tuple[float, int]:
    start = time.perf_counter()
    result = encode_video(path, spec, budget=lambda n: BUDGET, limits=Limits())
    return time.perf_counter() - start, len(result.frames)


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure_memory(path: Path) -> dict[str, float]:
    """Run (b) once in this process; peak RSS growth and Python allocation peak."""
    run_encode(path, VideoSpec(frames=2, max_side=64))  # import-time and first-call allocations out of the way
    before = _status("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        source = "VmHWM"
    except OSError:
        source = "ru_maxrss"
    tracemalloc.start()
    seconds, frames = run_encode(path, SPEC)
    _, python_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak = _status("VmHWM") if source == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"growth": peak - before, "python": python_peak, "seconds": seconds, "frames": frames, "source": source}


def memory_in_child(path: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--memory", str(path)], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--memory", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    av.logging.set_level(av.logging.ERROR)
    if args.memory:
        print(json.dumps(measure_memory(args.memory)))
        return 0

    began = time.perf_counter()
    long_clip = make_clip(LONG_S)
    short_clip = cut_clip(long_clip, SHORT_S)
    made = time.perf_counter() - began
    print(f"clips: {long_clip.name} ({long_clip.stat().st_size / 1e6:.0f} MB), {short_clip.name} "
          f"({short_clip.stat().st_size / 1e6:.0f} MB), ready in {made:.1f} s")  # fmt: skip

    reference, decoded = min(decode_all(long_clip) for _ in range(2))  # best of n everywhere: a busy machine is noisy
    frames_s, frames_n = min(run_encode(long_clip, SPEC) for _ in range(3))
    keys_spec = VideoSpec(frames=16, mode="video_url", max_side=768, keyframes_only=True)
    keys_s, keys_n = min(run_encode(long_clip, keys_spec) for _ in range(3))
    print()
    print("what                                      | ours s | reference s | ratio  | target")
    print("------------------------------------------|--------|-------------|--------|-------")
    print(f"(a) decode all {decoded} frames (120 s 1080p)    |   -    | {reference:11.2f} |   -    |   -")
    print(f"(b) 16 frames, video_url, 768 px ({frames_n} sent) | {frames_s:6.2f} | {reference:11.2f} | "
          f"{frames_s / reference:5.3f}x | 0.25x")  # fmt: skip
    print(f"(c) keyframes_only ({keys_n} sent)              | {keys_s:6.2f} | {reference:11.2f} | "
          f"{keys_s / reference:5.3f}x | 0.05x")  # fmt: skip
    print()
    print("peak memory during (b), fresh process each:")
    for seconds, clip in ((SHORT_S, short_clip), (LONG_S, long_clip)):
        mem = memory_in_child(clip)
        print(f"  {seconds:4d} s clip: RSS growth {mem['growth'] / 2**20:6.1f} MiB ({mem['source']}), "
              f"Python allocations peak {mem['python'] / 2**20:5.2f} MiB, {mem['seconds']:.2f} s")  # fmt: skip
    print(f"\ntotal {time.perf_counter() - began:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
