"""Videos (and animated GIF/WebP) → a few sampled frames → data-URL parts that fit a byte budget: the wire modes
(one ``video_url`` holding every frame, one ``image_url`` per frame, or the file itself) and the frames' budget.

For one file, in this order:

1. open: sniff, check the limits and read the container's facts (:mod:`mmwatchd.encode.container`);
2. sample: the frames to send, each converted once to its final size and turned upright
   (:mod:`mmwatchd.encode.sampling`);
3. the budget: JPEG quality first, then smaller frames (:func:`mmwatchd.encode.budget.fit`, tuned by
   :data:`~mmwatchd.encode.budget.FRAMES`), then fewer frames (:func:`_fit`).

Everything here is a pure function of the file and the arguments, safe to call from several threads at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from PIL import Image

from mmwatchd.encode.budget import FRAMES, Budget, FrameRoom, Step, fit
from mmwatchd.encode.container import Source, open_video, probe_video
from mmwatchd.encode.image import save_image
from mmwatchd.encode.sampling import (
    check_first_frame,
    sample_av,
    sample_webp,
    spread,
    target_size,
)
from mmwatchd.errors import BudgetExceeded
from mmwatchd.model import (
    EncodedVideo,
    Limits,
    Part,
    SampledFrame,
    VideoSpec,
    data_url_len,
)

__all__ = ["FILE_MIME", "FLOOR_SIDE", "encode_video", "probe_video", "target_size"]

#: MIME types for ``mode: file``: containers every video-capable server decodes. Others fall back to frames.
FILE_MIME: Final[dict[str, str]] = {
    "mp4": "video/mp4",
    "mov": "video/quicktime",
    "webm": "video/webm",
    "mkv": "video/x-matroska",
    "avi": "video/x-msvideo",
}
#: Smallest short side (px) the budget search shrinks frames to, before it drops frames instead.
FLOOR_SIDE: Final = 64
_RESAMPLE: Final = Image.Resampling.LANCZOS


@dataclass(slots=True)
class _Fitted:
    indices: list[int]  # which samples are sent
    chunks: list[bytes]
    quality: int | None
    size: tuple[int, int]
    notes: list[str]


def _fit(images: list[Image.Image], spec: VideoSpec, wire: FrameRoom, name: str) -> _Fitted:
    """Encode ``images`` so that their data URLs fit, giving up, in this order and only as far as needed:

    1. quality (JPEG; PNG has none), toward ``spec.min_quality``;
    2. frame size, all frames alike, sides kept multiples of ``spec.align``, down to :data:`FLOOR_SIDE` px on the
       short side (at least ``2 * align``);
    3. frame count at the floor size: the largest count that fits, first and last frame kept, the middle thinned
       evenly (an even count for a ``video_url`` to a frame-pairing model, ``align > 1``, unless only one fits).
       The sizes measured at the floor are exact, so this step encodes nothing.

    Steps 1 and 2 are :func:`mmwatchd.encode.budget.fit`. Raises :class:`BudgetExceeded` when one frame at the floor
    size and minimum quality does not fit.
    """
    fmt = spec.frame_format
    n = len(images)
    width, height = images[0].size
    room = wire.room(n)
    if room <= 0:
        raise _budget_exceeded(name, wire, fmt, None, None, None)
    align = spec.align
    short = min(width, height)
    floor_short = min(short, max(2 * align, FLOOR_SIDE // align * align))

    def dims(scale: float) -> tuple[int, int]:
        return (max(align, math.floor(width * scale + 1e-6) // align * align),
                max(align, math.floor(height * scale + 1e-6) // align * align))  # fmt: skip

    # Every frame set measured, by quality and size; once frames are made smaller, the full-size sets at other
    # qualities are dropped (they are not tried again).
    measured: dict[tuple[int | None, tuple[int, int]], tuple[int, list[bytes]]] = {}

    def measure(quality: int | None, scale: float) -> tuple[int, list[bytes]]:
        size = dims(scale)
        if (quality, size) not in measured:
            frames = images
            if size != (width, height):
                for key in [key for key in measured if key[0] != quality]:
                    del measured[key]
                frames = [img.resize(size, _RESAMPLE, reducing_gap=3.0) for img in images]
            chunks = [save_image(img, fmt, quality) for img in frames]
            measured[(quality, size)] = FrameRoom.chars([len(c) for c in chunks]), chunks
        return measured[(quality, size)]

    result = fit(measure, room, quality=spec.quality if fmt == "jpeg" else None,
                 min_quality=min(spec.min_quality, spec.quality), min_scale=floor_short / short, dims=dims,
                 tuning=FRAMES)  # fmt: skip
    notes = [_note(step, width, height, dims) for step in result.steps]
    size, quality = dims(result.scale), result.quality
    chunks = result.payload
    if result.fits:
        return _Fitted(list(range(n)), chunks, quality, size, notes)

    # 3. frame count
    sizes = [len(c) for c in chunks]
    even = spec.align > 1 and wire.mode == "video_url"
    for k in range(n - 1, 0, -1):
        if even and k % 2 and k != 1:
            continue
        chosen = spread(n, k)
        if wire.chars([sizes[i] for i in chosen]) <= wire.room(k):
            notes.append(_note(Step("count", n, k), width, height, dims))
            return _Fitted(chosen, [chunks[i] for i in chosen], quality, size, notes)
    raise _budget_exceeded(name, wire, fmt, size, quality, sizes[0])


def _note(step: Step, width: int, height: int, dims: Callable[[float], tuple[int, int]]) -> str:
    """A step given up, as the clip's degradations list it."""
    if step.what == "quality":
        return f"quality {int(step.before)} -> {int(step.after)}"
    if step.what == "scale":
        return f"frame size {max(width, height)} -> {max(dims(step.after))} px"
    return f"frames {int(step.before)} -> {int(step.after)}"


def _budget_exceeded(name: str, wire: FrameRoom, fmt: str, size: tuple[int, int] | None, quality: int | None,
                     smallest: int | None) -> BudgetExceeded:  # fmt: skip
    available = wire.budget(1)
    if size is None or smallest is None:
        need = f"{available} characters leave no room for frame data after the data-URL prefix"
    else:
        q = f" quality {quality}" if quality is not None else ""
        url = data_url_len(wire.mime, smallest)
        frame = f"{size[0]}x{size[1]} {fmt.upper()} frame{q}"
        need = f"even one {frame} needs a {url}-character data URL, over the {available} available"
    return BudgetExceeded(
        f"{name}: cannot fit the byte budget: {need}; raise endpoint.max_request_bytes, use fewer reference images "
        "or a shorter prompt"
    )


def _file_part(source: Source, budget: Budget) -> Part | None:
    """The original file as one ``video_url`` part, when its container is one servers decode and it fits."""
    mime = FILE_MIME.get(source.facts.container)
    if mime is None or data_url_len(mime, source.size) > budget(1):
        return None
    with open(source.path, "rb") as fp:
        data = fp.read(source.size + 1)
    if len(data) != source.size:  # changed while we read it: sample frames from what is there instead
        return None
    facts = source.facts
    return Part(type="video_url", mime=mime, chunks=(data,), width=facts.width, height=facts.height, origin="original")


def encode_video(path: Path, spec: VideoSpec, *, budget: Budget, limits: Limits) -> EncodedVideo:
    """Sample ``path`` and encode it for ``spec.mode`` so that ``sum(part.url_len) <= budget(len(parts))``.

    ``budget(n)`` is the number of data-URL characters available when the clip is sent as ``n`` parts (one for
    ``video_url`` and ``file``, one per frame for ``images``; more parts cost more JSON, so it decreases in ``n``).

    - ``video_url``: one part whose URL holds every frame (``data:video/jpeg;base64,<f1>,<f2>,...``), all one size;
    - ``images``: one ``image_url`` part per frame, in order;
    - ``file``: the original bytes (MP4, MOV, WebM, MKV, AVI) when they fit ``budget(1)``; otherwise frames as for
      ``video_url``, with a degradation saying so.

    What had to give to fit is listed in ``degradations``, in order (see :func:`_fit`); a file that ends early or
    stops decoding is sent with the frames before that point and a degradation naming where it stopped.

    Raises :class:`UnsupportedMedia`, :class:`DecodeError`, :class:`MediaTooLarge` or :class:`BudgetExceeded`;
    ``OSError`` for I/O failures.
    """
    notes: list[str] = []
    mode: Literal["video_url", "images"] = "images" if spec.mode == "images" else "video_url"
    with open_video(path, limits) as source:
        if spec.mode == "file":
            if source.facts.container not in FILE_MIME:
                notes.append(f"file mode takes MP4, MOV, WebM, MKV or AVI, not {source.facts.container}: "
                             "sent as video_url frames")  # fmt: skip
            elif (part := _file_part(source, budget)) is not None:
                if source.container is not None:
                    check_first_frame(source, limits)
                return EncodedVideo(parts=(part,), frames=(), mode="file", facts=source.facts)
            else:
                notes.append(f"file too large for the budget ({source.size} bytes): sent as video_url frames")
        wire = FrameRoom(mode, spec.frame_format, budget)
        if wire.room(1) <= 0:  # before decoding anything
            raise _budget_exceeded(source.name, wire, spec.frame_format, None, None, None)
        if source.container is None:
            samples, facts = sample_webp(source, spec), source.facts
        else:
            samples, facts, decode_notes = sample_av(source, spec, limits)
            notes.extend(decode_notes)
    fitted = _fit([s.image for s in samples], spec, wire, source.name)
    notes.extend(fitted.notes)
    width, height = fitted.size
    frames = tuple(
        SampledFrame(t=round(samples[i].t, 3), width=width, height=height, bytes=len(chunk))
        for i, chunk in zip(fitted.indices, fitted.chunks, strict=True)
    )
    if mode == "video_url":
        parts: tuple[Part, ...] = (
            Part(type="video_url", mime=wire.mime, chunks=tuple(fitted.chunks), width=width, height=height,
                 quality=fitted.quality),
        )  # fmt: skip
    else:
        parts = tuple(
            Part(type="image_url", mime=wire.mime, chunks=(chunk,), width=width, height=height, quality=fitted.quality)
            for chunk in fitted.chunks
        )
    used = sum(part.url_len for part in parts)
    if used > budget(len(parts)):  # cannot happen by construction; never hand an oversize request on
        raise BudgetExceeded(f"{source.name}: encoded frames exceed the budget of {budget(len(parts))} characters")
    return EncodedVideo(parts=parts, frames=frames, mode=mode, facts=facts, degradations=tuple(notes))
