"""Fingerprint of everything mmwatchd would send for a folder of media, to show that a refactor changed nothing.

    python bench/outputs.py [--media DIR] --save before.json      # on the old code
    python bench/outputs.py [--media DIR] --against before.json   # on the new code: lists every difference

Two parts, both deterministic (no server, no clock in the output):

- ``once --dry-run`` over every file in ``DIR`` (default ``../shared/media`` next to the checkout), as the CLI runs
  it (decoder processes included), under a few configs: the defaults, and tight ``max_request_bytes`` that force
  the budget search through quality, size and frame count (JPEG, WebP and PNG images; ``images``, ``video_url``
  with ``align: 28``, and ``file`` videos). The printed JSON is kept whole, and each plan gets the sha256 of the
  complete request body, data URLs included (the dry-run output shows only their sizes);
- the encoders in-process over the same files at a ladder of budgets, per format and video mode: each result's
  payload hashes, quality, size and degradations, or the error's type and message.

Exit status: 0 when ``--against`` finds no difference, 1 when it does.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

IMAGE_BUDGETS = (2_000, 6_000, 20_000, 60_000, 200_000, 2_000_000)
VIDEO_BUDGETS = (3_000, 12_000, 40_000, 150_000, 600_000, 4_000_000)

#: Dry-run configs: name -> (max_request_bytes, image rule settings, video rule settings).
DRY_RUNS: dict[str, tuple[int | None, dict[str, Any], dict[str, Any]]] = {
    "defaults": (None, {}, {"mode": "images"}),
    "tight-jpeg": (60_000, {"passthrough": False}, {"mode": "images", "frames": 12}),
    "tight-webp": (25_000, {"format": "webp", "quality": 90, "min_quality": 60}, {"mode": "video_url", "align": 28}),
    "tight-png": (
        40_000,
        {"format": "png", "max_side": 800},
        {"mode": "video_url", "frame_format": "png", "frames": 8},
    ),
    "file": (300_000, {"max_side": 512}, {"mode": "file", "frames": 6}),
}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def media_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".md")


@contextlib.contextmanager
def _body_hashes() -> Iterator[None]:
    """Make the dry-run plan carry the sha256 of the whole request body (data URLs included)."""
    from mmwatchd import pipeline
    from mmwatchd.wire import build_body

    shape = pipeline._body_shape

    def with_hash(request: Any) -> dict[str, Any]:
        body = shape(request)
        full = json.dumps(build_body(request), sort_keys=True).encode()
        return {**body, "body_sha256": _sha(full), "body_len": len(full)}

    pipeline._body_shape = with_hash
    try:
        yield
    finally:
        pipeline._body_shape = shape


def dry_runs(files: list[Path]) -> dict[str, Any]:
    from mmwatchd import cli

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, _body_hashes():
        for name, (max_bytes, image, video) in DRY_RUNS.items():
            folder = Path(tmp) / name
            folder.mkdir()
            endpoint: dict[str, Any] = {"base_url": "http://127.0.0.1:9/v1", "model": "compare-vlm"}
            if max_bytes is not None:
                endpoint["max_request_bytes"] = max_bytes
            doc = {
                "endpoint": endpoint,
                "watch": [{"path": str(files[0].parent)}],
                "state_dir": str(folder / "state"),
                "rules": [
                    {"name": "photos", "match": {"kind": "image"}, "prompt": "Describe {name} ({width}x{height}).",
                     "image": image},
                    {"name": "clips", "match": {"kind": "video"}, "prompt": "Describe {name} ({duration_s} s).",
                     "video": video},
                ],
            }  # fmt: skip
            config = folder / "config.yaml"
            config.write_text(yaml.safe_dump(doc, sort_keys=False))
            stdout, stderr = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                rc = cli.main(["once", "-c", str(config), "--dry-run", *map(str, files)])
            printed = json.loads(stdout.getvalue())
            for plan in printed["files"]:
                out[f"dry-run {name} {Path(plan['path']).name}"] = plan
            out[f"dry-run {name} exit"] = rc
    return out


def _attempt(call: Callable[[], Any], describe: Callable[[Any], Any]) -> Any:
    try:
        return describe(call())
    except Exception as exc:  # noqa: BLE001 - every outcome is recorded, errors included
        return {"error": type(exc).__name__, "message": str(exc)}


def _part(part: Any) -> dict[str, Any]:
    return {"type": part.type, "mime": part.mime, "chunks": [_sha(c) for c in part.chunks], "width": part.width,
            "height": part.height, "quality": part.quality, "origin": part.origin}  # fmt: skip


def sweep(files: list[Path]) -> dict[str, Any]:
    from mmwatchd.encode import encode_image, encode_video
    from mmwatchd.media import sniff
    from mmwatchd.model import ImageSpec, Limits, VideoSpec

    limits = Limits()
    out: dict[str, Any] = {}
    image_specs = {
        "jpeg": ImageSpec(passthrough=False),
        "webp": ImageSpec(format="webp", passthrough=False, quality=90, min_quality=70),
        "png": ImageSpec(format="png", passthrough=False, max_side=600),
        "jpeg-q": ImageSpec(passthrough=False, quality=60, min_quality=59),
    }
    video_specs = {
        "images": VideoSpec(mode="images", frames=8),
        "video_url-28": VideoSpec(mode="video_url", frames=9, align=28, max_side=448),
        "png": VideoSpec(mode="video_url", frame_format="png", frames=6, max_side=320),
        "keyframes": VideoSpec(mode="images", frames=6, keyframes_only=True, quality=70, min_quality=69),
    }
    for path in files:
        kind = _attempt(lambda path=path: sniff(path).kind, lambda k: k)
        if kind == "image":
            for spec_name, spec in image_specs.items():
                for budget in IMAGE_BUDGETS:
                    out[f"image {path.name} {spec_name} {budget}"] = _attempt(
                        lambda spec=spec, budget=budget, path=path: encode_image(path, spec, budget=budget,
                                                                                 limits=limits),
                        _part,
                    )  # fmt: skip
        if kind == "video" or path.suffix.lower() in (".gif", ".webp", ".avifs"):
            for spec_name, vspec in video_specs.items():
                for budget in VIDEO_BUDGETS:
                    out[f"video {path.name} {spec_name} {budget}"] = _attempt(
                        lambda vspec=vspec, budget=budget, path=path: encode_video(
                            path, vspec, budget=lambda n, b=budget: b - 60 * n, limits=limits),
                        lambda v: {"parts": [_part(p) for p in v.parts], "degradations": list(v.degradations),
                                   "frames": [(f.t, f.width, f.height, f.bytes) for f in v.frames], "mode": v.mode},
                    )  # fmt: skip
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--media", type=Path, default=ROOT.parent / "shared" / "media")
    parser.add_argument("--save", type=Path, help="write the fingerprint here")
    parser.add_argument("--against", type=Path, help="compare with a saved fingerprint")
    parser.add_argument("--skip-dry-run", action="store_true")
    args = parser.parse_args()
    files = media_files(args.media)
    now = sweep(files)
    if not args.skip_dry_run:
        now.update(dry_runs(files))
    if args.save:
        args.save.write_text(json.dumps(now, indent=1, sort_keys=True))
    print(f"{len(now)} outputs from {len(files)} files", file=sys.stderr)
    if args.against:
        before = json.loads(args.against.read_text())
        now = json.loads(json.dumps(now))  # tuples as lists, as they were saved
        keys = sorted(set(before) | set(now))
        differ = [k for k in keys if before.get(k) != now.get(k)]
        for key in differ:
            print(f"DIFFERS: {key}\n  before: {before.get(key)}\n  now:    {now.get(key)}")
        print(f"{len(keys)} outputs compared, {len(differ)} differ")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
