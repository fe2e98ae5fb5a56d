"""mmwatchd's benchmark suite: one table, every figure a ratio against a reference measured in the same run.

    python bench/run.py [--quick] [--only ROW ...] [--markdown] [--keep]

Rows (``--only`` takes the name or the number; repeatable):

1 images      photos to size-bounded data URLs with ``encode_image`` (max_side 1024) on 2 threads, as the daemon's
              workers call it, vs (a) the common Pillow recipe one by one and (b) a reduced-scale JPEG decode alone;
              (c) the same at the default 1536 px; (d) the same photos through ``mmwatchd once --dry-run`` (decoder
              processes and all), less that command's start-up, vs the decode alone
2 video       16 frames from a 2-minute 1080p H.264 clip vs decoding every frame; keyframes_only; RSS growth on
              a clip four times longer (see video.py)
3 throughput  small JPEGs through ``mmwatchd scan`` against a server answering after a fixed 0.2 s, concurrency 8,
              vs the ideal files x latency / concurrency; whole command, first request to last reply, and start to
              first request vs a process that only imports the openai SDK and makes its client
4 latency     ``mmwatchd run`` at the default settle_s (2 s): end of a file's write to its request arriving at the
              server, for a write+close, a rename into place, and a hard link (no close-after-write event)
5 rescan      ``mmwatchd scan`` over a large tree whose sidecars are all up to date vs a bare scandir+stat walk of
              the same tree in a Python subprocess; the rescan must send no request
6 memory      peak memory of ``mmwatchd scan`` and its decoder processes over the 2-minute clip and the photos,
              concurrency 4, as summed PSS and summed RSS (sampled, see spawn.py); the same scan of an empty folder
              for comparison
7 wire        request bytes the server received vs base64 of the original files (from the row 6 run)
8 search      ``mmwatchd search`` over 100,000 sidecars: index build vs walk+json.load, a query vs SELECT count(*),
              the whole command vs a walk+stat (see search.py)
9 raw         camera RAW samples (../shared/media/raw) through ``mmwatchd once --dry-run``: the embedded preview vs a
              half-size demosaic of the same files, as whole commands and in-process (see raw.py)
10 concurrency ``concurrency: auto`` through ``mmwatchd scan`` against a server that batches like a GPU server (see
              concurrency.py)

Times are medians of 3 interleaved rounds (images), best of 2-3 (video, see video.py) or single runs (the CLI rows, which are long enough).
Inputs are generated from fixed seeds and cached (see :mod:`inputs`; ``$MMWATCHD_BENCH_CACHE``), so a second run
starts measuring at once. ``--quick`` runs the same rows on smaller inputs (8 photos, a 1-minute clip with 8 frames,
120 throughput files, 10,000 rescan files). mmwatchd runs as the real CLI in a subprocess (``python -m mmwatchd``
from this checkout) against :class:`server.FixedLatencyServer` on loopback; the config is a YAML file in a
temporary folder, removed afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for extra in (BENCH, ROOT):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import inputs
from concurrency import row_concurrency  # noqa: F401 (row 10, run by name)
from server import FixedLatencyServer, self_check

ROWS = ("images", "video", "throughput", "latency", "rescan", "memory", "wire", "search", "raw", "concurrency")
LATENCY_S = 0.2


@dataclass(frozen=True, slots=True)
class Size:
    photos: int
    throughput_files: int
    latency_files: int
    rescan_files: int
    rescan_dirs: int
    image_rounds: int


FULL = Size(photos=24, throughput_files=300, latency_files=5, rescan_files=100_000, rescan_dirs=100, image_rounds=3)
QUICK = Size(photos=8, throughput_files=120, latency_files=3, rescan_files=10_000, rescan_dirs=10, image_rounds=3)


# ----------------------------------------------------------------------------------------------------------- table


@dataclass(slots=True)
class Row:
    key: str
    what: str
    ours: str
    reference: str
    ratio: float | None = None
    #: The ratio must be at most this; None: reported only.
    target: float | None = None
    target_text: str = "-"
    #: Overrides the ratio check (rows whose target is not a ratio).
    met: bool | None = None
    miss: str = ""

    def verdict(self) -> str:
        met = self.met
        if met is None and self.target is not None and self.ratio is not None:
            met = self.ratio <= self.target
        if met is None:
            return "-"
        if met:
            return "yes"
        if self.miss:
            return f"no: {self.miss}"
        return f"no: {self.ratio / self.target:.2f}x the target" if self.ratio and self.target else "no"


@dataclass(slots=True)
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        progress(f"  {row.key} {row.what}: {row.ours} vs {row.reference} -> {fmt_ratio(row.ratio)} ({row.verdict()})")

    def note(self, text: str) -> None:
        self.notes.append(text)
        progress(f"     {text}")


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.3f}x" if r < 0.1 else f"{r:.2f}x"


def fmt_s(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def fmt_mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def render(report: Report, *, markdown: bool) -> str:
    head = ("", "what", "ours", "reference", "ratio", "target", "met?")
    body = [(r.key, r.what, r.ours, r.reference, fmt_ratio(r.ratio), r.target_text, r.verdict()) for r in report.rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in (head, *body)) for i in range(len(head))]

    def fmt(row: Sequence[str]) -> str:
        return " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()

    return "\n".join([fmt(head), "-+-".join("-" * w for w in widths), *(fmt(row) for row in body)])


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------------------------- children


@dataclass(frozen=True, slots=True)
class Child:
    rc: int
    wall_s: float
    started: float  # time.time() when the process was started
    ended: float
    maxrss: int  # bytes
    #: User + system CPU of the command and the processes it reaped (decoders included), seconds.
    cpu_s: float
    stdout: str
    stderr: str
    #: With ``tree=True``: tree_rss, tree_pss, tree_hwm_sum (bytes), tree_processes (see spawn.py).
    tree: dict[str, int] = field(default_factory=dict)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    for name in ("MMWATCHD_CONFIG", "STATE_DIRECTORY", "NOTIFY_SOCKET", "WATCHDOG_USEC", "MMWATCHD_BENCH_KEY"):
        env.pop(name, None)
    return env


def mmwatchd(*args: str) -> list[str]:
    """The command as users run it: the ``mmwatchd`` console script installed beside this interpreter (what the
    README and the systemd units start), else ``python -m mmwatchd`` from this checkout."""
    script = Path(sys.executable).with_name("mmwatchd")
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "mmwatchd", *args]


def run_child(cmd: Sequence[str], *, cwd: Path, timeout: float, tree: bool = False) -> Child:
    """Run ``cmd`` to the end through ``spawn.py``: its own wall time and peak RSS, not this process's."""
    stamp = time.monotonic_ns()
    out_path, err_path, report = cwd / f".out-{stamp}", cwd / f".err-{stamp}", cwd / f".rusage-{stamp}.json"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        spawn = [sys.executable, str(BENCH / "spawn.py"), *(["--tree"] if tree else []), str(report)]
        proc = subprocess.Popen([*spawn, *cmd], cwd=cwd, env=_env(),
                                stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"{' '.join(cmd[:4])} did not finish within {timeout:.0f} s") from None
    usage = json.loads(report.read_text())
    child = Child(
        rc=usage["rc"], wall_s=usage["wall_s"], started=usage["started"], ended=usage["ended"], maxrss=usage["maxrss"],
        cpu_s=usage["cpu_s"],
        stdout=out_path.read_text(errors="replace"), stderr=err_path.read_text(errors="replace"),
        tree={k: v for k, v in usage.items() if k.startswith("tree_")},
    )  # fmt: skip
    for path in (out_path, err_path, report):
        path.unlink()
    return child


PHOTO_RULE = {"name": "photos", "match": {"kind": "image"}, "prompt": "Describe {name} ({width}x{height})."}


def write_config(
    folder: Path,
    *,
    base_url: str,
    inbox: Path,
    concurrency: int | None,
    rules: list[dict[str, Any]] | None = None,
    **top: Any,
) -> Path:
    """A config file like the tests' (tests/configs.py): the bench server, one watched folder, a photo rule."""
    folder.mkdir(parents=True, exist_ok=True)
    endpoint: dict[str, Any] = {
        "base_url": base_url,
        "model": "bench-vlm",
        "api_key_env": "MMWATCHD_BENCH_KEY",
        "timeout_s": 60,
        "max_retries": 0,
    }
    if concurrency is not None:
        endpoint["concurrency"] = concurrency
    doc = {
        "endpoint": endpoint,
        "watch": [{"path": str(inbox), "recursive": True}],
        "rules": rules or [PHOTO_RULE],
        "state_dir": str(folder / "state"),
        **top,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def scan_summary(child: Child) -> str:
    lines = [line for line in child.stdout.splitlines() if line.startswith("scan done")]
    return lines[-1] if lines else f"exit {child.rc}: {child.stderr.strip()[-300:]}"


def check_scan(child: Child, what: str) -> None:
    if child.rc != 0:
        raise RuntimeError(f"{what}: mmwatchd scan exited {child.rc}: {scan_summary(child)}")


# ------------------------------------------------------------------------------------------------------ 1. images


IMAGE_SIDE = 1024
BUDGET = 20_000_000 - 1_000  # max_request_bytes less a prompt's JSON, as the pipeline computes it


def _common(path: Path) -> int:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        img = ImageOps.exif_transpose(im)
        img = img.convert("RGB")
        scale = IMAGE_SIDE / max(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        return len("data:image/jpeg;base64,") + len(base64.b64encode(buf.getvalue()))


def _draft(path: Path, side: int = IMAGE_SIDE) -> int:
    from PIL import Image

    with Image.open(path) as im:
        scale = side / max(im.size)
        im.draft("RGB", (round(im.width * scale), round(im.height * scale)))
        im.load()
        return im.width


def _least(path: Path, side: int, *, decode_only: bool = False) -> int:
    """The work no encoder can skip for a 4000x3000 JPEG at ``side`` px: read it, decode it at the M/8 DCT scale
    that lands within 5% of the size (libjpeg-turbo through simplejpeg), turn it as its EXIF says, encode one JPEG
    at quality 85. No checks, no budget, no data URL: how far below the floor an encoder can get at all.
    ``decode_only``: stop after the decode (what the rotation and the encode leave room for)."""
    import simplejpeg
    from PIL import Image

    sj: Any = simplejpeg  # its stubs do not re-export decode_jpeg

    with Image.open(path) as im:
        width, height = im.size
        orientation = im.getexif().get(0x0112, 1)
    floor = round(width * side / max(width, height) * 0.95), round(height * side / max(width, height) * 0.95)
    array = sj.decode_jpeg(path.read_bytes(), colorspace="RGBX", min_width=floor[0], min_height=floor[1])
    if decode_only:
        return int(array.nbytes)
    img = Image.frombuffer("RGBX", (array.shape[1], array.shape[0]), array, "raw", "RGBX", 0, 1)
    turn = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90}
    if orientation in turn:
        img = img.transpose(turn[orientation])
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.tell()


def row_images(report: Report, size: Size, work: Path) -> None:
    from mmwatchd.encode import encode_image
    from mmwatchd.model import ImageSpec, Limits

    progress(f"1. images: {size.photos} photos, 12 MP")
    began = time.perf_counter()
    photos = inputs.photos(size.photos)
    made = time.perf_counter() - began
    limits = Limits()

    def ours(side: int = IMAGE_SIDE) -> list[Any]:
        spec = ImageSpec(max_side=side)
        with ThreadPoolExecutor(max_workers=2) as pool:
            return list(pool.map(lambda p: encode_image(p, spec, budget=BUDGET, limits=limits), photos))

    cpu: list[float] = []

    def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        cpu.append(time.process_time() - c0)
        return time.perf_counter() - t0, result

    times: dict[str, list[float]] = {"ours": [], "common": [], "draft": [], "ours_1536": [], "draft_1536": [],
                                     "least_1536": [], "decode_1536": [], "draft_1536_2": []}  # fmt: skip
    parts: list[Any] = []
    parts_1536: list[Any] = []
    common_len: list[int] = []
    ours_cpu = []
    cpu_1536: dict[str, list[float]] = {"ours": [], "draft": []}
    for _ in range(size.image_rounds):
        t, parts = timed(ours)
        times["ours"].append(t)
        ours_cpu.append(cpu[-1])
        t, common_len = timed(lambda: [_common(p) for p in photos])
        times["common"].append(t)
        times["draft"].append(timed(lambda: [_draft(p) for p in photos])[0])
        t, parts_1536 = timed(lambda: ours(1536))
        times["ours_1536"].append(t)
        cpu_1536["ours"].append(cpu[-1])
        times["draft_1536"].append(timed(lambda: [_draft(p, 1536) for p in photos])[0])
        cpu_1536["draft"].append(cpu[-1])
        with ThreadPoolExecutor(max_workers=2) as pool:  # on the same two threads as ours
            times["least_1536"].append(timed(lambda: list(pool.map(lambda p: _least(p, 1536), photos)))[0])
            times["decode_1536"].append(
                timed(lambda: list(pool.map(lambda p: _least(p, 1536, decode_only=True), photos)))[0]
            )
            times["draft_1536_2"].append(timed(lambda: list(pool.map(lambda p: _draft(p, 1536), photos)))[0])
    # Interleaved rounds (each round runs every variant once), median per variant: the machine may be shared.
    best = {k: statistics.median(v) for k, v in times.items()}
    n = len(photos)
    what = f"{n} photos 4000x3000 q90 -> data URLs, 1024 px"
    report.add(Row("1a", what + ", vs common recipe", fmt_s(best["ours"]),
                   f"{fmt_s(best['common'])} (open, exif_transpose, RGB, LANCZOS, q85; one by one)",
                   best["ours"] / best["common"], 0.25, "<= 0.25x"))  # fmt: skip
    report.add(Row("1b", what + ", vs decode floor", fmt_s(best["ours"]),
                   f"{fmt_s(best['draft'])} (draft decode alone, one core)",
                   best["ours"] / best["draft"], 1.0, "<= 1.0x"))  # fmt: skip
    report.add(Row("1c", "same at 1536 px (the default; a 3/8 DCT scale, 1500x1125, within 5%)",
                   fmt_s(best["ours_1536"]), f"{fmt_s(best['draft_1536'])} (draft decode alone, one core: 1/2 scale)",
                   best["ours_1536"] / best["draft_1536"], 0.6, "<= 0.6x"))  # fmt: skip
    c_ours, c_draft = statistics.median(cpu_1536["ours"]), statistics.median(cpu_1536["draft"])
    report.note(
        f"1c: CPU {fmt_s(c_ours / len(photos))}/photo vs {fmt_s(c_draft / len(photos))} for the floor's decode: spread "
        f"on two cores {fmt_ratio(c_ours / 2 / c_draft)} of it (what the wall-clock ratio comes to on an idle machine;"
        " on a busy one, 1b, which is 0.60x idle, shows how far the wall-clock figures are inflated);"
        f" {statistics.mean(p.url_len for p in parts_1536) / 1e3:.0f} kB URLs. The least any encoder does here (read,"
        " the 3/8 decode, the EXIF rotation, one JPEG at quality 85; nothing checked, on the same two threads) takes"
        f" {fmt_s(best['least_1536'])}, {fmt_ratio(best['least_1536'] / best['draft_1536'])} of the floor: the"
        " 3/8 scale's inverse DCT has no SIMD code in libjpeg-turbo, the 1/2 scale's has. Reading and decoding alone,"
        f" with no rotation and no encode: {fmt_s(best['decode_1536'])},"
        f" {fmt_ratio(best['decode_1536'] / best['draft_1536'])}, where the floor's own decode on the same two threads"
        f" takes {fmt_ratio(best['draft_1536_2'] / best['draft_1536'])}: the rotation and the one encode must fit in"
        " what is left below 0.6x"
    )
    command_path(report, size, work, photos)
    sizes = [p.url_len for p in parts]
    dims = {f"{p.width}x{p.height}" for p in parts}
    report.note(
        f"1: medians of {size.image_rounds} interleaved rounds; ours {fmt_s(best['ours'] / n)}/photo on 2 threads ({fmt_s(min(ours_cpu) / n)} CPU), {statistics.mean(sizes) / 1e3:.0f} kB URLs "
        f"({', '.join(sorted(dims))}, q{parts[0].quality}); common recipe {statistics.mean(common_len) / 1e3:.0f} kB; "
        f"inputs {sum(p.stat().st_size for p in photos) / n / 1e6:.1f} MB/photo"
        + (f", generated in {made:.0f} s" if made > 1 else "")
    )


def command_path(report: Report, size: Size, work: Path, photos: list[Path]) -> None:
    """Row 1d: the same photos through the real command (`mmwatchd once --dry-run`: config, rules, decoder processes,
    the request body and its JSON), less the same command's start-up (one tiny file), vs the one-core decode floor.
    Interleaved rounds, medians."""
    folder = work / "command"
    inbox = folder / "inbox"
    files = inputs.link_into(photos, inbox)
    tiny = inputs.link_into([inputs.tiny()], folder / "tiny")
    rule = {**PHOTO_RULE, "image": {"max_side": IMAGE_SIDE}}
    config = write_config(folder, base_url="http://127.0.0.1:9/v1", inbox=inbox, concurrency=None, rules=[rule])

    def once(paths: list[Path]) -> Child:
        child = run_child(mmwatchd("once", "--dry-run", "-c", str(config), *map(str, paths)), cwd=folder, timeout=600)
        if child.rc != 0:
            raise RuntimeError(f"command path: mmwatchd once --dry-run exited {child.rc}: {child.stderr[-500:]}")
        planned = json.loads(child.stdout)["files"]
        if len(planned) != len(paths) or any(f["status"] != "planned" for f in planned):
            raise RuntimeError(f"command path: not every file was planned: {child.stdout[-500:]}")
        return child

    runs: dict[str, list[float]] = {k: [] for k in ("full", "startup", "floor", "full_cpu", "startup_cpu", "floor_cpu")}
    for _ in range(size.image_rounds):
        for key, paths in (("startup", tiny), ("full", files)):
            child = once(paths)
            runs[key].append(child.wall_s)
            runs[f"{key}_cpu"].append(child.cpu_s)
        t0, c0 = time.perf_counter(), time.process_time()
        for p in photos:
            _draft(p)
        runs["floor"].append(time.perf_counter() - t0)
        runs["floor_cpu"].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in runs.items()}
    net = med["full"] - med["startup"]
    report.add(Row("1d", f"same {len(photos)} photos through `mmwatchd once --dry-run` (1024 px), start-up subtracted",
                   fmt_s(net), f"{fmt_s(med['floor'])} (draft decode alone, one core)", net / med["floor"], 0.75,
                   "<= 0.75x"))  # fmt: skip
    net_cpu = med["full_cpu"] - med["startup_cpu"]
    report.note(
        f"1d: whole command {fmt_s(med['full'])}, start-up (the same command on one 16x16 file) {fmt_s(med['startup'])};"
        f" medians of {size.image_rounds} interleaved rounds; CPU (decoders included) {fmt_s(net_cpu)} net of start-up"
        f" vs {fmt_s(med['floor_cpu'])} for the floor ({fmt_ratio(net_cpu / med['floor_cpu'])}; half of it on two"
        f" cores: {fmt_ratio(net_cpu / 2 / med['floor_cpu'])}). The decoder processes run at nice 5: on a machine"
        " others keep busy they get less than the benchmark's own reference does"
    )


# ------------------------------------------------------------------------------------------------------- 2. video


def row_video(report: Report, size: Size, work: Path) -> None:
    import video

    quick = size is QUICK
    progress(f"2. video: {'1-minute' if quick else '2-minute'} 1080p clip")
    m = video.measure(quick)
    length = f"{m['long_s'] // 60}-min 1080p H.264, 2 s GOP"
    ref = f"{fmt_s(m['reference_s'])} (decode all {m['decoded']} frames)"
    report.add(Row("2a", f"{m['frames']} frames from {length}", fmt_s(m["ours_s"]), ref,
                   m["ours_s"] / m["reference_s"], 0.25, "<= 0.25x"))  # fmt: skip
    report.add(Row("2b", f"same, keyframes_only ({m['keys_n']} sent)", fmt_s(m["keys_s"]), ref,
                   m["keys_s"] / m["reference_s"], 0.05, "<= 0.05x (aim)"))  # fmt: skip
    report.add(Row("2c", f"RSS growth while sampling, {m['long_s']} s vs {m['short_s']} s clip",
                   fmt_mb(m["mem_long"]), fmt_mb(m["mem_short"]),
                   m["mem_long"] / m["mem_short"] if m["mem_short"] > 0 else None, 1.5, "<= 1.5x (flat; linear = 4x)"))  # fmt: skip
    report.note(
        f"2: seeking to and decoding the {m['frames']} keyframes alone (no scaling, no JPEG) takes "
        f"{fmt_s(m['keyframe_floor_s'])} ({fmt_ratio(m['keyframe_floor_s'] / m['reference_s'])}); "
        f"clip {m['clip_bytes'] / 1e6:.0f} MB; Python allocation peak {fmt_mb(m['py_short'])} / "
        f"{fmt_mb(m['py_long'])} ({m['mem_source']})"
        + (f"; clips made in {m['made_s']:.0f} s" if m["made_s"] > 1 else "")
    )


# -------------------------------------------------------------------------------------------------- 3. throughput


_BARE_SDK = "import openai; openai.OpenAI(api_key='bench', base_url={url!r})"
#: The same, after importing the modules `mmwatchd scan` has loaded by its first request: what the command's own
#: code adds to it before anything is read, walked or encoded.
_OWN_IMPORTS = "import mmwatchd.cli, mmwatchd.daemon, mmwatchd.vlm; " + _BARE_SDK


def row_throughput(report: Report, size: Size, work: Path) -> None:
    n, concurrency, rounds = size.throughput_files, 8, size.image_rounds
    progress(f"3. throughput: {n} files 640x480, {LATENCY_S} s server, concurrency {concurrency}, {rounds} rounds")
    files = inputs.small(n)
    runs: list[tuple[Child, list[Any], float]] = []  # (scan, its hits, first request after start)
    bare: list[float] = []
    own: list[float] = []
    with FixedLatencyServer(LATENCY_S) as srv:
        extra, parallel = self_check(srv, concurrency)
        # Interleaved with the scans: a process that only imports the SDK and makes its client, the floor for
        # when the first request can leave (every request goes through that client).
        sdk = [sys.executable, "-c", _BARE_SDK.format(url=srv.base_url)]
        ours = [sys.executable, "-c", _OWN_IMPORTS.format(url=srv.base_url)]
        for i in range(rounds):
            bare.append(run_child(sdk, cwd=work, timeout=120).wall_s)
            own.append(run_child(ours, cwd=work, timeout=120).wall_s)
            srv.reset()
            folder = work / f"throughput-{i}"
            inbox = folder / "inbox"
            inputs.link_into(files, inbox)
            config = write_config(folder, base_url=srv.base_url, inbox=inbox, concurrency=concurrency)
            child = run_child(mmwatchd("scan", "-c", str(config)), cwd=folder, timeout=600)
            check_scan(child, "throughput")
            hits = srv.hits
            runs.append((child, hits, min(h.started for h in hits) - child.started))
    ideal = n * LATENCY_S / concurrency
    med = statistics.median
    wall = med([c.wall_s for c, _, _ in runs])
    report.add(Row("3a", f"{n} files 640x480 through `mmwatchd scan`, {LATENCY_S} s/request, concurrency 8",
                   fmt_s(wall), f"{fmt_s(ideal)} (ideal: files x latency / concurrency)",
                   wall / ideal, 1.15, "<= 1.15x"))  # fmt: skip
    steady = med([max(h.answered for h in hits) - min(h.started for h in hits) for _, hits, _ in runs])
    report.add(Row("3b", "same, first request to last reply only", fmt_s(steady), fmt_s(ideal),
                   steady / ideal, 1.1, "<= 1.1x"))  # fmt: skip
    first, sdk_s = med([f for _, _, f in runs]), med(bare)
    report.add(Row("3c", "same, start of the command to its first request",
                   fmt_s(first), f"{fmt_s(sdk_s)} (a process that imports openai and makes its client)",
                   first / sdk_s, 1.0, "<= 1.0x"))  # fmt: skip
    child, hits, _ = runs[-1]
    full_rounds = -(-n // concurrency)  # the last one partly full
    least = sdk_s + full_rounds * (LATENCY_S + extra)
    busy = sum(h.answered - h.started for h in hits)
    names = {h.name for h in hits}
    last = max(h.answered for h in hits)
    report.note(
        f"3: medians of {rounds} scans interleaved with the bare SDK process; last scan: {len(hits)} requests for "
        f"{len(names)} files ({scan_summary(child)}), last reply to exit {fmt_s(child.ended - last)}, requests in "
        f"flight at the server on average {busy / (last - min(h.started for h in hits)):.2f} of {concurrency}; "
        f"first request after {', '.join(fmt_s(f) for _, _, f in runs)}, bare SDK {', '.join(fmt_s(b) for b in bare)}; "
        f"server self-check: {parallel} requests at once, median {extra * 1000:.1f} ms beyond the delay. "
        f"Importing mmwatchd's command modules before the SDK takes {fmt_s(med(own))} "
        f"({fmt_ratio(med(own) / sdk_s)} of the bare SDK), about where the first request leaves with one "
        "interpreter (that process's exit takes about as long as the command's steps that do not overlap the SDK's "
        "import: the config, the daemon's start, the endpoint check). "
        f"The least a scan can take is the bare SDK and {full_rounds} rounds of the server's delay and self-check "
        f"time: {fmt_s(least)} ({fmt_ratio(least / ideal)} of 3a's ideal)"
    )


# ----------------------------------------------------------------------------------------------------- 4. latency


def _wait_for_text(path: Path, text: str, timeout: float, proc: subprocess.Popen[bytes]) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and text in path.read_text(errors="replace"):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _write_slowly(data: bytes, path: Path) -> float:
    """Write like a copy tool (64 KiB chunks), close, and return time.time() right after the close."""
    with open(path, "wb") as fh:
        for i in range(0, len(data), 65536):
            fh.write(data[i : i + 65536])
            fh.flush()
    return time.time()


def row_latency(report: Report, size: Size, work: Path) -> None:
    n = size.latency_files
    progress(f"4. latency: `mmwatchd run`, settle_s default (2 s), {n} files written one by one, three ways")
    sources = inputs.small(n)
    folder = work / "latency"
    inbox = folder / "inbox"
    inbox.mkdir(parents=True)
    results: dict[str, list[float]] = {"close": [], "rename": [], "link": []}
    with FixedLatencyServer(LATENCY_S) as srv:
        config = write_config(folder, base_url=srv.base_url, inbox=inbox, concurrency=None)
        from mmwatchd import config as config_mod

        settle = config_mod.load(config).settle_s  # the default: the config above does not set it
        err_path = folder / "run.log"
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(mmwatchd("run", "-c", str(config)), cwd=folder, env=_env(),
                                    stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)  # fmt: skip
            try:
                if not _wait_for_text(err_path, "daemon.scanned", 60, proc):
                    raise RuntimeError(f"mmwatchd run did not start: {err_path.read_text()[-500:]}")
                time.sleep(0.3)
                for how, latencies in results.items():
                    for i, src in enumerate(sources):
                        name = f"LAT_{how}_{i}.jpg"
                        if how == "close":
                            done = _write_slowly(src.read_bytes(), inbox / name)
                        elif how == "rename":  # a download or rsync: written under a temp name, renamed into place
                            _write_slowly(src.read_bytes(), inbox / f"{name}.part")
                            os.rename(inbox / f"{name}.part", inbox / name)
                            done = time.time()
                        elif how == "link":  # a hard link made elsewhere: no close-after-write event at all
                            (folder / name).write_bytes(src.read_bytes())
                            os.link(folder / name, inbox / name)
                            done = time.time()
                        hit = srv.wait_for(name, timeout=settle * 5 + 5)
                        if hit is None:
                            raise RuntimeError(f"latency: no request for {name} within {settle * 5 + 5:.0f} s")
                        latencies.append(hit.started - done)
                        time.sleep(0.3)
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    whats = {"close": "write+close", "rename": "write as .part, rename into place",
             "link": "hard link in (no close event: settle path)"}  # fmt: skip
    for key, how in (("4a", "close"), ("4b", "rename"), ("4c", "link")):
        lat = results[how]
        med = statistics.median(lat)
        what = whats[how]
        report.add(Row(key, f"`mmwatchd run`, {what} -> request at server (median of {len(lat)})", fmt_s(med),
                       f"{fmt_s(settle)} (settle_s)", med / settle, (settle + 0.2) / settle,
                       "<= settle + 0.2 s", miss=f"{med - settle - 0.2:+.2f} s over"))  # fmt: skip
    report.note(
        "4: latencies "
        + "; ".join(f"{how}: " + ", ".join(fmt_s(x) for x in lat) for how, lat in results.items())
        + f"; daemon exit code {proc.returncode} after SIGTERM"
    )


# ------------------------------------------------------------------------------------------------------ 5. rescan


_WALK = """
import os, sys
def walk(d):
    n = 0
    with os.scandir(d) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                n += walk(e.path)
            else:
                e.stat(follow_symlinks=False)
                n += 1
    return n
print(walk(sys.argv[1]))
"""


def _rescan_config(folder: Path, base_url: str, tree: Path) -> Path:
    return write_config(folder, base_url=base_url, inbox=tree, concurrency=8)


def _expected(config: Path) -> dict[str, Any]:
    """What an up-to-date sidecar for the rescan rule records, from mmwatchd itself."""
    from mmwatchd import __version__, config as config_mod, rules, sidecar

    cfg = config_mod.load(config)
    return {
        "fingerprint": rules.fingerprint(cfg.rules[0], cfg.endpoint, "image"),
        "version": __version__,
        "schema": sidecar.SCHEMA,
    }


def _clone_sidecars(template: dict[str, Any], media: list[Path], suffix: str = ".json") -> None:
    for path in media:
        st = path.stat()
        doc = json.loads(json.dumps(template))
        doc["source"].update(name=path.name, size=st.st_size, mtime_ns=st.st_mtime_ns)
        side = path.with_name(path.name + suffix)
        side.write_text(json.dumps(doc, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def rescan_tree(size: Size, work: Path, base_url: str) -> tuple[Path, str]:
    """The tree of tiny JPEGs with up-to-date sidecars (cached); and how its sidecars were made."""
    n, dirs = size.rescan_files, size.rescan_dirs
    base = inputs.CACHE / f"rescan-{n}x{dirs}"
    tree = base / "tree"
    folders = [tree / f"d{j:03d}" for j in range(dirs)]
    per = n // dirs
    media = [[f / f"IMG_{k:05d}.jpg" for k in range(per)] for f in folders]
    if not (base / "files.done").exists():
        progress(f"   writing {n} files in {dirs} folders")
        data = inputs.tiny().read_bytes()
        for folder, files in zip(folders, media, strict=True):
            folder.mkdir(parents=True, exist_ok=True)
            for path in files:
                path.write_bytes(data)
        (base / "files.done").write_text("")
    config = _rescan_config(work / "rescan-make", base_url, tree)
    expected = _expected(config)
    meta_path = base / "sidecars.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("expected") == expected:
        return tree, meta["how"]
    meta_path.unlink(missing_ok=True)
    progress("   describing the first folder with `mmwatchd scan` (concurrency 8, zero-latency server)")
    for side in tree.rglob("*.jpg.json"):
        side.unlink()
    first = write_config(work / "rescan-first", base_url=base_url, inbox=folders[0], concurrency=8)
    child = run_child(mmwatchd("scan", "-c", str(first)), cwd=first.parent, timeout=900)
    check_scan(child, "rescan: first folder")
    template = json.loads(media[0][0].with_name(media[0][0].name + ".json").read_text())
    if template.get("fingerprint") != expected["fingerprint"]:
        raise RuntimeError("rescan: the sidecar's fingerprint is not what mmwatchd.rules.fingerprint says")
    predicted = child.wall_s * dirs
    # A full run describes everything for real when that takes under 3 minutes; a quick run allows 30 s.
    if predicted < (30 if size is QUICK else 180):
        progress(f"   describing the rest with `mmwatchd scan` (predicted {predicted:.0f} s)")
        child = run_child(mmwatchd("scan", "-c", str(config)), cwd=config.parent, timeout=900)
        check_scan(child, "rescan: whole tree")
        how = f"all sidecars written by a real `mmwatchd scan` ({child.wall_s:.0f} s)"
    else:
        progress(f"   a real scan would take ~{predicted:.0f} s: copying the first folder's sidecars to the rest")
        for files in media[1:]:
            _clone_sidecars(template, files)
        how = (
            f"first folder ({per} files) described by a real `mmwatchd scan` in {child.wall_s:.0f} s "
            f"(~{predicted / 60:.0f} min predicted for all); the other {n - per} sidecars are copies of a real one "
            "with name, size and mtime_ns filled in"
        )
    meta_path.write_text(json.dumps({"expected": expected, "how": how}))
    return tree, how


def _warm(tree: Path) -> None:
    """Read every file once, so both walks below find the same warm page and inode caches."""
    for folder in tree.iterdir():
        with os.scandir(folder) as it:
            for entry in it:
                with open(entry.path, "rb") as fh:
                    fh.read()


def row_rescan(report: Report, size: Size, work: Path) -> None:
    n = size.rescan_files
    progress(f"5. rescan: {n} tiny JPEGs in {size.rescan_dirs} folders, all sidecars up to date")
    with FixedLatencyServer(0.0) as fast:
        tree, how = rescan_tree(size, work, fast.base_url)
    _warm(tree)
    walk = [sys.executable, "-c", _WALK, str(tree)]
    with FixedLatencyServer(LATENCY_S) as srv:
        config = _rescan_config(work / "rescan", srv.base_url, tree)
        # Most sidecars here were copied, not written by mmwatchd, so its done-index does not know them yet: one
        # scan reads them all and builds it (what happens once after the state directory is lost). The row
        # measures the rescan after that, as a running service does it.
        rebuild = run_child(mmwatchd("scan", "-c", str(config)), cwd=config.parent, timeout=1800)
        check_scan(rebuild, "rescan: index rebuild")
        reference = run_child(walk, cwd=work, timeout=600)
        child = run_child(mmwatchd("scan", "-c", str(config)), cwd=config.parent, timeout=900)
        reference2 = run_child(walk, cwd=work, timeout=600)
        requests = len(srv.hits)
    check_scan(child, "rescan")
    ref = min(reference.wall_s, reference2.wall_s)
    report.add(Row("5", f"rescan {n} files (+{n} sidecars), all up to date", fmt_s(child.wall_s),
                   f"{fmt_s(ref)} (scandir walk + stat of all {reference.stdout.strip()} files, Python subprocess)",
                   child.wall_s / ref, 3.0, "<= 3x"))  # fmt: skip
    report.note(
        f"5: index rebuilt from the sidecars in {fmt_s(rebuild.wall_s)} ({rebuild.wall_s / n * 1e6:.0f} us/file)"
    )
    report.note(f"5: {requests} requests during the rescan (expected 0); {scan_summary(child)}; "
                f"{child.wall_s / n * 1e6:.0f} us/file; peak RSS {fmt_mb(child.maxrss)}; {how}")  # fmt: skip
    if requests:
        report.note(f"5: WARNING: the rescan sent {requests} requests: sidecars were not taken as up to date")


# ------------------------------------------------------------------------------------------------------ 8. search


def row_search(report: Report, size: Size, work: Path) -> None:
    import search

    search.row(report, size.rescan_files, work, sys.modules[__name__])


# --------------------------------------------------------------------------------------------------------- 9. raw


def row_raw(report: Report, size: Size, work: Path) -> None:
    import raw

    raw.row(report, size is QUICK, work, sys.modules[__name__])


# ------------------------------------------------------------------------------------------- 6. memory, 7. wire


def row_mixed(report: Report, size: Size, work: Path, *, memory: bool, wire: bool) -> None:
    import video

    seconds = video.LONG_S // 2 if size is QUICK else video.LONG_S
    progress(f"6/7. mixed folder: a {seconds} s 1080p clip and {size.photos} photos, concurrency 4")
    clip = video.clip(seconds)
    photos = inputs.photos(size.photos)
    folder = work / "mixed"
    inbox = folder / "inbox"
    inputs.link_into([clip, *photos], inbox)
    video_rule = {"name": "clips", "match": {"kind": "video"}, "prompt": PHOTO_RULE["prompt"],
                  "video": {"frames": 16, "mode": "video_url"}}  # fmt: skip
    photo_rule = {**PHOTO_RULE, "image": {"max_side": IMAGE_SIDE}}
    with FixedLatencyServer(LATENCY_S) as srv:
        empty = folder / "empty"
        empty.mkdir(parents=True)
        idle_config = write_config(folder / "idle", base_url=srv.base_url, inbox=empty, concurrency=4)
        idle = run_child(mmwatchd("scan", "-c", str(idle_config)), cwd=idle_config.parent, timeout=120, tree=True)
        config = write_config(folder, base_url=srv.base_url, inbox=inbox, concurrency=4, rules=[video_rule, photo_rule])
        child = run_child(mmwatchd("scan", "-c", str(config)), cwd=folder, timeout=600, tree=True)
        hits = srv.hits
    check_scan(child, "mixed")
    if memory:
        peak, limit = child.tree["tree_pss"], 300 * 2**20
        report.add(Row("6a", f"peak memory (PSS), `mmwatchd scan`: {seconds} s 1080p clip + {size.photos} photos, conc. 4",
                       fmt_mb(peak), f"{fmt_mb(idle.tree['tree_pss'])} (same scan, empty folder)",
                       peak / idle.tree["tree_pss"], None, "<= 300 MiB", met=peak <= limit,
                       miss=f"{fmt_mb(peak - limit)} over"))  # fmt: skip
        rss = child.tree["tree_rss"]
        report.add(Row("6b", "same, summed RSS (shared pages counted in every process)", fmt_mb(rss),
                       f"{fmt_mb(idle.tree['tree_rss'])} (same scan, empty folder)", rss / idle.tree["tree_rss"],
                       None, "<= 300 MiB", met=rss <= limit, miss=f"{fmt_mb(rss - limit)} over"))  # fmt: skip
        report.note(
            f"6: {scan_summary(child)} in {fmt_s(child.wall_s)}; memory is the peak of the summed PSS of mmwatchd and "
            f"its decoder processes ({child.tree['tree_processes']} at most), sampled every 50 ms; summed RSS peak "
            f"{fmt_mb(child.tree['tree_rss'])}, sum of per-process peaks (VmHWM) {fmt_mb(child.tree['tree_hwm_sum'])}, "
            f"largest single process (ru_maxrss) {fmt_mb(child.maxrss)}; at the RSS peak: "
            + ", ".join(f"{name} {fmt_mb(rss)}" for name, rss in child.tree["tree_at_peak"])
        )
    if wire:

        def b64(p: Path) -> int:
            return 4 * -(-p.stat().st_size // 3)

        photo_names = {p.name for p in photos}
        sent_photos = sum(h.body_bytes for h in hits if h.name in photo_names)
        sent_clip = sum(h.body_bytes for h in hits if h.name == clip.name)
        orig_photos = sum(b64(p) for p in photos)
        report.add(Row("7a", f"bytes on the wire, {len(photos)} photos (max_side {IMAGE_SIDE})",
                       f"{sent_photos / 1e6:.1f} MB", f"{orig_photos / 1e6:.1f} MB (base64 of the files)",
                       sent_photos / orig_photos))  # fmt: skip
        report.add(Row("7b", f"bytes on the wire, {seconds} s clip (16 frames, 768 px)", f"{sent_clip / 1e6:.2f} MB",
                       f"{b64(clip) / 1e6:.1f} MB (base64 of the file)", sent_clip / b64(clip)))  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- main


def _selected(only: list[str] | None) -> list[str]:
    if not only:
        return list(ROWS)
    chosen = []
    for item in only:
        for given in item.split(","):
            word = given.strip().lower()
            name = ROWS[int(word) - 1] if word.isdigit() and 1 <= int(word) <= len(ROWS) else word
            if name not in ROWS:
                raise SystemExit(f"--only: unknown row {word!r}; rows: {', '.join(ROWS)} (or 1-{len(ROWS)})")
            chosen.append(name)
    return [r for r in ROWS if r in chosen]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="same rows on smaller inputs (under 2 minutes)")
    parser.add_argument("--only", action="append", metavar="ROW", help=f"{', '.join(ROWS)} or 1-{len(ROWS)}")
    parser.add_argument("--markdown", action="store_true", help="print the table in Markdown too")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder (configs, sidecars)")
    args = parser.parse_args(argv)
    rows = _selected(args.only)
    size = QUICK if args.quick else FULL
    report = Report()
    work = Path(tempfile.mkdtemp(prefix="mmwatchd-bench-run-"))
    began = time.perf_counter()
    progress(f"mmwatchd benchmark ({'quick' if args.quick else 'full'}), {os.cpu_count()} CPUs, cache {inputs.CACHE}")
    try:
        for name in rows:
            if name in ("memory", "wire"):
                if name == "memory" or "memory" not in rows:
                    row_mixed(report, size, work, memory="memory" in rows, wire="wire" in rows)
                continue
            globals()[f"row_{name}"](report, size, work)
    finally:
        if args.keep:
            progress(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - began
    print()
    print(render(report, markdown=False))
    print()
    for note in report.notes:
        print(f"- {note}")
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"- total {total:.0f} s ({'quick' if args.quick else 'full'} run, {os.cpu_count()} CPUs); load average at the "
        f"end {load} (other work on the machine inflates the 2-thread figures of row 1 most)"
    )
    if args.markdown:
        print()
        print(render(report, markdown=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
