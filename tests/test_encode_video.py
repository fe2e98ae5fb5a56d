"""The video encoder: real clips in (written with PyAV), sampled frames in size-bounded data URLs out."""

from __future__ import annotations

import base64
import io
import math
import os
from pathlib import Path

import av
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from media import (
    make_audio,
    make_empty,
    make_gif,
    make_named_text,
    make_numbered_video,
    make_truncated,
    make_webp,
    read_number,
)
from PIL import Image

from mmwatchd.encode.video import FILE_MIME, encode_video, probe_video, target_size
from mmwatchd.errors import BudgetExceeded, DecodeError, MediaError, MediaTooLarge, UnsupportedMedia
from mmwatchd.model import EncodedVideo, Limits, Part, VideoSpec

SHARED_MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"
LIMITS = Limits()
BIG = 50_000_000  # a budget nothing in these tests reaches
FPS = 10
FRAMES = 40  # 4 s at 10 fps
GOP = 10  # a keyframe every second: frames 0, 10, 20, 30 (the ``keyed`` clip)

needs_shared = pytest.mark.skipif(not SHARED_MEDIA.is_dir(), reason="shared sample media not present")
needs_x264 = pytest.mark.skipif("libx264" not in av.codecs_available, reason="FFmpeg built without libx264")


def flat(total: int, *, per_part: int = 0) -> object:
    """A budget function: ``total`` characters, minus ``per_part`` for each part (the JSON wrapper of each)."""
    return lambda n: total - per_part * n


def encode(path: Path, budget: int | object = BIG, **spec: object) -> EncodedVideo:
    fn = budget if callable(budget) else flat(budget)  # type: ignore[arg-type]
    return encode_video(path, VideoSpec(**spec), budget=fn, limits=LIMITS)  # type: ignore[arg-type]


def images_of(result: EncodedVideo) -> list[Image.Image]:
    """The frames as a server would decode them; checks them against the parts' and frames' own descriptions."""
    chunks = [chunk for part in result.parts for chunk in part.chunks]
    assert len(chunks) == len(result.frames)
    out = []
    for chunk, frame in zip(chunks, result.frames, strict=True):
        img = Image.open(io.BytesIO(chunk))
        img.load()
        assert img.size == (frame.width, frame.height)
        assert frame.bytes == len(chunk)
        out.append(img)
    return out


def numbers(result: EncodedVideo) -> list[int]:
    return [read_number(img) for img in images_of(result)]


def url_total(result: EncodedVideo) -> int:
    return sum(part.url_len for part in result.parts)


# ------------------------------------------------------------------------------------------------------------- clips


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clips")


@pytest.fixture(scope="module")
def clip(clips: Path) -> Path:
    """4 s, 160x120, 10 fps, one keyframe (so that no target moves to a keyframe); frame i shows the number i."""
    return make_numbered_video(clips / "clip.mp4", frames=FRAMES, fps=FPS, gop=FRAMES)


@pytest.fixture(scope="module")
def keyed(clips: Path) -> Path:
    """Like ``clip`` with a keyframe every second."""
    return make_numbered_video(clips / "keyed.mp4", frames=FRAMES, fps=FPS, gop=GOP)


@pytest.fixture(scope="module")
def detailed(clips: Path) -> Path:
    """Like ``clip`` at 320x240 with noisy content in the bottom half, so that budgets bite (~5 KB per frame)."""
    return make_numbered_video(clips / "detailed.mp4", (320, 240), frames=FRAMES, fps=FPS, gop=FRAMES, detail=True,
                               bit_rate=4_000_000)  # fmt: skip


# --------------------------------------------------------------------------------------------------------- probing


class TestProbe:
    def test_facts_from_the_container(self, clip: Path) -> None:
        facts = probe_video(clip, limits=LIMITS)
        assert (facts.container, facts.codec, facts.width, facts.height) == ("mp4", "mpeg4", 160, 120)
        assert facts.rotation == 0
        assert facts.duration_s == pytest.approx(4.0, abs=0.01)
        assert facts.fps == pytest.approx(FPS)
        assert facts.frame_count == FRAMES

    def test_rotation_and_displayed_size_without_decoding(self, clips: Path) -> None:
        path = make_numbered_video(clips / "portrait.mp4", (96, 128), frames=4, rotation=-90)
        facts = probe_video(path, limits=LIMITS)
        assert (facts.width, facts.height, facts.rotation) == (96, 128, 90)  # stored 128x96, turned clockwise

    def test_containers_by_content(self, clips: Path) -> None:
        mkv = make_numbered_video(clips / "named.mp4", frames=4, container="matroska")  # an MKV under an MP4 name
        assert probe_video(mkv, limits=LIMITS).container == "mkv"
        mov = make_numbered_video(clips / "clip.mov", frames=4)
        assert probe_video(mov, limits=LIMITS).container == "mov"

    def test_pixel_limit(self, clip: Path) -> None:
        small = Limits(max_pixels=160 * 120 - 1)
        with pytest.raises(MediaTooLarge, match=r"clip\.mp4: 160x120 = 19200 pixels"):
            probe_video(clip, limits=small)
        with pytest.raises(MediaTooLarge):
            encode_video(clip, VideoSpec(), budget=flat(BIG), limits=small)  # type: ignore[arg-type]

    def test_file_size_limit(self, clip: Path) -> None:
        with pytest.raises(MediaTooLarge, match="max_file_bytes"):
            probe_video(clip, limits=Limits(max_file_bytes=100))


# -------------------------------------------------------------------------------------------------------- sampling


def expected_frames(n: int, count: int = FRAMES, fps: float = FPS) -> list[int]:
    """What sampling ``n`` of ``count`` frames should take: targets evenly from the first frame to the last, each
    answered by the first frame at or after it (half a frame early counts), never twice."""
    last = (count - 1) / fps
    targets = [last * i / (n - 1) for i in range(n)] if n > 1 else [0.0]
    picked: list[int] = []
    for t in targets:
        k = max(math.ceil((t - 0.5 / fps) * fps - 1e-6), picked[-1] + 1 if picked else 0)
        if k < count:
            picked.append(k)
    return picked


class TestSampling:
    def test_spread_over_the_clip_first_and_last_included(self, clip: Path) -> None:
        result = encode(clip, frames=8)
        assert numbers(result) == expected_frames(8) == [0, 6, 11, 17, 22, 28, 33, 39]

    def test_timestamps_are_the_frames_shown(self, clip: Path) -> None:
        result = encode(clip, frames=16)
        got = numbers(result)
        assert got == sorted(set(got)) and len(got) == 16  # chronological, no repeats
        assert [f.t for f in result.frames] == [n / FPS for n in got]

    def test_clip_shorter_than_frames_sends_each_frame_once(self, clips: Path) -> None:
        path = make_numbered_video(clips / "short.mp4", frames=5)
        result = encode(path, frames=16)
        assert numbers(result) == [0, 1, 2, 3, 4]

    def test_single_frame(self, clips: Path) -> None:
        path = make_numbered_video(clips / "one.mp4", frames=1)
        assert numbers(encode(path, frames=16)) == [0]

    @pytest.mark.parametrize(("fps", "frames", "expected"), [
        (2, 16, [0, 5, 10, 15, 20, 25, 30, 35]),  # every 0.5 s
        (5, 4, [0, 12, 26, 38]),  # 20 candidates (0..3.8 s), thinned evenly to 4: #0, #6, #13, #19
    ])  # fmt: skip
    def test_fixed_rate(self, clip: Path, fps: float, frames: int, expected: list[int]) -> None:
        assert numbers(encode(clip, frames=frames, fps=fps)) == expected

    def test_variable_frame_rate(self, clips: Path) -> None:
        times = [0, 50, 400, 450, 1500, 1600, 2900, 3000]
        path = make_numbered_video(clips / "vfr.mp4", pts_ms=times)
        result = encode(path, frames=4)
        got = numbers(result)
        assert got[0] == 0 and got[-1] == len(times) - 1
        assert got == sorted(set(got))
        assert [f.t for f in result.frames] == [times[n] / 1000 for n in got]
        assert not result.degradations

    def test_decodes_only_near_the_targets(self, clips: Path) -> None:
        # 25 s with a keyframe every second. Targets at 0, 8.3, 16.6 and 24.9 s: the middle two move to the nearest
        # keyframe (8 s, 17 s: within a quarter of the spacing), the last stays the last frame. A few seeks and
        # about a dozen decodes, not 250.
        path = make_numbered_video(clips / "long.mp4", (64, 48), frames=250, gop=GOP)
        decoded = 0
        original = av.packet.Packet.decode

        def counting(packet: av.packet.Packet) -> list[object]:
            nonlocal decoded
            frames = original(packet)
            decoded += len(frames)
            return frames

        try:
            av.packet.Packet.decode = counting  # type: ignore[method-assign]
        except TypeError:
            pytest.skip("PyAV's Packet type cannot be patched here")
        try:
            result = encode(path, frames=4)
        finally:
            av.packet.Packet.decode = original  # type: ignore[method-assign]
        assert numbers(result) == [0, 80, 170, 249]
        assert decoded < 30

    @pytest.mark.parametrize("suffix", [".ts", ".mkv"])
    def test_seeking_without_and_with_an_index(self, clips: Path, suffix: str) -> None:
        # MPEG-TS has no index: seeks land near a timestamp, not on a keyframe, and must still find the frames.
        path = make_numbered_video(clips / f"long{suffix}", (64, 48), frames=250, gop=GOP)
        result = encode(path, frames=6)
        got = numbers(result)
        assert got[0] == 0 and got[-1] == 249 and got == sorted(set(got)) and len(got) == 6
        assert all(abs(n - 50 * i) <= 2 for i, n in enumerate(got[1:-1], start=1))
        assert not result.degradations
        keys = numbers(encode(path, frames=6, keyframes_only=True))
        assert keys[0] == 0 and len(keys) >= 5 and all(n % GOP == 0 for n in keys)

    def test_keyframes_nearby_are_preferred_only_within_a_quarter_spacing(self, keyed: Path) -> None:
        # 8 targets 0.557 s apart: 1.114 s moves to the keyframe at 1.0 s (0.114 <= 0.139), 2.229 s to 2.0 s
        # would be 0.229 away: it stays.
        got = numbers(encode(keyed, frames=8))
        assert got == [0, 6, 10, 17, 22, 28, 33, 39]

    def test_missing_duration_with_timestamps(self, clips: Path) -> None:
        path = make_numbered_video(clips / "raw.m4v", gop=FRAMES)  # MPEG-4 elementary stream: no duration
        assert probe_video(path, limits=LIMITS).duration_s is None
        result = encode(path, frames=5)
        assert numbers(result) == expected_frames(5)
        assert result.facts.duration_s == pytest.approx(4.0, abs=0.01)

    @needs_x264
    def test_no_timestamps_at_all(self, clips: Path) -> None:
        path = make_numbered_video(clips / "raw.h264")  # Annex B H.264: no timestamps, no index, no seeking
        facts = probe_video(path, limits=LIMITS)
        assert facts.duration_s is None and facts.codec == "h264"
        result = encode(path, frames=5)
        assert numbers(result) == expected_frames(5) == [0, 10, 19, 29, 39]
        assert [f.t for f in result.frames] == [n / FPS for n in numbers(result)]

    def test_rotated_clip_comes_out_upright(self, clips: Path) -> None:
        # What phones write for portrait: pixels stored landscape, display matrix -90 (turn clockwise to show).
        path = make_numbered_video(clips / "rotated.mp4", (96, 128), frames=20, rotation=-90)
        result = encode(path, frames=3)
        assert result.facts.rotation == 90 and (result.facts.width, result.facts.height) == (96, 128)
        images = images_of(result)
        assert all(img.size == (96, 128) for img in images)
        assert [read_number(img) for img in images] == expected_frames(3, 20) == [0, 9, 19]
        red, grey = images[0].convert("RGB").getpixel((5, 120)), images[0].convert("RGB").getpixel((90, 120))
        assert red[0] > 200 and red[1] < 60  # the red block is bottom left, where it was drawn
        assert abs(grey[0] - grey[2]) < 30

    @pytest.mark.parametrize("rotation", [90, 180])
    def test_other_rotations(self, clips: Path, rotation: int) -> None:
        path = make_numbered_video(clips / f"rot{rotation}.mp4", (96, 128), frames=4, rotation=rotation)
        images = images_of(encode(path, frames=2))
        assert images[0].size == (96, 128)
        assert [read_number(img) for img in images] == [0, 3]

    @pytest.mark.parametrize(("align", "size"), [(1, (161, 97)), (28, (140, 84)), (32, (160, 96))])
    def test_odd_sizes_and_alignment(self, clips: Path, align: int, size: tuple[int, int]) -> None:
        path = clips / "odd.mkv"
        if not path.exists():
            make_numbered_video(path, (161, 97), frames=12)
        result = encode(path, frames=4, align=align)
        assert {(f.width, f.height) for f in result.frames} == {size}
        assert numbers(result)[0] == 0 and numbers(result)[-1] == 11

    def test_frame_size_limits_never_upscale(self) -> None:
        assert target_size((1920, 1080), VideoSpec(max_side=768)) == (768, 432)
        assert target_size((1920, 1080), VideoSpec(max_side=768, align=28)) == (756, 420)
        assert target_size((1920, 1080), VideoSpec(max_side=4000, max_pixels=602_112, align=28)) == (1008, 560)
        assert target_size((100, 50), VideoSpec(max_side=768)) == (100, 50)
        assert target_size((20, 10), VideoSpec(align=28)) == (28, 28)  # the one case that grows

    def test_even_count_for_frame_pairing_models(self, clip: Path) -> None:
        assert len(encode(clip, frames=15, align=28).frames) == 14
        assert len(encode(clip, frames=15, align=28, mode="images").frames) == 15
        assert len(encode(clip, frames=15).frames) == 15

    def test_animated_gif(self, clips: Path) -> None:
        path = make_gif(clips / "anim.gif", (64, 48), frames=10)
        result = encode(path, frames=4)
        assert result.facts.container == "gif" and result.facts.frame_count == 10
        assert [f.t for f in result.frames] == [0.0, 0.3, 0.6, 0.9]

    def test_animated_webp(self, clips: Path) -> None:
        path = make_webp(clips / "anim.webp", (64, 48), frames=10)
        result = encode(path, frames=4)
        assert (result.facts.container, result.facts.frame_count, result.facts.duration_s) == ("webp", 10, 1.0)
        assert [f.t for f in result.frames] == [0.0, 0.3, 0.6, 0.9]
        assert all(img.size == (64, 48) for img in images_of(result))

    def test_still_webp_is_one_frame(self, clips: Path) -> None:
        path = make_webp(clips / "still.webp", (64, 48))
        assert len(encode(path).frames) == 1


# ------------------------------------------------------------------------------------------------ damaged and wrong


class TestDamaged:
    @pytest.mark.parametrize("name", ["cut.mkv", "cut.mp4"])
    def test_truncated_clip_sends_what_decodes(self, clips: Path, name: str) -> None:
        options = {"movflags": "faststart"} if name.endswith(".mp4") else None  # the index first, then the data
        whole = make_numbered_video(clips / f"whole-{name}", frames=FRAMES, gop=GOP, options=options, detail=True)
        cut = make_truncated(whole, clips / name, keep=0.6)
        result = encode(cut, frames=8)
        got = numbers(result)
        assert got[0] == 0 and 10 < got[-1] < 32 and got == sorted(set(got))
        assert len(result.degradations) == 1
        assert result.degradations[0].startswith("decoding stopped at ")

    def test_cut_before_any_frame(self, clip: Path, clips: Path) -> None:
        cut = make_truncated(clip, clips / "stub.mp4", keep=200)
        with pytest.raises(DecodeError, match=r"stub\.mp4: "):
            encode(cut)

    def test_audio_only_under_a_video_name(self, clips: Path) -> None:
        path = make_audio(clips / "voice.mp4")
        with pytest.raises(UnsupportedMedia, match=r"voice\.mp4: no video stream: looks like an audio file \(aac\)"):
            probe_video(path, limits=LIMITS)
        with pytest.raises(UnsupportedMedia, match="no video stream"):
            encode(path)

    def test_empty_file(self, clips: Path) -> None:
        path = make_empty(clips / "empty.mp4")
        with pytest.raises(UnsupportedMedia, match=r"empty\.mp4: empty file"):
            encode(path)

    def test_random_bytes(self, clips: Path) -> None:
        path = clips / "noise.mp4"
        path.write_bytes(os.urandom(4096))
        with pytest.raises(UnsupportedMedia, match=r"noise\.mp4: not a video"):
            probe_video(path, limits=LIMITS)
        with pytest.raises(MediaError):
            encode(path)

    def test_text_and_still_images_are_not_videos(self, clips: Path) -> None:
        with pytest.raises(UnsupportedMedia, match="looks like text"):
            encode(make_named_text(clips / "notes.mp4"))
        png = clips / "still.png"
        Image.new("RGB", (8, 8)).save(png)
        with pytest.raises(UnsupportedMedia, match="still image"):
            encode(png)

    def test_missing_file_is_an_os_error(self, clips: Path) -> None:
        with pytest.raises(FileNotFoundError):
            encode(clips / "gone.mp4")


# ------------------------------------------------------------------------------------------------------------ wire


class TestWire:
    def test_video_url_is_one_part_of_comma_joined_frames(self, clip: Path) -> None:
        result = encode(clip, frames=6)
        assert result.mode == "video_url" and len(result.parts) == 1
        part = result.parts[0]
        assert (part.type, part.mime, part.origin, part.quality) == ("video_url", "video/jpeg", "encoded", 80)
        url = part.url()
        assert len(url) == part.url_len
        prefix, _, payload = url.partition(";base64,")
        assert prefix == "data:video/jpeg"
        pieces = payload.split(",")
        assert len(pieces) == 6
        sizes = set()
        for piece, chunk in zip(pieces, part.chunks, strict=True):
            data = base64.b64decode(piece, validate=True)
            assert data == chunk
            img = Image.open(io.BytesIO(data))
            assert img.format == "JPEG"
            sizes.add(img.size)
        assert sizes == {(part.width, part.height)} == {(160, 120)}

    def test_images_are_one_part_per_frame_in_order(self, clip: Path) -> None:
        result = encode(clip, frames=5, mode="images")
        assert result.mode == "images"
        assert [(p.type, p.mime, len(p.chunks)) for p in result.parts] == [("image_url", "image/jpeg", 1)] * 5
        assert all(p.url().startswith("data:image/jpeg;base64,") and len(p.url()) == p.url_len for p in result.parts)
        assert numbers(result) == expected_frames(5)

    def test_png_frames(self, clip: Path) -> None:
        result = encode(clip, frames=3, frame_format="png")
        part = result.parts[0]
        assert (part.mime, part.quality) == ("video/png", None)
        assert all(img.format == "PNG" for img in images_of(result))

    @pytest.mark.parametrize(("suffix", "container"), [(".mp4", None), (".mov", None), (".mkv", None),
                                                       (".webm", None), (".avi", None)])  # fmt: skip
    def test_file_mode_sends_the_original(self, clips: Path, suffix: str, container: str | None) -> None:
        path = make_numbered_video(clips / f"orig{suffix}", frames=6, container=container)
        result = encode(path, mode="file")
        facts = probe_video(path, limits=LIMITS)
        assert result.mode == "file" and result.frames == () and result.facts == facts
        (part,) = result.parts
        assert (part.type, part.origin, part.chunks) == ("video_url", "original", (path.read_bytes(),))
        assert part.mime == FILE_MIME[facts.container]
        assert part.mime == {".mp4": "video/mp4", ".mov": "video/quicktime", ".mkv": "video/x-matroska",
                             ".webm": "video/webm", ".avi": "video/x-msvideo"}[suffix]  # fmt: skip

    def test_file_mode_falls_back_to_frames_when_too_big(self, clip: Path) -> None:
        size = clip.stat().st_size
        result = encode(clip, budget=size, mode="file", frames=4)
        assert result.mode == "video_url" and result.parts[0].mime == "video/jpeg"
        assert result.degradations == (f"file too large for the budget ({size} bytes): sent as video_url frames",)
        assert numbers(result) == expected_frames(4)

    def test_file_mode_on_a_gif_sends_frames(self, clips: Path) -> None:
        path = make_gif(clips / "file.gif", (64, 48), frames=4)
        result = encode(path, mode="file")
        assert result.mode == "video_url" and "not gif" in result.degradations[0]


# ---------------------------------------------------------------------------------------------------------- budget


def _spread_like(n: int, k: int) -> list[int]:
    """Evenly thinned indices, first and last kept."""
    return [round(j * (n - 1) / (k - 1)) for j in range(k)] if k > 1 else [0]


def kinds(result: EncodedVideo) -> list[str]:
    return [note.split(" ")[0] if not note.startswith("frame size") else "size" for note in result.degradations]


class TestBudget:
    def test_fits_untouched(self, detailed: Path) -> None:
        full = encode(detailed, frames=8)
        again = encode(detailed, budget=url_total(full), frames=8)
        assert again.degradations == () and url_total(again) == url_total(full)

    def test_quality_first(self, detailed: Path) -> None:
        full = url_total(encode(detailed, frames=8))
        result = encode(detailed, budget=int(full * 0.8), frames=8)
        assert kinds(result) == ["quality"]
        assert result.parts[0].quality is not None and 40 <= result.parts[0].quality < 80
        assert result.degradations[0] == f"quality 80 -> {result.parts[0].quality}"
        assert (result.parts[0].width, len(result.frames)) == (320, 8)
        assert url_total(result) <= int(full * 0.8)

    def test_then_frame_size(self, detailed: Path) -> None:
        at_min = url_total(encode(detailed, frames=8, quality=40))
        result = encode(detailed, budget=int(at_min * 0.6), frames=8)
        assert kinds(result) == ["quality", "size"]
        assert result.degradations[0] == "quality 80 -> 40"
        width = result.parts[0].width
        assert 85 <= width < 320 and result.degradations[1] == f"frame size 320 -> {width} px"
        assert numbers(result) == expected_frames(8)
        assert url_total(result) <= int(at_min * 0.6)

    def test_then_frame_count_keeping_first_and_last(self, detailed: Path) -> None:
        floor = encode(detailed, frames=8, quality=40, max_side=85)  # about the floor: 64 px on the short side
        budget = int(url_total(floor) * 0.5)
        result = encode(detailed, budget=budget, frames=8)
        assert kinds(result) == ["quality", "size", "frames"]
        assert result.degradations[1] == "frame size 320 -> 85 px"
        assert (result.parts[0].width, result.parts[0].height) == (85, 64)
        got = numbers(result)
        assert 2 <= len(got) < 8 and got[0] == 0 and got[-1] == FRAMES - 1
        assert got == [expected_frames(8)[i] for i in _spread_like(8, len(got))]
        assert result.degradations[2] == f"frames 8 -> {len(got)}"
        assert url_total(result) <= budget

    def test_png_has_no_quality_step(self, detailed: Path) -> None:
        full = url_total(encode(detailed, frames=4, frame_format="png"))
        result = encode(detailed, budget=int(full * 0.7), frames=4, frame_format="png")
        assert kinds(result) == ["size"]

    def test_even_counts_when_dropping_for_qwen(self, detailed: Path) -> None:
        for budget in (9000, 6000, 4000, 3000, 2000):
            try:
                result = encode(detailed, budget=budget, frames=8, align=28)
            except BudgetExceeded:
                continue
            if "frames" in kinds(result):
                break
        else:
            pytest.fail("no budget made the encoder drop frames")
        assert len(result.frames) in (1, 2, 4, 6)
        assert (result.parts[0].width, result.parts[0].height) == (56, 56)  # the floor for align 28: 2 x 28

    def test_images_mode_pays_per_part(self, detailed: Path) -> None:
        # Each part costs 2000 characters of JSON: 8 parts do not fit where 4 would.
        full = encode(detailed, frames=8, mode="images")
        per_frame = url_total(full) // 8
        budget = flat(per_frame * 8 + 2000 * 5, per_part=2000)
        result = encode(detailed, budget=budget, frames=8, mode="images")
        assert url_total(result) <= budget(len(result.parts))  # type: ignore[operator]
        assert result.degradations

    def test_nothing_fits(self, detailed: Path) -> None:
        with pytest.raises(BudgetExceeded) as info:
            encode(detailed, budget=900, frames=8)
        message = str(info.value)
        assert "detailed.mp4" in message and "900" in message and "max_request_bytes" in message
        assert "85x64 JPEG frame quality 40" in message

    def test_no_room_at_all_fails_before_decoding(self, detailed: Path) -> None:
        with pytest.raises(BudgetExceeded, match="no room"):
            encode(detailed, budget=10)

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        total=st.integers(min_value=500, max_value=120_000),
        per_part=st.sampled_from([0, 40, 400]),
        mode=st.sampled_from(["video_url", "images"]),
        frame_format=st.sampled_from(["jpeg", "png"]),
        align=st.sampled_from([1, 28]),
        frames=st.integers(min_value=1, max_value=12),
    )
    def test_never_over_budget(self, detailed: Path, total: int, per_part: int, mode: str, frame_format: str,
                               align: int, frames: int) -> None:  # fmt: skip
        budget = flat(total, per_part=per_part)
        try:
            result = encode(detailed, budget=budget, frames=frames, mode=mode, frame_format=frame_format, align=align)
        except BudgetExceeded:
            return
        assert url_total(result) <= budget(len(result.parts))  # type: ignore[operator]
        got = numbers(result)
        assert got[0] == 0 and got == sorted(set(got))
        if len(got) > 1:
            assert got[-1] == FRAMES - 1
        assert len({(f.width, f.height) for f in result.frames}) == 1


# ------------------------------------------------------------------------------------------------ real sample files

SAMPLES = sorted(p.name for p in (SHARED_MEDIA / "videos").glob("*") if p.is_file()) if SHARED_MEDIA.is_dir() else []
BAD = sorted(p.name for p in (SHARED_MEDIA / "videos" / "bad").glob("*")) if SHARED_MEDIA.is_dir() else []
AUDIO_ONLY = {"mp4-with-audio.mp4", "multiple-aac-tracks.mp4"}
#: Expected displayed shape of the sampled frames, where it matters.
SHAPES = {
    "rotate-buck-bunny.mp4": (432, 768),  # 1920x1080 stored, display matrix -90: portrait
    "no-correct-videoframe-format.mov": (432, 768),  # iPhone HEVC 10-bit, portrait
    "sar_2x1.mp4": (768, 216),  # 640x360 with 2:1 pixels shows as 1280x360
}


@needs_shared
@pytest.mark.parametrize("name", SAMPLES)
def test_sample_videos(name: str) -> None:
    path = SHARED_MEDIA / "videos" / name
    if name in AUDIO_ONLY:
        with pytest.raises(UnsupportedMedia, match="no video stream: looks like an audio file"):
            encode(path)
        return
    result = encode(path, frames=8)
    images = images_of(result)
    assert images and len({img.size for img in images}) == 1
    assert [f.t for f in result.frames] == sorted({f.t for f in result.frames})
    assert result.frames[0].t == 0.0
    if name in SHAPES:
        assert images[0].size == SHAPES[name]
        if name != "sar_2x1.mp4":
            assert result.facts.rotation == 90 and (result.facts.width, result.facts.height) == (1080, 1920)


@needs_shared
@pytest.mark.parametrize("name", ["chi.gif", "iss634.webp"])
def test_sample_animations(name: str) -> None:
    result = encode(SHARED_MEDIA / "images" / name, frames=8)
    assert len(result.frames) == 8 and result.frames[-1].t > 2.0
    assert len({img.size for img in images_of(result)}) == 1


@needs_shared
@pytest.mark.parametrize("name", BAD)
@pytest.mark.parametrize("keyframes_only", [False, True])
def test_bad_sample_videos(name: str, keyframes_only: bool) -> None:
    try:
        result = encode(SHARED_MEDIA / "videos" / "bad" / name, frames=8, keyframes_only=keyframes_only)
    except MediaError:
        return
    assert images_of(result)


@needs_shared
def test_sample_keyframes_only() -> None:
    result = encode(SHARED_MEDIA / "videos" / "video-h265.mp4", frames=8, keyframes_only=True)
    assert result.frames and all(isinstance(p, Part) for p in result.parts)
