"""Opening a video (or an animated GIF/WebP) and reading its facts from the container, without decoding a frame.

The bytes are sniffed (never the name); size and pixel limits are checked from the container header; the rotation of
an MP4/MOV comes from its ``tkhd`` box. Everything here is a pure function of the file, safe to call from several
threads at once.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, Final

import av
import av.error
import av.logging
from av.container import InputContainer
from av.stream import Disposition
from av.video.stream import VideoStream
from PIL import Image

from mmwatchd.encode.image import translate_pillow
from mmwatchd.errors import DecodeError, MediaTooLarge, UnsupportedMedia
from mmwatchd.isobmff import HEADER_MAX, read_header
from mmwatchd.media import Sniffed, read_head
from mmwatchd.model import Limits, VideoFacts

__all__ = ["Source", "av_reason", "check_pixels", "clockwise_turn", "container_label", "displayed_size",
           "open_video", "probe_video", "stream_sar", "translate_av"]  # fmt: skip

# FFmpeg's own messages (damaged packets, odd timestamps) must not reach stderr, where they would break the JSON log
# lines: what matters reaches the caller as an exception or a recorded degradation instead. None turns the
# forwarding off entirely (a level would route them through Python logging's last-resort stderr handler).
av.logging.set_level(None)

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


def av_reason(exc: av.error.FFmpegError) -> str:
    return (exc.strerror or str(exc)).rstrip(".")


@contextmanager
def translate_av(name: str, what: str) -> Iterator[None]:
    """The one place where PyAV exceptions become :class:`MediaError` subclasses (``what``: "cannot read the MP4")."""
    try:
        yield
    except av.error.FFmpegError as exc:
        raise DecodeError(f"{name}: {what}: {av_reason(exc)}") from exc
    except UnicodeDecodeError as exc:  # container metadata PyAV could not decode
        raise DecodeError(f"{name}: {what}: undecodable metadata ({exc.reason})") from exc


@dataclass(slots=True)
class Source:
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


def container_label(container: str) -> str:
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


def stream_sar(stream: VideoStream) -> Fraction:
    """The sample aspect ratio FFmpeg would display with: the container's, else the codec's, else square."""
    for declared in (stream.sample_aspect_ratio, stream.codec_context.sample_aspect_ratio):
        if declared is not None and declared > 0:
            sar = Fraction(declared)
            return sar if _SAR_RANGE[0] <= sar <= _SAR_RANGE[1] else Fraction(1)
    return Fraction(1)


def displayed_size(width: int, height: int, sar: Fraction, rotation: int) -> tuple[int, int]:
    """Size as shown: non-square pixels stretch the width (as players do), then 90/270° rotations swap the axes."""
    width = max(1, round(width * sar))
    return (height, width) if rotation in (90, 270) else (width, height)


def clockwise_turn(ccw: float) -> int:
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
                return clockwise_turn(-math.degrees(math.atan2(b, a)))
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
    width, height = displayed_size(ctx.width, ctx.height, stream_sar(stream), rotation)
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


def check_pixels(name: str, width: int, height: int, limits: Limits) -> None:
    if width * height > limits.max_pixels:
        raise MediaTooLarge(
            f"{name}: {width}x{height} = {width * height} pixels per frame exceeds limits.max_pixels "
            f"({limits.max_pixels})"
        )


@contextmanager
def open_video(path: Path, limits: Limits) -> Iterator[Source]:
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
        label = container_label(sniffed.format) if sniffed.kind else "file"
        try:
            container = av.open(str(path), "r", metadata_errors="replace")
        except av.error.FFmpegError as exc:
            if sniffed.kind is None:
                raise UnsupportedMedia(f"{name}: not a video: {sniffed.why}") from exc
            raise DecodeError(
                f"{name}: cannot read the {label} container ({av_reason(exc)}); if the file is still being copied, "
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
            check_pixels(name, stream.codec_context.width, stream.codec_context.height, limits)
            rotation = _iso_rotation(rotation_fp, size, stream.id) if rotation_fp is not None else 0
            kind = _container_name(sniffed, container, path)
            facts = _stream_facts(kind, container, stream, rotation)
            yield Source(path, name, size, sniffed, facts, container, stream)


def _open_webp(path: Path, fp: BinaryIO, size: int, sniffed: Sniffed, limits: Limits) -> Source:
    name = path.name
    with translate_pillow(name, "WebP"):
        fp.seek(0)
        with Image.open(fp, formats=("WEBP",)) as im:
            width, height = im.size
    check_pixels(name, width, height, limits)
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
    return Source(path, name, size, sniffed, facts, webp_durations=durations)


def probe_video(path: Path, *, limits: Limits) -> VideoFacts:
    """Container, codec, displayed size, rotation, duration, frame rate and frame count, without decoding frames.

    Raises :class:`UnsupportedMedia` (not a video, no video stream, empty file), :class:`DecodeError` (the container
    cannot be read), :class:`MediaTooLarge` (over ``limits``); ``OSError`` for I/O failures.
    """
    with open_video(path, limits) as source:
        return source.facts
