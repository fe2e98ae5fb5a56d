"""Videos (and animated GIF/WebP) → a few sampled frames → data-URL parts that fit a byte budget (PyAV).

For one file, in this order:

1. open: the bytes are sniffed (never the name); size and pixel limits are checked from the container header;
2. timeline: start, duration and frame rate from the container (see :func:`_timeline` for the fallbacks when the
   duration is missing);
3. sampling: target times spread evenly from the first frame to the last (both included), or every ``1/spec.fps``
   seconds; each target is reached by decoding forward, or by a seek to the keyframe before it when that keyframe
   lies ahead of the decoder (:class:`_Cursor`); interior targets move to a keyframe that is close enough
   (:func:`_sample_frames`), so 16 frames of a two-hour film cost about 16 keyframe decodes;
4. every sampled frame is converted once, in swscale, straight from YUV to RGB at its final size (display aspect
   ratio from the sample aspect ratio, ``spec.max_side``/``spec.max_pixels``, sides in multiples of ``spec.align``),
   then turned upright (the display matrix); only these small RGB frames are kept, never a full-size one;
5. the budget: JPEG quality first, then smaller frames, then fewer frames (:func:`_fit`).

Animated WebP goes through Pillow (FFmpeg's WebP decoder reads still images only); GIF goes through PyAV. Everything
here is a pure function of the file and the arguments, safe to call from several threads at once.
"""

from __future__ import annotations

import math
import os
import struct
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, Final, Literal

import av
import av.error
import av.logging
from av.container import InputContainer
from av.stream import Disposition
from av.video.frame import VideoFrame
from av.video.stream import VideoStream
from PIL import Image

from mmwatchd.encode.budget import QUALITY_SLOPE, SCALE_EXPONENT, Budget, FrameRoom, search
from mmwatchd.encode.image import fit_size, save_image, translate_pillow
from mmwatchd.errors import BudgetExceeded, DecodeError, MediaTooLarge, UnsupportedMedia
from mmwatchd.isobmff import HEADER_MAX, read_header
from mmwatchd.media import Sniffed, read_head
from mmwatchd.model import (
    EncodedVideo,
    ImageSpec,
    Limits,
    Part,
    SampledFrame,
    VideoFacts,
    VideoSpec,
    data_url_len,
)

__all__ = ["FILE_MIME", "FLOOR_SIDE", "encode_video", "probe_video", "target_size"]


#: MIME types for ``mode: file``: containers every video-capable server decodes. Others fall back to frames.
# FFmpeg's own messages (damaged packets, odd timestamps) must not reach stderr, where they would break the JSON log
# lines: what matters reaches the caller as an exception or a recorded degradation instead. None turns the
# forwarding off entirely (a level would route them through Python logging's last-resort stderr handler).
av.logging.set_level(None)

FILE_MIME: Final[dict[str, str]] = {
    "mp4": "video/mp4",
    "mov": "video/quicktime",
    "webm": "video/webm",
    "mkv": "video/x-matroska",
    "avi": "video/x-msvideo",
}
#: Smallest short side (px) the budget search shrinks frames to, before it drops frames instead.
FLOOR_SIDE: Final = 64
#: Colour that transparent GIF/WebP areas are flattened onto (the image encoder's default background).
BACKGROUND: Final = (255, 255, 255)

# FFmpeg demuxer names (first of the comma-separated list) → the names VideoFacts uses, for files the sniffer
# does not know (elementary streams and the like).
_AV_CONTAINERS: Final = {"matroska": "mkv", "mpegts": "mpegts", "mpeg": "mpeg", "asf": "asf", "flv": "flv",
                         "gif": "gif", "avi": "avi", "mov": "mp4", "webp_pipe": "webp"}  # fmt: skip
# Sniffer verdicts on unknown files that FFmpeg may still read (raw H.264/HEVC streams, odd ISO brands, Ogg/Theora,
# RIFF variants); anything else the sniffer recognised (text, PDF, archives, MP3, ...) is refused without FFmpeg.
_MAYBE_VIDEO: Final = ("unrecognised binary data", "looks like an ISO media file", "looks like an Ogg file",
                       "looks like a RIFF file")  # fmt: skip
# A sample aspect ratio outside this range is treated as square: it is a broken header, not a real pixel shape.
_SAR_RANGE: Final = (Fraction(1, 8), Fraction(8))
# swscale's area averaging: every source pixel counts (no aliasing on fine detail), and it measured fastest for
# large downscales (1080p → 768 px: 3.1 ms; bilinear 4.1, bicubic 5.6, lanczos 6.9).
_INTERPOLATION: Final = "AREA"
_RESAMPLE: Final = Image.Resampling.LANCZOS
# Containers whose demuxer reads a complete index from the file (every sample for MP4/MOV, cues for Matroska/WebM,
# idx1 for AVI). Others (MPEG-TS/PS, FLV, raw streams) grow a partial index as they read, also while seeking (a
# binary search over the file), which says nothing reliable about where keyframes are.
_INDEXED: Final = frozenset({"mp4", "mov", "mkv", "webm", "avi"})
# Without an index, seek only when the target is further ahead than this (seconds) or 1.5 observed keyframe
# intervals, whichever is larger: nearer targets are cheaper to reach by decoding forward. Such seeks land near a
# timestamp, not on a keyframe: aim this far (or one observed keyframe interval, if longer) before the target, so
# that the first keyframe after the landing point comes before the target.
_MIN_SEEK_GAP_S: Final = 2.0
_UNINDEXED_LEAD_S: Final = 1.0
# After a seek, frames before the first keyframe are dropped (a demuxer without an index, MPEG-TS, may land between
# keyframes, and decoders then show garbage); give up waiting for one after this many frames.
_MAX_FRAMES_TO_KEY: Final = 300
# Frame rate assumed for timestamp-less elementary streams when FFmpeg cannot guess one (its own default).
_DEFAULT_FPS: Final = 25.0

# Budget search tuning: the image encoder's model of how size follows quality and scale (budget.py), a little more
# margin (a clip is many frames, so one wrong guess costs more encodes), and fewer tries.
_AIM: Final = 0.95
_MAX_QUALITY_ENCODES: Final = 4
_MAX_SCALE_ENCODES: Final = 5


# ---------------------------------------------------------------------------------------------------------------- open


def _reason(exc: av.error.FFmpegError) -> str:
    return (exc.strerror or str(exc)).rstrip(".")


@contextmanager
def _translate(name: str, what: str) -> Iterator[None]:
    """The one place where PyAV exceptions become :class:`MediaError` subclasses (``what``: "cannot read the MP4")."""
    try:
        yield
    except av.error.FFmpegError as exc:
        raise DecodeError(f"{name}: {what}: {_reason(exc)}") from exc
    except UnicodeDecodeError as exc:  # container metadata PyAV could not decode
        raise DecodeError(f"{name}: {what}: undecodable metadata ({exc.reason})") from exc


@dataclass(slots=True)
class _Source:
    """An opened file: PyAV's container and stream, or (animated WebP) the frame durations for Pillow."""

    path: Path
    name: str
    size: int
    sniffed: Sniffed
    facts: VideoFacts
    container: InputContainer | None = None
    stream: VideoStream | None = None
    #: Animated WebP: each frame's display time in milliseconds (None for a still WebP).
    webp_durations: list[int] | None = field(default=None)


def _label(container: str) -> str:
    names = {"mkv": "Matroska", "mpegts": "MPEG-TS", "webm": "WebM", "mov": "QuickTime"}
    return names.get(container, container.upper())


def _rate(stream: VideoStream, *, timed: bool) -> float | None:
    """Frames per second: the measured average, except for streams without container timing (``timed=False``: raw
    elementary streams), where the average is FFmpeg's placeholder (25) and the guess reads the bitstream."""
    rates = (stream.average_rate, stream.guessed_rate) if timed else (stream.guessed_rate, stream.average_rate)
    for rate in rates:
        if rate and rate > 0:
            return float(rate)
    return None


def _sar(stream: VideoStream) -> Fraction:
    """The sample aspect ratio FFmpeg would display with: the container's, else the codec's, else square."""
    for sar in (stream.sample_aspect_ratio, stream.codec_context.sample_aspect_ratio):
        if sar is not None and sar > 0:
            sar = Fraction(sar)
            return sar if _SAR_RANGE[0] <= sar <= _SAR_RANGE[1] else Fraction(1)
    return Fraction(1)


def _displayed(width: int, height: int, sar: Fraction, rotation: int) -> tuple[int, int]:
    """Size as shown: non-square pixels stretch the width (as players do), then 90/270° rotations swap the axes."""
    width = max(1, round(width * sar))
    return (height, width) if rotation in (90, 270) else (width, height)


def _clockwise(ccw: float) -> int:
    """FFmpeg's display-matrix angle (counter-clockwise degrees) → clockwise 0/90/180/270 (nearest quarter turn)."""
    return (-round(ccw / 90) * 90) % 360


def _boxes(fp: BinaryIO, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """ISO-BMFF boxes between ``start`` and ``end``: (type, payload offset, box end); stops at anything malformed."""
    pos = start
    while pos + 8 <= end:
        fp.seek(pos)
        box = read_header(fp.read(HEADER_MAX), pos)
        if box is None:
            return
        size = end - pos if box.size is None else box.size
        if size < box.payload - pos or pos + size > end:
            return
        yield box.kind, box.payload, pos + size
        pos += size


def _iso_rotation(fp: BinaryIO, file_size: int, track_id: int) -> int:
    """Clockwise rotation from the ``tkhd`` matrix of track ``track_id`` in an MP4/MOV (0 when absent).

    PyAV exposes the display matrix on decoded frames only (``frame.rotation``); this reads it from the header,
    the way FFmpeg's mov demuxer does, so :func:`probe_video` needs no decode. Only the box headers on the way are
    read (a few hundred bytes), wherever the ``moov`` box is.
    """
    for kind, start, end in _boxes(fp, 0, file_size):
        if kind != b"moov":
            continue
        for trak, t_start, t_end in _boxes(fp, start, end):
            if trak != b"trak":
                continue
            for tkhd, h_start, h_end in _boxes(fp, t_start, t_end):
                if tkhd != b"tkhd":
                    continue
                fp.seek(h_start)
                data = fp.read(min(h_end - h_start, 96))
                long = data[:1] == b"\x01"
                id_at, matrix_at = (20, 52) if long else (12, 40)
                if len(data) < matrix_at + 36 or struct.unpack_from(">I", data, id_at)[0] != track_id:
                    break
                a, b = struct.unpack_from(">ii", data, matrix_at)  # 16.16 fixed point, row-major a b u / c d v
                if a == 0 and b == 0:
                    return 0
                # av_display_rotation_get(): the counter-clockwise angle is -atan2(b, a).
                return _clockwise(-math.degrees(math.atan2(b, a)))
        return 0
    return 0


def _webp_durations(fp: BinaryIO) -> list[int] | None:
    """Per-frame durations (ms) of an animated WebP from its ANMF chunk headers, no decode; None when not animated."""
    fp.seek(12)
    durations: list[int] = []
    while True:
        header = fp.read(8)
        if len(header) < 8:
            break
        kind, size = struct.unpack("<4sI", header)
        if kind == b"ANMF":
            frame = fp.read(16)
            if len(frame) < 16:
                break
            durations.append(int.from_bytes(frame[12:15], "little"))
            fp.seek(size + (size & 1) - 16, os.SEEK_CUR)
        else:
            fp.seek(size + (size & 1), os.SEEK_CUR)
    return durations or None


def _duration_tag(stream: VideoStream) -> float | None:
    """Matroska's per-stream DURATION tag ("00:00:03.333000000"), which mkvmerge and FFmpeg write."""
    value = stream.metadata.get("DURATION") or stream.metadata.get("duration")
    if not value:
        return None
    try:
        hours, minutes, seconds = value.split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        return None


def _stream_facts(source_container: str, container: InputContainer, stream: VideoStream, rotation: int) -> VideoFacts:
    ctx = stream.codec_context
    tb = stream.time_base
    duration = None
    if stream.duration and tb:
        duration = float(stream.duration * tb)
    elif (tag := _duration_tag(stream)) is not None:
        duration = tag
    elif container.duration and container.duration > 0:
        duration = container.duration / av.time_base
    fps = _rate(stream, timed=duration is not None)
    if duration is None and stream.frames and fps:
        duration = stream.frames / fps
    width, height = _displayed(ctx.width, ctx.height, _sar(stream), rotation)
    codec = ctx.codec.canonical_name if ctx.codec is not None else "unknown"
    return VideoFacts(
        container=source_container,
        codec=codec,
        width=width,
        height=height,
        rotation=rotation,
        duration_s=round(duration, 3) if duration is not None else None,
        fps=round(fps, 3) if fps is not None else None,
        frame_count=stream.frames or None,
    )


def _no_video(name: str, container: InputContainer) -> UnsupportedMedia:
    audio = [s.codec_context.name for s in container.streams.audio if s.codec_context is not None]
    if audio:
        return UnsupportedMedia(f"{name}: no video stream: looks like an audio file ({', '.join(audio)})")
    kinds = sorted({s.type for s in container.streams})
    held = f"only {', '.join(kinds)} streams" if kinds else "no streams at all"
    return UnsupportedMedia(f"{name}: no video stream: the container holds {held}")


def _container_name(sniffed: Sniffed, container: InputContainer, path: Path) -> str:
    if sniffed.kind is not None and sniffed.format:
        return sniffed.format
    first = container.format.name.split(",")[0]
    if first == "mov" and path.suffix.lower() == ".mov":
        return "mov"
    return _AV_CONTAINERS.get(first, first)


def _check_pixels(name: str, width: int, height: int, limits: Limits) -> None:
    if width * height > limits.max_pixels:
        raise MediaTooLarge(
            f"{name}: {width}x{height} = {width * height} pixels per frame exceeds limits.max_pixels "
            f"({limits.max_pixels})"
        )


@contextmanager
def _open(path: Path, limits: Limits) -> Iterator[_Source]:
    """Sniff, open and check ``path``; ``OSError`` for I/O failures (file vanished, unreadable)."""
    name = path.name
    with open(path, "rb") as fp:
        size, sniffed = read_head(fp, name, limits)
        if sniffed.kind is None and not sniffed.why.startswith(_MAYBE_VIDEO):
            raise UnsupportedMedia(f"{name}: empty file" if size == 0 else f"{name}: not a video: {sniffed.why}")
        if sniffed.kind == "image" and sniffed.format not in ("gif", "webp"):
            raise UnsupportedMedia(f"{name}: not a video: it is a still image ({sniffed.format.upper()})")
        if sniffed.format == "webp":
            yield _open_webp(path, fp, size, sniffed, limits)
            return
        rotation_fp = fp if sniffed.format in ("mp4", "mov") else None
        label = _label(sniffed.format) if sniffed.kind else "file"
        try:
            container = av.open(str(path), "r", metadata_errors="replace")
        except av.error.FFmpegError as exc:
            if sniffed.kind is None:
                raise UnsupportedMedia(f"{name}: not a video: {sniffed.why}") from exc
            raise DecodeError(
                f"{name}: cannot read the {label} container ({_reason(exc)}); if the file is still being copied, "
                "it will be retried when complete"
            ) from exc
        with container:
            # Cover art in audio files is a one-frame "video" stream marked as an attached picture: not a video.
            videos = [s for s in container.streams.video if not s.disposition & Disposition.attached_pic]
            if not videos:
                if sniffed.kind is None:
                    raise UnsupportedMedia(f"{name}: not a video: {sniffed.why}")
                raise _no_video(name, container)
            stream = videos[0]
            if stream.codec_context is None:
                raise UnsupportedMedia(f"{name}: the video codec of this {label} has no decoder here")
            _check_pixels(name, stream.codec_context.width, stream.codec_context.height, limits)
            rotation = _iso_rotation(rotation_fp, size, stream.id) if rotation_fp is not None else 0
            kind = _container_name(sniffed, container, path)
            facts = _stream_facts(kind, container, stream, rotation)
            yield _Source(path, name, size, sniffed, facts, container, stream)


def _open_webp(path: Path, fp: BinaryIO, size: int, sniffed: Sniffed, limits: Limits) -> _Source:
    name = path.name
    with translate_pillow(name, "WebP"):
        fp.seek(0)
        with Image.open(fp, formats=("WEBP",)) as im:
            width, height = im.size
    _check_pixels(name, width, height, limits)
    durations = _webp_durations(fp)
    total = sum(durations) / 1000 if durations else None
    count = len(durations) if durations else 1
    facts = VideoFacts(
        container="webp",
        codec="webp",
        width=width,
        height=height,
        duration_s=round(total, 3) if total else None,
        fps=round(count / total, 3) if total else None,
        frame_count=count,
    )
    return _Source(path, name, size, sniffed, facts, webp_durations=durations)


def probe_video(path: Path, *, limits: Limits) -> VideoFacts:
    """Container, codec, displayed size, rotation, duration, frame rate and frame count, without decoding frames.

    Raises :class:`UnsupportedMedia` (not a video, no video stream, empty file), :class:`DecodeError` (the container
    cannot be read), :class:`MediaTooLarge` (over ``limits``); ``OSError`` for I/O failures.
    """
    with _open(path, limits) as source:
        return source.facts


# ------------------------------------------------------------------------------------------------------------ sampling


@dataclass(frozen=True, slots=True)
class _Timeline:
    start: float  # seconds: the stream's first timestamp
    duration: float | None  # seconds from ``start`` to the end of the last frame
    fps: float | None
    #: The stream carries no timestamps (raw H.264/HEVC): frame times are counted (n / fps), and it cannot seek.
    by_index: bool = False
    frame_count: int | None = None

    @property
    def interval(self) -> float:
        return 1 / self.fps if self.fps else 0.0


def _timeline(source: _Source) -> _Timeline:
    """Where the clip starts and how long it is.

    The duration comes from the stream, else Matroska's DURATION tag, else the container, else frames / fps (see
    :func:`_stream_facts`). When all are missing (elementary streams, some live recordings), one pass over the
    packets (demux only: no decoding, so bounded by the file size at disk speed) measures it from the last
    timestamp; a stream without any timestamps is sampled by frame number, counted in the same pass, and decoded
    forward once (it cannot be seeked).
    """
    container, stream = source.container, source.stream
    assert container is not None and stream is not None
    tb = stream.time_base or Fraction(1, 1)
    start = float(stream.start_time * tb) if stream.start_time is not None else 0.0
    facts = source.facts
    if facts.duration_s is not None:
        return _Timeline(start, facts.duration_s, facts.fps, frame_count=facts.frame_count)
    first: int | None = None
    end: int | None = None
    packets = 0
    step = round(1 / (facts.fps * tb)) if facts.fps else 0  # a packet without a duration lasts one frame
    with _translate(source.name, "cannot read the video"):
        for packet in container.demux(stream):
            if packet.size == 0:  # the flush packet PyAV adds at the end
                continue
            packets += 1
            if packet.pts is not None:
                first = packet.pts if first is None else min(first, packet.pts)
                last = packet.pts + (packet.duration or step)
                end = last if end is None else max(end, last)
        try:
            container.seek(0)
        except av.error.FFmpegError:  # raw streams have no timestamp seek, but rewind by byte offset
            container.seek(0, unsupported_byte_offset=True)
    if first is not None and end is not None and end > first:
        if stream.start_time is None:
            start = float(first * tb)
        return _Timeline(start, float(end * tb) - start, facts.fps, frame_count=packets)
    fps = facts.fps or _DEFAULT_FPS
    return _Timeline(0.0, packets / fps, fps, by_index=True, frame_count=packets)


def _sample_count(spec: VideoSpec) -> int:
    """Frames to aim for: ``spec.frames``, rounded down to even for a ``video_url`` when ``align > 1``.

    Qwen2/2.5-VL (the reason for an ``align``) consume video frames in pairs and pad an odd count by repeating the
    last frame, so an odd last frame costs the bytes of a frame and adds nothing: sample an even count. A clip with
    fewer (and an odd number of) frames sends them all; the server's padding is exactly what padding here would
    send, without the bytes. Frame dropping for the budget keeps the count even too (see :func:`_fit`).
    """
    if spec.align > 1 and spec.mode != "images" and spec.frames > 1:  # ("auto" here is video_url: see encode_video)
        return spec.frames - spec.frames % 2
    return spec.frames


def _spread(n: int, k: int) -> list[int]:
    """``k`` of ``range(n)``, evenly spaced, first and last included."""
    if k >= n:
        return list(range(n))
    if k <= 1:
        return [0]
    return [round(j * (n - 1) / (k - 1)) for j in range(k)]


def _targets(timeline: _Timeline, spec: VideoSpec) -> list[float]:
    """Target times (seconds from the first frame), chronological: the first frame, the last, evenly between.

    Evenly spaced with both ends included, not centred bins: the first frame (a clip's setting) and the last (how it
    ends) are the two most informative frames, and the budget's frame dropping keeps exactly these two.
    With ``spec.fps``, every ``1/fps`` seconds from the first frame, thinned evenly to ``spec.frames``.
    """
    n = _sample_count(spec)
    last = max(0.0, (timeline.duration or 0.0) - timeline.interval)
    if spec.fps:
        times = [k / spec.fps for k in range(math.floor(last * spec.fps + 1e-9) + 1)]
        return [times[i] for i in _spread(len(times), n)]
    if timeline.frame_count:
        n = min(n, timeline.frame_count)
    if n <= 1 or last <= 0:
        return [0.0]
    return [last * i / (n - 1) for i in range(n)]


def _has_alpha(frame: VideoFrame) -> bool:
    return any(component.is_alpha for component in frame.format.components)


class _FrameConverter:
    """Turns decoded frames into upright RGB images of one size (fixed by the first frame)."""

    def __init__(self, spec: VideoSpec, sar: Fraction) -> None:
        self.spec = spec
        self.sar = sar
        self.rotation: int | None = None  # clockwise, from the first frame's display matrix
        self.stored: tuple[int, int] = (0, 0)  # size to convert to, in stored (unrotated) axes
        self.size: tuple[int, int] = (0, 0)  # final, displayed

    def _setup(self, width: int, height: int, rotation: int) -> None:
        self.rotation = rotation
        displayed = _displayed(width, height, self.sar, rotation)
        self.size = target_size(displayed, self.spec)
        w, h = self.size
        self.stored = (h, w) if rotation in (90, 270) else (w, h)

    def __call__(self, frame: VideoFrame) -> Image.Image:
        if self.rotation is None:
            # PyAV >= 14 reads the display matrix FFmpeg attaches to each frame (MP4/MOV tkhd, Matroska projection).
            self._setup(frame.width, frame.height, _clockwise(frame.rotation))
        width, height = self.stored
        if _has_alpha(frame):
            rgba = frame.reformat(width=width, height=height, format="rgba", interpolation=_INTERPOLATION)
            plane = rgba.planes[0]
            img = Image.frombuffer("RGBA", (width, height), bytes(plane), "raw", "RGBA", plane.line_size, 1)
            img = _flatten(img)
        else:
            img = frame.to_image(width=width, height=height, interpolation=_INTERPOLATION)
        return _upright(img, self.rotation or 0)

    def from_pillow(self, img: Image.Image) -> Image.Image:
        if self.rotation is None:
            self._setup(img.width, img.height, 0)
        img = _flatten(img.convert("RGBA")) if img.mode != "RGB" else img.copy()  # Pillow reuses its frame buffer
        return img.resize(self.size, _RESAMPLE, reducing_gap=3.0) if img.size != self.size else img


def _flatten(img: Image.Image) -> Image.Image:
    flat = Image.new("RGB", img.size, BACKGROUND)
    flat.paste(img, mask=img.getchannel("A"))
    return flat


_UPRIGHT: Final = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}


def _upright(img: Image.Image, clockwise: int) -> Image.Image:
    """Turn clockwise (Pillow's ROTATE_* turn counter-clockwise); done after the resize, on 1/7 of a 1080p frame."""
    transpose = _UPRIGHT.get(clockwise)
    return img.transpose(transpose) if transpose is not None else img


def target_size(displayed: tuple[int, int], spec: VideoSpec) -> tuple[int, int]:
    """Frame size for ``displayed``: within ``spec.max_side``/``spec.max_pixels``, never larger, sides rounded down to
    multiples of ``spec.align`` (at least ``align``: a side shorter than that is the one case that grows)."""
    limits = ImageSpec(max_side=spec.max_side, max_pixels=spec.max_pixels or displayed[0] * displayed[1])
    width, height = fit_size(displayed, limits)
    align = spec.align
    return max(align, width // align * align), max(align, height // align * align)


@dataclass(slots=True)
class _Sample:
    t: float  # seconds from the first frame
    image: Image.Image  # RGB, upright, final size


class _Cursor:
    """Decodes one stream forward, seeking only when that skips work; errors end the stream (see ``error``)."""

    def __init__(self, source: _Source, timeline: _Timeline, limits: Limits) -> None:
        assert source.container is not None and source.stream is not None
        self.container = source.container
        self.stream = source.stream
        self.name = source.name
        self.limits = limits
        self.tb = self.stream.time_base or Fraction(1, 1)
        self._tb = float(self.tb)
        self.timeline = timeline
        self.start_pts = round(timeline.start / self.tb)
        self.seekable = not timeline.by_index
        self.indexed = source.facts.container in _INDEXED
        #: Give up seeking when a seek lands at or before where decoding already was (demuxers without a real
        #: seek, like GIF's, go back to the start): off for keyframes, where landing on the same keyframe is normal.
        self.check_progress = True
        self._packets: Iterator[av.Packet] | None = None
        self._queue: deque[VideoFrame] = deque()
        self.last: VideoFrame | None = None  # the last frame decoded since the last seek
        self.last_t: float | None = None
        self.position: float | None = None  # time of the last frame decoded, anywhere
        self.reached = 0.0  # where the last frame decoded ends (its time plus its duration)
        self.decoded = 0
        self.error: str | None = None
        self.ended = False
        self._seeked_from: float | None = None
        self._await_key = False
        self._to_key = 0
        self._last_key_t: float | None = None
        self.gop = 0.0  # longest keyframe interval seen so far

    def time(self, frame: VideoFrame) -> float:
        if self.timeline.by_index or frame.pts is None:
            return (self.decoded - 1) / (self.timeline.fps or _DEFAULT_FPS)
        return (frame.pts - self.start_pts) * self._tb

    def _pts(self, t: float) -> int:
        return self.start_pts + math.floor(t / self.tb)

    def _indexed_keyframe(self, target: float, *, backward: bool) -> float | None:
        """Time of the indexed keyframe at or before (at or after) ``target``, when the index reaches that far.

        None for containers without a real index (see ``_INDEXED``), or when the target lies beyond the last entry.
        """
        if not self.indexed:
            return None
        entries = self.stream.index_entries
        count = len(entries)
        target_pts = self._pts(target)
        if not count or entries[count - 1].timestamp < target_pts:
            return None
        i = entries.search_timestamp(target_pts, backward=backward, any_frame=False)
        return float((entries[i].timestamp - self.start_pts) * self.tb) if i >= 0 else None

    def keyframe_before(self, target: float) -> float | None:
        return self._indexed_keyframe(target, backward=True)

    def nearest_keyframe(self, target: float, slack: float) -> float | None:
        """Time of the indexed keyframe nearest to ``target``, if one lies within ``slack`` seconds of it."""
        near = [
            t
            for backward in (True, False)
            if (t := self._indexed_keyframe(target, backward=backward)) is not None and abs(t - target) <= slack
        ]
        return min(near, key=lambda t: abs(t - target), default=None)

    def worth_seeking(self, target: float) -> bool:
        """Whether the keyframe before ``target`` lies ahead of what has been decoded."""
        if not self.seekable or self.position is None or target <= self.position:
            return False
        key = self.keyframe_before(target)
        if key is not None:
            return key > self.position
        return target - self.position > max(_MIN_SEEK_GAP_S, 1.5 * self.gop)

    def seek(self, target: float) -> bool:
        """Seek to the keyframe at or before ``target``; False (and no more seeks) when the stream cannot."""
        if not self.indexed:
            target = max(0.0, target - max(_UNINDEXED_LEAD_S, self.gop))
        try:
            self.container.seek(self._pts(target), stream=self.stream, backward=True, any_frame=False)
        except av.error.FFmpegError:  # raw streams: keep decoding forward
            self.seekable = False
            return False
        self._packets = None
        self._queue.clear()
        self.last = self.last_t = None
        self.ended = False
        self._seeked_from = self.position
        self._await_key, self._to_key = True, 0
        self._last_key_t = None
        return True

    def next(self) -> VideoFrame | None:
        """The next frame in presentation order; None at the end of the data or at the first error."""
        while True:
            while not self._queue:
                if self.ended or self.error is not None:
                    return None
                if self._packets is None:
                    self._packets = self.container.demux(self.stream)
                try:
                    packet = next(self._packets)
                    self._queue.extend(packet.decode())
                except StopIteration:
                    self.ended = True
                except av.error.FFmpegError as exc:
                    self.error = _reason(exc)
            frame = self._queue.popleft()
            if self._await_key and not frame.key_frame and self._to_key < _MAX_FRAMES_TO_KEY:
                self._to_key += 1
                continue
            self._await_key = False
            _check_pixels(self.name, frame.width, frame.height, self.limits)
            self.decoded += 1
            t = self.time(frame)
            if self._seeked_from is not None:
                if self.check_progress and t <= self._seeked_from:
                    self.seekable = False
                self._seeked_from = None
            if frame.key_frame:
                if self._last_key_t is not None and t > self._last_key_t:
                    self.gop = max(self.gop, t - self._last_key_t)
                self._last_key_t = t
            self.last, self.last_t, self.position = frame, t, t
            shown = frame.duration * self._tb if frame.duration else self.timeline.interval
            self.reached = max(self.reached, t + shown)
            return frame


def _sample_frames(cursor: _Cursor, targets: Sequence[float], pictures: _FrameConverter) -> list[_Sample]:
    """For each target, the first frame not yet taken at or after it (half a frame early counts).

    An interior target moves to a keyframe the index shows within a quarter of the spacing between targets: the
    samples stay roughly even, and each then costs one seek and one keyframe decode instead of decoding up to a
    whole GOP. (Spread targets often fall just before a keyframe, the worst case: with a 2 s GOP, 16 frames of a
    2-minute clip then decode 16 frames instead of ~400.) The first and the last frame stay exact.
    """
    tolerance = cursor.timeline.interval / 2 + 1e-6
    taken: list[_Sample] = []
    for index, target in enumerate(targets):
        if 0 < index < len(targets) - 1 and cursor.seekable:
            spacing = min(target - targets[index - 1], targets[index + 1] - target)
            key = cursor.nearest_keyframe(target, spacing / 4)
            target = key if key is not None else target
        # Seek to the keyframe at or before the end of the target's window: when a keyframe opens the window, it
        # is the answer (targets spread over a clip often fall on GOP boundaries).
        if cursor.worth_seeking(target + tolerance):
            cursor.seek(target + tolerance)
        while True:
            frame = cursor.next()
            if frame is None:
                return _take_last(cursor, taken, pictures)
            t = cursor.time(frame)
            if taken and t <= taken[-1].t + 1e-6:
                continue
            if t >= target - tolerance:
                taken.append(_Sample(t, pictures(frame)))
                break
    return taken


def _take_last(cursor: _Cursor, taken: list[_Sample], pictures: _FrameConverter) -> list[_Sample]:
    """At the end of the data: the last frame decoded is the best one left for the remaining targets."""
    if cursor.last is not None and cursor.last_t is not None and (not taken or cursor.last_t > taken[-1].t + 1e-6):
        taken.append(_Sample(cursor.last_t, pictures(cursor.last)))
    return taken


def _sample_keyframes(cursor: _Cursor, targets: Sequence[float], pictures: _FrameConverter) -> list[_Sample]:
    """For each target, the keyframe at or before it (seekable streams) or the first one after it; repeats dropped.

    The decoder skips every other frame (``skip_frame = NONKEY``), so each sample costs one keyframe decode.
    """
    cursor.stream.codec_context.skip_frame = "NONKEY"
    cursor.check_progress = False
    tolerance = cursor.timeline.interval / 2 + 1e-6
    taken: list[_Sample] = []
    for target in targets:
        seeked = False
        if taken and cursor.seekable:
            key = cursor.keyframe_before(target + tolerance)
            if key is not None and key <= taken[-1].t + 1e-6:
                continue  # the same keyframe as for the previous target: no need to seek to find out
            seeked = cursor.seek(target + tolerance)
        while True:
            frame = cursor.next()
            if frame is None:
                return taken
            t = cursor.time(frame)
            if taken and t <= taken[-1].t + 1e-6:
                if seeked:
                    break  # the same keyframe as for the previous target
                continue
            if seeked or t >= target - tolerance:
                taken.append(_Sample(t, pictures(frame)))
                break
    return taken


def _ends_early(cursor: _Cursor, timeline: _Timeline) -> str | None:
    """The degradation to record when decoding stopped before the end of the clip, else None.

    The end reached is the last frame's time plus its own duration: a variable-frame-rate clip may hold its last
    frame for seconds, and that is not a short file.
    """
    at = cursor.position if cursor.position is not None else 0.0
    if cursor.error is not None:
        return f"decoding stopped at {at:.1f} s: {cursor.error}"
    end = timeline.duration or 0.0
    if end - cursor.reached > max(1.0, 0.1 * end, 2 * timeline.interval):
        return f"decoding stopped at {at:.1f} s of {end:.1f} s: the file ends early (truncated?)"
    return None


def _sample_av(source: _Source, spec: VideoSpec, limits: Limits) -> tuple[list[_Sample], VideoFacts, list[str]]:
    assert source.stream is not None
    stream = source.stream
    stream.thread_type = "AUTO"
    timeline = _timeline(source)
    targets = _targets(timeline, spec)
    pictures = _FrameConverter(spec, _sar(stream))
    notes: list[str] = []
    label = _label(source.facts.container)
    with _translate(source.name, f"cannot decode the {label} video"):
        cursor = _Cursor(source, timeline, limits)
        samples: list[_Sample] = []
        if spec.keyframes_only and source.facts.container != "gif":  # GIF frames build on each other
            samples = _sample_keyframes(cursor, targets, pictures)
            if not samples and cursor.error is None and cursor.seek(0.0):
                # Nothing flagged as a keyframe: sample every frame instead.
                stream.codec_context.skip_frame = "DEFAULT"
                cursor = _Cursor(source, timeline, limits)
        if not samples and cursor.error is None:
            samples = _sample_frames(cursor, targets, pictures)
    if not samples:
        why = cursor.error or "no video data in the file (truncated, or still being copied?)"
        raise DecodeError(f"{source.name}: cannot decode the {label} video: {why}")
    if cursor.error is not None or (len(samples) < len(targets) and not spec.keyframes_only):
        # (keyframes_only ends on the last keyframe, up to a GOP before the end: that is not a short file)
        if (note := _ends_early(cursor, timeline)) is not None:
            notes.append(note)
    facts = source.facts
    rotation = pictures.rotation or 0
    if rotation != facts.rotation:  # the decoder's display matrix is authoritative (MKV, or a header we missed)
        ctx = stream.codec_context
        width, height = _displayed(ctx.width, ctx.height, _sar(stream), rotation)
        facts = replace(facts, rotation=rotation, width=width, height=height)
    if facts.duration_s is None and timeline.duration is not None:
        facts = replace(facts, duration_s=round(timeline.duration, 3))
    return samples, facts, notes


def _sample_webp(source: _Source, spec: VideoSpec) -> list[_Sample]:
    """Animated WebP through Pillow: targets on the timeline the ANMF durations give; one sequential pass."""
    durations = source.webp_durations or [0]
    starts = [0.0]
    for ms in durations[:-1]:
        starts.append(starts[-1] + ms / 1000)
    duration = sum(durations) / 1000
    fps = len(durations) / duration if duration > 0 else None
    timeline = _Timeline(0.0, duration if duration > 0 else None, fps, frame_count=len(durations))
    tolerance = timeline.interval / 2 + 1e-6
    wanted: list[int] = []
    for target in _targets(timeline, spec):
        i = next((i for i, s in enumerate(starts) if s >= target - tolerance), len(starts) - 1)
        if not wanted or i > wanted[-1]:
            wanted.append(i)
    pictures = _FrameConverter(spec, Fraction(1))
    samples: list[_Sample] = []
    with translate_pillow(source.name, "WebP"), Image.open(source.path, formats=("WEBP",)) as im:
        for i in wanted:
            im.seek(min(i, getattr(im, "n_frames", 1) - 1))
            im.load()
            samples.append(_Sample(starts[i], pictures.from_pillow(im)))
    return samples


# -------------------------------------------------------------------------------------------------------------- budget


@dataclass(slots=True)
class _Fitted:
    indices: list[int]  # which samples are sent
    chunks: list[bytes]
    quality: int | None
    size: tuple[int, int]
    notes: list[str]


def _fit(images: list[Image.Image], spec: VideoSpec, wire: FrameRoom, name: str) -> _Fitted:
    """Encode ``images`` so that their data URLs fit, giving up, in this order and only as far as needed:

    1. quality (JPEG; PNG has none), toward ``spec.min_quality``, predicted from the measured totals (log size is
       close to linear in quality): typically 2-3 encodes of every frame;
    2. frame size, all frames alike, predicted as total ~ scale^e (e = 2 until measured), sides kept multiples of
       ``spec.align``, down to :data:`FLOOR_SIDE` px on the short side (at least ``2 * align``);
    3. frame count at the floor size: the largest count that fits, first and last frame kept, the middle thinned
       evenly (an even count for a ``video_url`` to a frame-pairing model, ``align > 1``, unless only one fits).
       The sizes measured at the floor are exact, so this step encodes nothing.

    Raises :class:`BudgetExceeded` when one frame at the floor size and minimum quality does not fit.
    """
    fmt = spec.frame_format
    n = len(images)
    width, height = images[0].size
    notes: list[str] = []
    room = wire.room(n)
    if room <= 0:
        raise _budget_exceeded(name, wire, fmt, None, None, None)
    everything = list(range(n))
    quality = spec.quality if fmt == "jpeg" else None
    min_quality = min(spec.min_quality, spec.quality)
    by_quality: dict[int | None, tuple[int, list[bytes]]] = {}

    def at_quality(q: float | None) -> tuple[int, list[bytes]]:
        level = None if q is None else int(q)
        if level not in by_quality:
            by_quality[level] = _measured([save_image(img, fmt, level) for img in images])
        return by_quality[level]

    total, chunks = at_quality(quality)
    if total <= room:
        return _Fitted(everything, chunks, quality, (width, height), notes)

    # 1. quality
    if quality is not None and min_quality < quality:
        found = search(at_quality, room, quality, total, lowest=min_quality, rate=QUALITY_SLOPE, power_law=False,
                       aim=_AIM, trials=_MAX_QUALITY_ENCODES, snap=math.floor, key=int)  # fmt: skip
        if found is None:
            total, chunks = at_quality(min_quality)  # usually measured already: the search's last try
            if total <= room:
                found = (min_quality, total, chunks)
        if found is not None:
            notes.append(f"quality {quality} -> {int(found[0])}")
            return _Fitted(everything, found[2], int(found[0]), (width, height), notes)
        notes.append(f"quality {quality} -> {min_quality}")
        quality = min_quality
    by_quality.clear()

    # 2. frame size
    align = spec.align
    short = min(width, height)
    floor_short = min(short, max(2 * align, FLOOR_SIDE // align * align))
    min_scale = floor_short / short

    def dims(scale: float) -> tuple[int, int]:
        scale = max(scale, min_scale)
        return (max(align, math.floor(width * scale + 1e-6) // align * align),
                max(align, math.floor(height * scale + 1e-6) // align * align))  # fmt: skip

    by_size: dict[tuple[int, int], tuple[int, list[bytes]]] = {(width, height): (total, chunks)}

    def at_scale(scale: float) -> tuple[int, list[bytes]]:
        size = dims(scale)
        if size not in by_size:
            small = [img.resize(size, _RESAMPLE, reducing_gap=3.0) for img in images]
            by_size[size] = _measured([save_image(img, fmt, quality) for img in small])
        return by_size[size]

    floor_size = dims(min_scale)
    if floor_size != (width, height):
        found_scale = search(at_scale, room, 1.0, total, lowest=min_scale, rate=SCALE_EXPONENT, power_law=True,
                             aim=_AIM, trials=_MAX_SCALE_ENCODES, snap=lambda v: v, key=dims)  # fmt: skip
        if found_scale is None:
            total, chunks = at_scale(min_scale)
            if total <= room:
                found_scale = (min_scale, total, chunks)
        size = dims(found_scale[0]) if found_scale is not None else floor_size
        notes.append(f"frame size {max(width, height)} -> {max(size)} px")
        if found_scale is not None:
            return _Fitted(everything, found_scale[2], quality, size, notes)
    total, chunks = at_scale(min_scale)

    # 3. frame count
    sizes = [len(c) for c in chunks]
    even = spec.align > 1 and wire.mode == "video_url"
    for k in range(n - 1, 0, -1):
        if even and k % 2 and k != 1:
            continue
        chosen = _spread(n, k)
        if wire.chars([sizes[i] for i in chosen]) <= wire.room(k):
            notes.append(f"frames {n} -> {k}")
            return _Fitted(chosen, [chunks[i] for i in chosen], quality, floor_size, notes)
    raise _budget_exceeded(name, wire, fmt, floor_size, quality, sizes[0])


def _measured(chunks: list[bytes]) -> tuple[int, list[bytes]]:
    return FrameRoom.chars([len(c) for c in chunks]), chunks


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


# -------------------------------------------------------------------------------------------------------------- encode


def _file_part(source: _Source, budget: Budget) -> Part | None:
    """The original file as one ``video_url`` part, when its container is one servers decode and it fits."""
    mime = FILE_MIME.get(source.facts.container)
    if mime is None or data_url_len(mime, source.size) > budget(1):
        return None
    with open(source.path, "rb") as fp:
        data = fp.read(source.size + 1)
    if len(data) != source.size:  # changed while we read it: sample frames from what is there instead
        return None
    facts = source.facts
    return Part(
        type="video_url", mime=mime, chunks=(data,), width=facts.width, height=facts.height, origin="original"
    )


def _check_first_frame(source: _Source, limits: Limits) -> None:
    """Decode one frame, so that a file whose video does not decode fails here and not on the server."""
    timeline = _Timeline(0.0, source.facts.duration_s, source.facts.fps)
    with _translate(source.name, f"cannot decode the {_label(source.facts.container)} video"):
        cursor = _Cursor(source, timeline, limits)
        if cursor.next() is None:
            raise DecodeError(f"{source.name}: cannot decode the video: {cursor.error or 'no frame decodes'}")


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
    with _open(path, limits) as source:
        if spec.mode == "file":
            if source.facts.container not in FILE_MIME:
                notes.append(f"file mode takes MP4, MOV, WebM, MKV or AVI, not {source.facts.container}: "
                             "sent as video_url frames")  # fmt: skip
            elif (part := _file_part(source, budget)) is not None:
                if source.container is not None:
                    _check_first_frame(source, limits)
                return EncodedVideo(parts=(part,), frames=(), mode="file", facts=source.facts)
            else:
                notes.append(f"file too large for the budget ({source.size} bytes): sent as video_url frames")
        wire = FrameRoom(mode, spec.frame_format, budget)
        if wire.room(1) <= 0:  # before decoding anything
            raise _budget_exceeded(source.name, wire, spec.frame_format, None, None, None)
        if source.container is None:
            samples, facts = _sample_webp(source, spec), source.facts
        else:
            samples, facts, decode_notes = _sample_av(source, spec, limits)
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
