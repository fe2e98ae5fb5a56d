"""Video rows of the benchmark suite: how much of a clip the video encoder decodes, and whether its memory stays
flat in clip length.

    python bench/run.py --only video      (python bench/video.py does the same)

Writes (once; later runs reuse it) a seeded 1080p H.264 clip with a 2 s GOP (libx264 at preset ultrafast when
FFmpeg has it, else the built-in mpeg4): 2 minutes, or 1 minute with ``--quick``, plus its first quarter (remuxed),
under the bench cache folder, then measures:

(a) decoding every frame, the reference;
(b) ``encode_video`` for 16 frames (8 with ``--quick``), ``mode: video_url``, ``max_side: 768``;
(c) the same with ``keyframes_only``;

(best of 2 for the reference, of 3 for ours) and the peak RSS growth during (b) on the quarter and the whole clip,
each in a fresh process (VmHWM from /proc/self/status, reset through /proc/self/clear_refs where the kernel allows;
ru_maxrss otherwise), plus the peak of Python allocations (tracemalloc; pixel buffers of Pillow and FFmpeg are not
Python allocations).
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

from mmwatchd.encode.video import encode_video
from mmwatchd.model import Limits, VideoSpec

SEED = 20240601
FPS = 25
GOP_S = 2
WIDTH, HEIGHT = 1920, 1080
LONG_S = 120
CACHE = Path(os.environ.get("MMWATCHD_BENCH_CACHE") or Path(tempfile.gettempdir()) / "mmwatchd-bench")
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
    path = clip_path(seconds)
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


def clip_path(seconds: int) -> Path:
    return CACHE / f"clip-{seconds}s-{HEIGHT}p-gop{GOP_S}s-{_codec()}-{SEED}.mp4"


def clip(seconds: int) -> Path:
    """The clip of ``seconds``: cached, else cut from the cached 2-minute clip, else encoded."""
    path = clip_path(seconds)
    if path.exists():
        return path
    if seconds < LONG_S and clip_path(LONG_S).exists():
        return cut_clip(clip_path(LONG_S), seconds)
    return make_clip(seconds)


def cut_clip(source: Path, seconds: int) -> Path:
    """The first ``seconds`` of ``source``, remuxed (no re-encode)."""
    path = clip_path(seconds)
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


def keyframe_floor(path: Path, n: int) -> float:
    """Seconds to seek to and decode the keyframe at or before each of ``n`` evenly spread times, and nothing else:
    what any keyframes-only sampler pays at least (no scaling, no JPEG)."""
    start = time.perf_counter()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.skip_frame = "NONKEY"
        duration = float(container.duration / av.time_base) if container.duration else LONG_S
        for i in range(n):
            t = duration * i / (n - 1) if n > 1 else 0.0
            container.seek(int(min(t, duration - 0.5) / stream.time_base), stream=stream, backward=True)
            for _ in container.decode(stream):
                break
    return time.perf_counter() - start


def run_encode(path: Path, spec: VideoSpec) -> tuple[float, int]:
    start = time.perf_counter()
    result = encode_video(path, spec, budget=lambda n: BUDGET, limits=Limits())
    return time.perf_counter() - start, len(result.frames)


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure_memory(path: Path, frames: int = 16) -> dict[str, float]:
    """Run (b) once in this process; peak RSS growth and Python allocation peak."""
    run_encode(path, VideoSpec(frames=2, max_side=64))  # import-time and first-call allocations out of the way
    before = _status("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        source = "VmHWM"
    except OSError:
        source = "ru_maxrss"
    tracemalloc.start()
    seconds, sent = run_encode(path, VideoSpec(frames=frames, mode="video_url", max_side=768))
    _, python_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak = _status("VmHWM") if source == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"growth": peak - before, "python": python_peak, "seconds": seconds, "frames": sent, "source": source}


def memory_in_child(path: Path, frames: int = 16) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--memory", str(path), "--frames", str(frames)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(quick: bool) -> dict[str, float]:
    """Everything the suite's video rows report, in seconds and bytes."""
    av.logging.set_level(av.logging.ERROR)
    long_s = LONG_S // 2 if quick else LONG_S
    frames = 8 if quick else 16
    began = time.perf_counter()
    long_clip = clip(long_s)
    short_clip = clip(long_s // 4)
    made = time.perf_counter() - began
    spec = VideoSpec(frames=frames, mode="video_url", max_side=768)
    keys_spec = VideoSpec(frames=frames, mode="video_url", max_side=768, keyframes_only=True)
    # Best of n everywhere, interleaved, so that a burst of load elsewhere on the machine hits one try of each.
    refs, ours, keys, floor = [], [], [], []
    for i in range(3):
        if i < 2:
            refs.append(decode_all(long_clip))
        ours.append(run_encode(long_clip, spec))
        keys.append(run_encode(long_clip, keys_spec))
        floor.append(keyframe_floor(long_clip, frames))
    (reference, decoded), (frames_s, frames_n), (keys_s, keys_n) = min(refs), min(ours), min(keys)
    mem_short = memory_in_child(short_clip, frames)
    mem_long = memory_in_child(long_clip, frames)
    return {
        "long_s": long_s, "short_s": long_s // 4, "frames": frames, "clip_bytes": long_clip.stat().st_size,
        "made_s": made, "reference_s": reference, "decoded": decoded, "ours_s": frames_s, "ours_n": frames_n,
        "keys_s": keys_s, "keys_n": keys_n, "keyframe_floor_s": min(floor), "mem_short": mem_short["growth"], "mem_long": mem_long["growth"],
        "py_short": mem_short["python"], "py_long": mem_long["python"], "mem_source": mem_long["source"],
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--memory", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--frames", type=int, default=16, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.memory:
        av.logging.set_level(av.logging.ERROR)
        print(json.dumps(measure_memory(args.memory, args.frames)))
        return 0
    import run  # the suite, beside this file

    return run.main(["--only", "video", *rest])


if __name__ == "__main__":
    raise SystemExit(main())
