"""Sampling a video: which frames, and reaching them cheaply (PyAV; animated WebP through Pillow).

1. timeline: start, duration and frame rate from the container (see :func:`_timeline` for the fallbacks when the
   duration is missing);
2. targets: times spread evenly from the first frame to the last (both included), or every ``1/spec.fps`` seconds;
   each is reached by decoding forward, or by a seek to the keyframe before it when that keyframe lies ahead of the
   decoder (:class:`Cursor`); interior targets move to a keyframe that is close enough (:func:`_sample_frames`), so
   16 frames of a two-hour film cost about 16 keyframe decodes;
3. every sampled frame is converted once, in swscale, straight from YUV to RGB at its final size (display aspect
   ratio from the sample aspect ratio, ``spec.max_side``/``spec.max_pixels``, sides in multiples of ``spec.align``),
   then turned upright (the display matrix); only these small RGB frames are kept, never a full-size one
   (:class:`FrameConverter`).

Everything here is a pure function of the file and the arguments, safe to call from several threads at once.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, Final

import av
import av.error
from av.video.frame import VideoFrame
from PIL import Image

from mmwatchd.encode.container import (
    Source,
    av_reason,
    check_pixels,
    clockwise_turn,
    container_label,
    displayed_size,
    stream_sar,
    translate_av,
)
from mmwatchd.encode.image import fit_size, translate_pillow
from mmwatchd.errors import DecodeError
from mmwatchd.model import ImageSpec, Limits, VideoFacts, VideoSpec

__all__ = ["Cursor", "FrameConverter", "Sample", "Timeline", "check_first_frame", "sample_av", "sample_webp", "spread",
           "target_size"]  # fmt: skip

#: Colour that transparent GIF/WebP areas are flattened onto (the image encoder's default background).
BACKGROUND: Final = (255, 255, 255)

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


@dataclass(frozen=True, slots=True)
class Timeline:
    start: float  # seconds: the stream's first timestamp
    duration: float | None  # seconds from ``start`` to the end of the last frame
    fps: float | None
    #: The stream carries no timestamps (raw H.264/HEVC): frame times are counted (n / fps), and it cannot seek.
    by_index: bool = False
    frame_count: int | None = None

    @property
    def interval(self) -> float:
        return 1 / self.fps if self.fps else 0.0


def _timeline(source: Source) -> Timeline:
    """Where the clip starts and how long it is.

    The duration comes from the stream, else Matroska's DURATION tag, else the container, else frames / fps (see
    ``_stream_facts`` in :mod:`mmwatchd.encode.container`). When all are missing (elementary streams, some live
    recordings), one pass over the packets (demux only: no decoding, so bounded by the file size at disk speed)
    measures it from the last timestamp; a stream without any timestamps is sampled by frame number, counted in the
    same pass, and decoded forward once (it cannot be seeked).
    """
    container, stream = source.container, source.stream
    assert container is not None and stream is not None
    tb = stream.time_base or Fraction(1, 1)
    start = float(stream.start_time * tb) if stream.start_time is not None else 0.0
    facts = source.facts
    if facts.duration_s is not None:
        return Timeline(start, facts.duration_s, facts.fps, frame_count=facts.frame_count)
    first: int | None = None
    end: int | None = None
    packets = 0
    step = round(1 / (facts.fps * tb)) if facts.fps else 0  # a packet without a duration lasts one frame
    with translate_av(source.name, "cannot read the video"):
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
        return Timeline(start, float(end * tb) - start, facts.fps, frame_count=packets)
    fps = facts.fps or _DEFAULT_FPS
    return Timeline(0.0, packets / fps, fps, by_index=True, frame_count=packets)


def _sample_count(spec: VideoSpec) -> int:
    """Frames to aim for: ``spec.frames``, rounded down to even for a ``video_url`` when ``align > 1``.

    Qwen2/2.5-VL (the reason for an ``align``) consume video frames in pairs and pad an odd count by repeating the
    last frame, so an odd last frame costs the bytes of a frame and adds nothing: sample an even count. A clip with
    fewer (and an odd number of) frames sends them all; the server's padding is exactly what padding here would
    send, without the bytes. Frame dropping for the budget keeps the count even too (see ``_fit`` in
    :mod:`mmwatchd.encode.video`).
    """
    if spec.align > 1 and spec.mode != "images" and spec.frames > 1:  # ("auto" here is video_url: see encode_video)
        return spec.frames - spec.frames % 2
    return spec.frames


def spread(n: int, k: int) -> list[int]:
    """``k`` of ``range(n)``, evenly spaced, first and last included."""
    if k >= n:
        return list(range(n))
    if k <= 1:
        return [0]
    return [round(j * (n - 1) / (k - 1)) for j in range(k)]


def _targets(timeline: Timeline, spec: VideoSpec) -> list[float]:
    """Target times (seconds from the first frame), chronological: the first frame, the last, evenly between.

    Evenly spaced with both ends included, not centred bins: the first frame (a clip's setting) and the last (how it
    ends) are the two most informative frames, and the budget's frame dropping keeps exactly these two.
    With ``spec.fps``, every ``1/fps`` seconds from the first frame, thinned evenly to ``spec.frames``.
    """
    n = _sample_count(spec)
    last = max(0.0, (timeline.duration or 0.0) - timeline.interval)
    if spec.fps:
        times = [k / spec.fps for k in range(math.floor(last * spec.fps + 1e-9) + 1)]
        return [times[i] for i in spread(len(times), n)]
    if timeline.frame_count:
        n = min(n, timeline.frame_count)
    if n <= 1 or last <= 0:
        return [0.0]
    return [last * i / (n - 1) for i in range(n)]


def _has_alpha(frame: VideoFrame) -> bool:
    return any(component.is_alpha for component in frame.format.components)


class FrameConverter:
    """Turns decoded frames into upright RGB images of one size (fixed by the first frame)."""

    def __init__(self, spec: VideoSpec, sar: Fraction) -> None:
        self.spec = spec
        self.sar = sar
        self.rotation: int | None = None  # clockwise, from the first frame's display matrix
        self.stored: tuple[int, int] = (0, 0)  # size to convert to, in stored (unrotated) axes
        self.size: tuple[int, int] = (0, 0)  # final, displayed

    def _setup(self, width: int, height: int, rotation: int) -> None:
        self.rotation = rotation
        displayed = displayed_size(width, height, self.sar, rotation)
        self.size = target_size(displayed, self.spec)
        w, h = self.size
        self.stored = (h, w) if rotation in (90, 270) else (w, h)

    def __call__(self, frame: VideoFrame) -> Image.Image:
        if self.rotation is None:
            # PyAV >= 14 reads the display matrix FFmpeg attaches to each frame (MP4/MOV tkhd, Matroska projection).
            self._setup(frame.width, frame.height, clockwise_turn(frame.rotation))
        width, height = self.stored
        if _has_alpha(frame):
            rgba = frame.reformat(width=width, height=height, format="rgba", interpolation=_INTERPOLATION)
            plane = rgba.planes[0]
            img = Image.frombuffer("RGBA", (width, height), bytes(plane), "raw", "RGBA", plane.line_size, 1)
            img = _flatten(img)
        else:
            img = frame.to_image(  # type: ignore[no-untyped-call]  # PyAV declares no types for it
                width=width, height=height, interpolation=_INTERPOLATION
            )
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
class Sample:
    t: float  # seconds from the first frame
    image: Image.Image  # RGB, upright, final size


class Cursor:
    """Decodes one stream forward, seeking only when that skips work; errors end the stream (see ``error``)."""

    def __init__(self, source: Source, timeline: Timeline, limits: Limits) -> None:
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
        self._packets: Iterator[av.Packet[Any]] | None = None
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
                    self.error = av_reason(exc)
            frame = self._queue.popleft()
            if self._await_key and not frame.key_frame and self._to_key < _MAX_FRAMES_TO_KEY:
                self._to_key += 1
                continue
            self._await_key = False
            check_pixels(self.name, frame.width, frame.height, self.limits)
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


def _sample_frames(cursor: Cursor, targets: Sequence[float], pictures: FrameConverter) -> list[Sample]:
    """For each target, the first frame not yet taken at or after it (half a frame early counts).

    An interior target moves to a keyframe the index shows within a quarter of the spacing between targets: the
    samples stay roughly even, and each then costs one seek and one keyframe decode instead of decoding up to a
    whole GOP. (Spread targets often fall just before a keyframe, the worst case: with a 2 s GOP, 16 frames of a
    2-minute clip then decode 16 frames instead of ~400.) The first and the last frame stay exact.
    """
    tolerance = cursor.timeline.interval / 2 + 1e-6
    taken: list[Sample] = []
    for index, wanted in enumerate(targets):
        target = wanted
        if 0 < index < len(targets) - 1 and cursor.seekable:
            spacing = min(wanted - targets[index - 1], targets[index + 1] - wanted)
            key = cursor.nearest_keyframe(wanted, spacing / 4)
            target = key if key is not None else wanted
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
                taken.append(Sample(t, pictures(frame)))
                break
    return taken


def _take_last(cursor: Cursor, taken: list[Sample], pictures: FrameConverter) -> list[Sample]:
    """At the end of the data: the last frame decoded is the best one left for the remaining targets."""
    if cursor.last is not None and cursor.last_t is not None and (not taken or cursor.last_t > taken[-1].t + 1e-6):
        taken.append(Sample(cursor.last_t, pictures(cursor.last)))
    return taken


def _sample_keyframes(cursor: Cursor, targets: Sequence[float], pictures: FrameConverter) -> list[Sample]:
    """For each target, the keyframe at or before it (seekable streams) or the first one after it; repeats dropped.

    The decoder skips every other frame (``skip_frame = NONKEY``), so each sample costs one keyframe decode.
    """
    cursor.stream.codec_context.skip_frame = "NONKEY"
    cursor.check_progress = False
    tolerance = cursor.timeline.interval / 2 + 1e-6
    taken: list[Sample] = []
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
                taken.append(Sample(t, pictures(frame)))
                break
    return taken


def _ends_early(cursor: Cursor, timeline: Timeline) -> str | None:
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


def sample_av(source: Source, spec: VideoSpec, limits: Limits) -> tuple[list[Sample], VideoFacts, list[str]]:
    assert source.stream is not None
    stream = source.stream
    stream.thread_type = "AUTO"
    timeline = _timeline(source)
    targets = _targets(timeline, spec)
    pictures = FrameConverter(spec, stream_sar(stream))
    notes: list[str] = []
    label = container_label(source.facts.container)
    with translate_av(source.name, f"cannot decode the {label} video"):
        cursor = Cursor(source, timeline, limits)
        samples: list[Sample] = []
        if spec.keyframes_only and source.facts.container != "gif":  # GIF frames build on each other
            samples = _sample_keyframes(cursor, targets, pictures)
            if not samples and cursor.error is None and cursor.seek(0.0):
                # Nothing flagged as a keyframe: sample every frame instead.
                stream.codec_context.skip_frame = "DEFAULT"
                cursor = Cursor(source, timeline, limits)
        if not samples and cursor.error is None:
            samples = _sample_frames(cursor, targets, pictures)
    if not samples:
        why = cursor.error or "no video data in the file (truncated, or still being copied?)"
        raise DecodeError(f"{source.name}: cannot decode the {label} video: {why}")
    # (keyframes_only ends on the last keyframe, up to a GOP before the end: that is not a short file)
    short = len(samples) < len(targets) and not spec.keyframes_only
    if (cursor.error is not None or short) and (note := _ends_early(cursor, timeline)) is not None:
        notes.append(note)
    facts = source.facts
    rotation = pictures.rotation or 0
    if rotation != facts.rotation:  # the decoder's display matrix is authoritative (MKV, or a header we missed)
        ctx = stream.codec_context
        width, height = displayed_size(ctx.width, ctx.height, stream_sar(stream), rotation)
        facts = replace(facts, rotation=rotation, width=width, height=height)
    if facts.duration_s is None and timeline.duration is not None:
        facts = replace(facts, duration_s=round(timeline.duration, 3))
    return samples, facts, notes


def sample_webp(source: Source, spec: VideoSpec) -> list[Sample]:
    """Animated WebP through Pillow: targets on the timeline the ANMF durations give; one sequential pass."""
    durations = source.webp_durations or [0]
    starts = [0.0]
    for ms in durations[:-1]:
        starts.append(starts[-1] + ms / 1000)
    duration = sum(durations) / 1000
    fps = len(durations) / duration if duration > 0 else None
    timeline = Timeline(0.0, duration if duration > 0 else None, fps, frame_count=len(durations))
    tolerance = timeline.interval / 2 + 1e-6
    wanted: list[int] = []
    for target in _targets(timeline, spec):
        i = next((i for i, s in enumerate(starts) if s >= target - tolerance), len(starts) - 1)
        if not wanted or i > wanted[-1]:
            wanted.append(i)
    pictures = FrameConverter(spec, Fraction(1))
    samples: list[Sample] = []
    with translate_pillow(source.name, "WebP"), Image.open(source.path, formats=("WEBP",)) as im:
        for i in wanted:
            im.seek(min(i, getattr(im, "n_frames", 1) - 1))
            im.load()
            samples.append(Sample(starts[i], pictures.from_pillow(im)))
    return samples


def check_first_frame(source: Source, limits: Limits) -> None:
    """Decode one frame, so that a file whose video does not decode fails here and not on the server."""
    timeline = Timeline(0.0, source.facts.duration_s, source.facts.fps)
    with translate_av(source.name, f"cannot decode the {container_label(source.facts.container)} video"):
        cursor = Cursor(source, timeline, limits)
        if cursor.next() is None:
            raise DecodeError(f"{source.name}: cannot decode the video: {cursor.error or 'no frame decodes'}")
