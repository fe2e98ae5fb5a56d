"""The image encoder: real files in, size-bounded data-URL parts out."""

from __future__ import annotations

import contextlib
import io
import itertools
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from media import (
    XMP_PACKET,
    make_bmp,
    make_empty,
    make_gif,
    make_heic,
    make_jpeg,
    make_named_text,
    make_pdf,
    make_pixel_flood_png,
    make_png,
    make_tiff,
    make_truncated,
    make_video,
    make_webp,
    make_with_metadata,
    picture,
)
from PIL import Image, ImageChops, ImageOps, ImageStat

from mmwatchd.encode import encode_image, probe_image
from mmwatchd.encode.budget import max_payload
from mmwatchd.encode.image import MIN_SIDE, _load_scaled, fit_budget, fit_size, save_image
from mmwatchd.errors import BudgetExceeded, DecodeError, MediaError, MediaTooLarge, UnsupportedMedia
from mmwatchd.model import ImageSpec, Limits, Part, data_url_len

SHARED_MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"
LIMITS = Limits()
RED = (255, 0, 0)
BIG = 50_000_000  # a budget nothing in these tests reaches


#: Every type passthrough knows (what OpenAI takes); the default is what every server takes (no GIF).
ALL_MIMES = ("image/gif", "image/jpeg", "image/png", "image/webp")


def encode(path: Path, budget: int = BIG, *, mimes: tuple[str, ...] | None = None, **spec: object) -> Part:
    extra = {} if mimes is None else {"passthrough_mimes": mimes}
    return encode_image(path, ImageSpec(**spec), budget=budget, limits=LIMITS, **extra)  # type: ignore[arg-type]


def decoded(part: Part) -> Image.Image:
    """The payload as a server would see it; checks it agrees with the part's own description."""
    assert len(part.chunks) == 1
    img = Image.open(io.BytesIO(part.chunks[0]))
    assert Image.MIME[img.format or ""] == part.mime
    assert img.size == (part.width, part.height)
    img.load()
    return img


def mean(img: Image.Image, box: tuple[int, int, int, int] | None = None) -> tuple[float, ...]:
    region = img.convert("RGB").crop(box) if box else img.convert("RGB")
    return tuple(ImageStat.Stat(region).mean)


def near(a: tuple[float, ...], b: tuple[float, ...], tol: float = 12) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def is_red(rgb: tuple[float, ...]) -> bool:
    return rgb[0] > 190 and rgb[1] < 70 and rgb[2] < 70


class TestOrientation:
    @pytest.mark.parametrize("orientation", range(1, 9))
    @pytest.mark.parametrize("passthrough", [True, False])
    def test_marker_lands_top_left(self, tmp_path: Path, orientation: int, passthrough: bool) -> None:
        path = make_jpeg(tmp_path / "o.jpg", (60, 40), orientation=orientation, corner=RED, detail=False)
        part = encode(path, passthrough=passthrough)
        img = decoded(part)
        assert img.size == (60, 40)
        assert is_red(mean(img, (0, 0, 8, 8)))
        for box in [(52, 0, 60, 8), (0, 32, 8, 40), (52, 32, 60, 40)]:
            assert not is_red(mean(img, box)), box
        assert (probe_image(path, limits=LIMITS).width, probe_image(path, limits=LIMITS).height) == (60, 40)
        assert part.origin == ("original" if passthrough and orientation == 1 else "encoded")

    @pytest.mark.parametrize("orientation", [5, 6, 7, 8])
    def test_with_draft_and_resize(self, tmp_path: Path, orientation: int) -> None:
        # Stored 2000x3000, shown 3000x2000: draft works on stored axes, the resize target must be swapped back.
        path = make_jpeg(tmp_path / "o.jpg", (3000, 2000), orientation=orientation, corner=RED, detail=False)
        img = decoded(encode(path, max_side=600))
        assert img.size == (600, 400)
        assert is_red(mean(img, (0, 0, 60, 60)))
        assert not is_red(mean(img, (540, 340, 600, 400)))

    @pytest.mark.parametrize("orientation", [3, 6, 8])
    def test_png_and_tiff_tags(self, tmp_path: Path, orientation: int) -> None:
        for path in (
            make_png(tmp_path / "o.png", (60, 40), orientation=orientation, corner=RED, detail=False),
            make_tiff(tmp_path / "o.tif", (60, 40), orientation=orientation, corner=RED, detail=False),
        ):
            img = decoded(encode(path))
            assert img.size == (60, 40), path.name
            assert is_red(mean(img, (0, 0, 8, 8))), path.name
            facts = probe_image(path, limits=LIMITS)
            assert (facts.width, facts.height) == (60, 40)

    @pytest.mark.parametrize("orientation", [0, 9, 255])
    def test_invalid_values_mean_upright(self, tmp_path: Path, orientation: int) -> None:
        path = make_jpeg(tmp_path / "o.jpg", (60, 40), orientation=orientation, corner=RED, detail=False)
        img = decoded(encode(path, passthrough=False))
        assert img.size == (60, 40) and is_red(mean(img, (0, 0, 8, 8)))


class TestModes:
    def test_cmyk(self, tmp_path: Path) -> None:
        path = make_jpeg(tmp_path / "c.jpg", (64, 48), mode="CMYK", corner=RED, detail=False)
        img = decoded(encode(path))
        assert img.mode == "RGB"
        assert is_red(mean(img, (0, 0, 8, 8)))
        assert near(mean(img), mean(picture((64, 48), detail=False, corner=RED)), tol=15)

    @pytest.mark.parametrize(
        "make",
        [
            lambda d: make_png(d / "g.png", mode="I;16"),
            lambda d: make_tiff(d / "g.tif", mode="I;16"),
            lambda d: make_tiff(d / "g.tif", mode="I;16B"),
            lambda d: make_tiff(d / "g.tif", mode="I"),
            lambda d: make_tiff(d / "g.tif", mode="F"),
        ],
    )
    def test_wide_grey_is_scaled_not_clipped(self, tmp_path: Path, make) -> None:
        img = decoded(encode(make(tmp_path)))
        expected = ImageStat.Stat(picture((64, 48)).convert("L")).mean[0]
        assert abs(ImageStat.Stat(img.convert("L")).mean[0] - expected) < 4  # clipping would give ~255

    def test_16_bit_holding_8_bit_values(self, tmp_path: Path) -> None:
        path = tmp_path / "low.png"
        picture((64, 48)).convert("L").convert("I").convert("I;16").save(path)
        img = decoded(encode(path))
        assert abs(mean(img)[0] - ImageStat.Stat(picture((64, 48)).convert("L")).mean[0]) < 4

    def test_16_bit_transparency_key(self, tmp_path: Path) -> None:
        path = tmp_path / "key.png"
        grey = Image.new("I;16", (40, 20), 30000)
        grey.paste(Image.new("I;16", (20, 20), 1234), (0, 0))
        grey.save(path, transparency=1234)
        img = decoded(encode(path))
        assert near(mean(img, (0, 0, 18, 20)), (255, 255, 255), tol=3)
        assert near(mean(img, (22, 0, 40, 20)), (117, 117, 117), tol=3)

    def test_rgba_flattened_for_jpeg(self, tmp_path: Path) -> None:
        path = make_png(tmp_path / "a.png", (64, 48), mode="RGBA")  # alpha 0 at the left edge, 255 at the right
        white = decoded(encode(path, passthrough=False))
        assert white.mode == "RGB"
        assert near(mean(white, (0, 0, 2, 48)), (255, 255, 255), tol=6)
        black = decoded(encode(path, passthrough=False, background=(0, 0, 0)))
        assert near(mean(black, (0, 0, 2, 48)), (0, 0, 0), tol=6)
        assert near(mean(white, (62, 0, 64, 48)), mean(black, (62, 0, 64, 48)), tol=8)

    @pytest.mark.parametrize("fmt", ["png", "webp"])
    def test_alpha_kept_for_png_and_webp(self, tmp_path: Path, fmt: str) -> None:
        path = make_png(tmp_path / "a.png", (64, 48), mode="RGBA")
        img = decoded(encode(path, passthrough=False, format=fmt))
        assert img.mode == "RGBA"
        alpha = img.getchannel("A")
        assert alpha.getpixel((0, 10)) < 10 and alpha.getpixel((63, 10)) > 245

    def test_opaque_alpha_dropped(self, tmp_path: Path) -> None:
        path = tmp_path / "opaque.png"
        picture((64, 48)).convert("RGBA").save(path)
        assert decoded(encode(path, passthrough=False, format="png")).mode == "RGB"

    def test_palette_transparency_flattened(self, tmp_path: Path) -> None:
        path = tmp_path / "p.png"
        img = Image.new("P", (40, 20), 1)
        img.putpalette([255, 0, 0, 0, 0, 255])
        img.paste(0, (0, 0, 20, 20))
        img.save(path, transparency=0)  # the red half is transparent
        out = decoded(encode(path))
        assert near(mean(out, (0, 0, 18, 20)), (255, 255, 255), tol=4)
        assert near(mean(out, (22, 0, 40, 20)), (0, 0, 255), tol=12)

    def test_la(self, tmp_path: Path) -> None:
        out = decoded(encode(make_png(tmp_path / "la.png", (64, 48), mode="LA")))
        assert near(mean(out, (0, 0, 2, 48)), (255, 255, 255), tol=6)

    @pytest.mark.parametrize("mode", ["1", "L", "P"])
    def test_other_png_modes(self, tmp_path: Path, mode: str) -> None:
        out = decoded(encode(make_png(tmp_path / "m.png", (64, 48), mode=mode), passthrough=False))
        assert out.mode in ("L", "RGB") and out.size == (64, 48)

    def test_gif_transparency_flattened(self, tmp_path: Path) -> None:
        path = tmp_path / "t.gif"
        img = Image.new("P", (40, 20), 1)
        img.putpalette([0, 255, 0, 0, 0, 255])
        img.paste(0, (0, 0, 20, 20))
        img.save(path, transparency=0)
        out = decoded(encode(path))
        assert near(mean(out, (0, 0, 18, 20)), (255, 255, 255), tol=4)

    def test_heic_round_trip(self, tmp_path: Path) -> None:
        path = make_heic(tmp_path / "h.heic", (64, 48), corner=RED, quality=90, detail=False)
        facts = probe_image(path, limits=LIMITS)
        assert (facts.format, facts.width, facts.height) == ("HEIF", 64, 48)
        img = decoded(encode(path))
        assert img.format == "JPEG" and is_red(mean(img, (0, 0, 8, 8)))

    def test_bmp(self, tmp_path: Path) -> None:
        assert decoded(encode(make_bmp(tmp_path / "b.bmp", corner=RED))).size == (64, 48)


def solid_frames(colours: tuple[tuple[int, int, int], ...]) -> list[Image.Image]:
    return [Image.new("RGB", (32, 24), c) for c in colours]


class TestFirstFrame:
    COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))

    def test_animated_gif(self, tmp_path: Path) -> None:
        path = tmp_path / "a.gif"
        first, *rest = solid_frames(self.COLOURS)
        first.save(path, save_all=True, append_images=rest, duration=100, loop=0)
        assert probe_image(path, limits=LIMITS).frames == 3
        part = encode(path)
        assert part.origin == "encoded" and part.mime == "image/jpeg"
        assert is_red(mean(decoded(part)))

    def test_animated_webp(self, tmp_path: Path) -> None:
        path = tmp_path / "a.webp"
        first, *rest = solid_frames(self.COLOURS)
        first.save(path, save_all=True, append_images=rest, duration=100, lossless=True)
        assert probe_image(path, limits=LIMITS).frames == 3
        part = encode(path)
        assert part.origin == "encoded" and is_red(mean(decoded(part)))

    def test_multipage_tiff(self, tmp_path: Path) -> None:
        path = tmp_path / "a.tif"
        first, *rest = solid_frames(self.COLOURS)
        first.save(path, save_all=True, append_images=rest)
        assert probe_image(path, limits=LIMITS).frames == 3
        assert is_red(mean(decoded(encode(path))))


class TestLimits:
    def test_pixel_flood_refused_from_the_header(self, tmp_path: Path) -> None:
        path = make_pixel_flood_png(tmp_path / "flood.png", 65535, 66601)
        message = re.escape("flood.png: 65535x66601 = 4364696535 pixels exceeds limits.max_pixels (200000000)")
        with pytest.raises(MediaTooLarge, match=message):
            probe_image(path, limits=LIMITS)
        with pytest.raises(MediaTooLarge, match=message):
            encode(path)

    def test_own_limit_not_pillows(self, tmp_path: Path) -> None:
        # 108 MP: over Pillow's default guard (89 MP warns, 179 MP fails), under limits.max_pixels. No warning.
        path = make_pixel_flood_png(tmp_path / "pano.png", 12000, 9000)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            facts = probe_image(path, limits=LIMITS)
        assert (facts.width, facts.height) == (12000, 9000)
        assert Image.MAX_IMAGE_PIXELS is None
        with pytest.raises(MediaTooLarge, match=r"108000000 pixels exceeds limits.max_pixels .100000000."):
            probe_image(path, limits=Limits(max_pixels=100_000_000))

    def test_small_limits(self, tmp_path: Path) -> None:
        path = make_jpeg(tmp_path / "x.jpg", (64, 48))
        with pytest.raises(MediaTooLarge, match="64x48 = 3072 pixels"):
            encode_image(path, ImageSpec(), budget=BIG, limits=Limits(max_pixels=3071))
        with pytest.raises(MediaTooLarge, match=r"limits.max_file_bytes"):
            encode_image(path, ImageSpec(), budget=BIG, limits=Limits(max_file_bytes=100))

    def test_png_text_bomb(self, tmp_path: Path) -> None:
        from PIL import PngImagePlugin

        info = PngImagePlugin.PngInfo()
        info.add_text("comment", "a" * (PngImagePlugin.MAX_TEXT_CHUNK + 1), zip=True)
        path = tmp_path / "bomb.png"
        Image.new("L", (4, 4)).save(path, pnginfo=info)
        with pytest.raises(MediaTooLarge, match=r"bomb.png: .*decompression bomb"):
            encode(path)


class TestDamaged:
    def test_truncated_jpeg(self, tmp_path: Path) -> None:
        path = make_truncated(make_jpeg(tmp_path / "IMG_1.jpg", (256, 192)), tmp_path / "IMG_1.jpg", keep=0.6)
        message = (
            "IMG_1.jpg: truncated JPEG (the file ends early; if it is still being copied, "
            "it will be retried when complete)"
        )
        with pytest.raises(DecodeError) as caught:
            encode(path, passthrough=False)
        assert str(caught.value) == message
        with pytest.raises(DecodeError, match="truncated JPEG"):
            encode(path)  # small enough to pass through: still decoded once, so still refused
        assert probe_image(path, limits=LIMITS).width == 256  # the header alone is intact

    @pytest.mark.parametrize("keep", [0.5, -12])  # cut in IDAT; only IEND missing (Pillow alone accepts that)
    def test_truncated_png(self, tmp_path: Path, keep: float) -> None:
        source = make_png(tmp_path / "full.png", (128, 96))
        size = source.stat().st_size
        path = make_truncated(source, tmp_path / "cut.png", keep=keep if isinstance(keep, float) else size + keep)
        for call in (lambda: encode(path), lambda: probe_image(path, limits=LIMITS)):
            with pytest.raises(DecodeError, match=r"cut.png: truncated PNG"):
                call()

    def test_truncated_heic(self, tmp_path: Path) -> None:
        path = make_truncated(make_heic(tmp_path / "h.heic", (64, 48)), tmp_path / "cut.heic", keep=0.7)
        with pytest.raises(DecodeError, match=r"cut.heic: truncated HEIF"):
            encode(path)

    def test_damaged_png_chunks(self, tmp_path: Path) -> None:
        data = make_png(tmp_path / "ok.png").read_bytes()
        path = tmp_path / "bad.png"
        path.write_bytes(data[:33] + b"\x00\x00\x00\x10\x01\x02\x03\x04" + data[41:])  # garbage chunk type
        with pytest.raises(DecodeError, match=r"bad.png: damaged PNG"):
            encode(path)

    def test_empty(self, tmp_path: Path) -> None:
        with pytest.raises(UnsupportedMedia, match=r"^x.jpg: empty file$"):
            encode(make_empty(tmp_path / "x.jpg"))

    @pytest.mark.parametrize(
        ("make", "message"),
        [
            (make_named_text, "x.jpg: not an image: looks like text"),
            (make_pdf, "x.jpg: not an image: looks like a PDF document"),
            (lambda p: make_video(p.with_suffix(".mp4")).rename(p), "x.jpg: not an image: it is a video (MP4)"),
        ],
    )
    def test_not_an_image(self, tmp_path: Path, make, message: str) -> None:
        path = make(tmp_path / "x.jpg")
        for call in (lambda: encode(path), lambda: probe_image(path, limits=LIMITS)):
            with pytest.raises(UnsupportedMedia) as caught:
                call()
            assert str(caught.value) == message

    def test_missing_file_is_an_os_error(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError):
            encode(tmp_path / "gone.jpg")


class TestDraft:
    def test_jpeg_decodes_at_reduced_scale(self, tmp_path: Path) -> None:
        path = make_jpeg(tmp_path / "big.jpg", (6000, 4000), detail=False)
        target = fit_size((6000, 4000), ImageSpec(max_side=1024))
        assert target == (1024, 682)
        with Image.open(path) as im:
            loaded = _load_scaled(im, target)
            assert loaded.size == (1500, 1000)  # 1/4 scale: the smallest DCT scale still >= the target
        assert decoded(encode(path, max_side=1024)).size == (1024, 682)

    def test_dct_scale_just_under_the_target_is_sent_as_is(self, tmp_path: Path) -> None:
        path = make_jpeg(tmp_path / "12mp.jpg", (4000, 3000), corner=RED)
        part = encode(path, max_side=1024)
        # 1/4 scale gives 1000x750, 2.3% under 1024x768: sent at that size rather than decoded at 1/2 and resized
        assert (part.width, part.height) == (1000, 750)
        img = decoded(part)
        assert img.size == (1000, 750) and is_red(mean(img, (0, 0, 50, 50)))
        with Image.open(path) as full:
            assert near(mean(img), mean(full.convert("RGB")), tol=2)

    def test_dct_scale_too_far_under_is_not_used(self, tmp_path: Path) -> None:
        path = make_jpeg(tmp_path / "odd.jpg", (3800, 2850), detail=False)
        # 1/4 scale would be 950x713, 7% under 1024x768: decoded at 1/2 and resized to the exact size instead
        assert decoded(encode(path, max_side=1024)).size == (1024, 768)

    def test_heic_decodes_a_large_enough_thumbnail(self, tmp_path: Path) -> None:
        path = make_heic(tmp_path / "t.heic", (2000, 1500), corner=RED, thumbnails=[1000])
        with Image.open(path) as full:
            reference = full.convert("RGB").resize((1000, 750))
        part = encode(path, max_side=1024)
        # Only the embedded 1000x750 thumbnail has this size (2% under max_side); the image itself would give 1024x768
        assert (part.width, part.height) == (1000, 750)
        img = decoded(part)
        assert is_red(mean(img, (0, 0, 40, 40)))
        assert near(mean(img), mean(reference), tol=3)
        small = decoded(encode(path, max_side=500))  # thumbnail decoded, then resized down
        assert small.size == (500, 375) and is_red(mean(small, (0, 0, 20, 20)))

    def test_heic_thumbnail_too_small_is_not_used(self, tmp_path: Path) -> None:
        path = make_heic(tmp_path / "t.heic", (2000, 1500), thumbnails=[320])
        assert decoded(encode(path, max_side=1024)).size == (1024, 768)

    def test_no_draft_when_no_resize(self, tmp_path: Path) -> None:
        path = make_jpeg(tmp_path / "small.jpg", (300, 200))
        with Image.open(path) as im:
            assert _load_scaled(im, (300, 200)).size == (300, 200)


class TestFitSize:
    @pytest.mark.parametrize(
        ("size", "max_side", "max_pixels", "expected"),
        [
            ((1800, 1200), 1536, 10**9, (1536, 1024)),
            ((1200, 1800), 1536, 10**9, (1024, 1536)),
            ((4000, 3000), 10**6, 1_000_000, (1154, 866)),
            ((100, 50), 1536, 10**9, (100, 50)),  # never up
            ((100_000, 10), 1536, 10**9, (1536, 1)),
            ((3, 3), 2, 10**9, (2, 2)),
        ],
    )
    def test_fit(self, size, max_side, max_pixels, expected) -> None:
        spec = ImageSpec(max_side=max_side, max_pixels=max_pixels)
        got = fit_size(size, spec)
        assert got == expected
        assert max(got) <= max_side and got[0] * got[1] <= max_pixels


class TestPassthrough:
    @pytest.mark.parametrize(
        ("make", "mime"),
        [
            (lambda d: make_jpeg(d / "a.jpg"), "image/jpeg"),
            (lambda d: make_jpeg(d / "a.jpg", mode="L"), "image/jpeg"),
            (lambda d: make_jpeg(d / "a.jpg", orientation=1), "image/jpeg"),
            (lambda d: make_png(d / "a.png"), "image/png"),
            (lambda d: make_png(d / "a.png", mode="RGBA"), "image/png"),
            (lambda d: make_png(d / "a.png", mode="L"), "image/png"),
            (lambda d: make_webp(d / "a.webp"), "image/webp"),
            (lambda d: make_webp(d / "a.webp", mode="RGBA"), "image/webp"),
            (lambda d: make_gif(d / "a.gif"), "image/gif"),
        ],
    )
    def test_sent_untouched(self, tmp_path: Path, make, mime: str) -> None:
        path = make(tmp_path)
        # exactly enough; keep_metadata: the very bytes of the file
        part = encode(path, budget=data_url_len(mime, path.stat().st_size), mimes=ALL_MIMES, keep_metadata=True)
        assert part.origin == "original" and part.mime == mime and part.quality is None
        assert part.chunks == (path.read_bytes(),)
        assert (part.width, part.height) == (64, 48)

    @pytest.mark.parametrize(
        ("make", "spec"),
        [
            (lambda d: make_jpeg(d / "a.jpg"), {"passthrough": False}),
            (lambda d: make_jpeg(d / "a.jpg", mode="CMYK"), {}),
            (lambda d: make_jpeg(d / "a.jpg", orientation=6), {}),
            (lambda d: make_jpeg(d / "a.jpg"), {"max_side": 63}),
            (lambda d: make_jpeg(d / "a.jpg"), {"max_pixels": 64 * 48 - 1}),
            (lambda d: make_png(d / "a.png", mode="I;16"), {}),
            (lambda d: make_png(d / "a.png", mode="P"), {}),
            (lambda d: make_png(d / "a.png", mode="LA"), {}),
            (lambda d: make_png(d / "a.png", transparency=(0, 0, 0)), {}),
            (lambda d: make_gif(d / "a.gif", transparency=True), {}),
            (lambda d: make_gif(d / "a.gif", frames=2), {}),
            (lambda d: make_webp(d / "a.webp", frames=2), {}),
            (lambda d: make_tiff(d / "a.tif"), {}),
            (lambda d: make_bmp(d / "a.bmp"), {}),
            (lambda d: make_heic(d / "a.heic"), {}),
        ],
    )
    def test_refused(self, tmp_path: Path, make, spec: dict[str, object]) -> None:
        part = encode(make(tmp_path), **spec)
        assert part.origin == "encoded" and part.mime == "image/jpeg"
        decoded(part)

    def test_gif_only_to_endpoints_that_take_it(self, tmp_path: Path) -> None:
        """Ollama answers 400 "invalid image input" to a GIF data URL: GIFs are encoded unless the endpoint takes them."""
        path = make_gif(tmp_path / "a.gif")
        assert encode(path).origin == "encoded" and encode(path).mime == "image/jpeg"
        assert encode(path, mimes=ALL_MIMES).mime == "image/gif"

    def test_over_budget_is_encoded(self, tmp_path: Path) -> None:
        path = make_jpeg(tmp_path / "a.jpg", (256, 192), quality=95)
        budget = data_url_len("image/jpeg", path.stat().st_size) - 1
        part = encode(path, budget=budget)
        assert part.origin == "encoded" and part.url_len <= budget


def _jpeg_scans(data: bytes) -> bytes:
    """From the first SOS marker to EOI: the entropy-coded pixels (with their scan headers and tables between)."""
    return data[data.index(b"\xff\xda") : data.rindex(b"\xff\xd9") + 2]


class TestPassthroughMetadata:
    """Passthrough photos reach the endpoint without EXIF/XMP/GPS/comments; the coded pixels are untouched."""

    @pytest.mark.parametrize("fmt", ["jpeg", "jpeg-progressive", "png", "webp", "gif"])
    def test_stripped_losslessly(self, tmp_path: Path, fmt: str) -> None:
        kind = fmt.split("-", maxsplit=1)[0]
        path = make_with_metadata(tmp_path / f"a.{kind}", kind, progressive=fmt.endswith("progressive"))
        original = path.read_bytes()
        with Image.open(path) as im:
            assert im.getexif().get_ifd(0x8825) or kind == "gif"  # the file really has GPS (GIF has no EXIF)
        part = encode(path, mimes=ALL_MIMES)
        sent = part.chunks[0]
        assert part.origin == "original" and len(sent) < len(original)
        assert XMP_PACKET not in sent and b"taken at home" not in sent and b"PhoneMaker" not in sent
        with Image.open(io.BytesIO(sent)) as im, Image.open(path) as orig:
            assert not im.getexif().get_ifd(0x8825) and not im.getexif()
            assert "xmp" not in im.info and "comment" not in im.info
            if kind != "gif":
                assert im.info.get("icc_profile") == orig.info.get("icc_profile")  # colours stay right
            assert im.tobytes() == orig.tobytes()
        if kind == "jpeg":
            assert _jpeg_scans(sent) == _jpeg_scans(original)
        elif kind == "png":
            idat = re.compile(rb"IDAT.*?(?=....IEND)", re.S)
            assert idat.search(sent)[0] == idat.search(original)[0]  # type: ignore[index]
        elif kind == "webp":
            vp8 = original[original.index(b"VP8 ") :]
            vp8 = vp8[: 8 + int.from_bytes(vp8[4:8], "little")]
            assert vp8 in sent

    def test_keep_metadata_sends_the_file_as_it_is(self, tmp_path: Path) -> None:
        path = make_with_metadata(tmp_path / "a.jpg", "jpeg")
        assert encode(path, keep_metadata=True).chunks == (path.read_bytes(),)

    def test_trailer_after_eoi_is_not_sent(self, tmp_path: Path) -> None:
        """Phones append motion-photo videos after a JPEG's EOI; such a trailer is not the picture."""
        path = make_jpeg(tmp_path / "a.jpg")
        path.write_bytes(path.read_bytes() + b"ftypmp42" + b"\0" * 500)
        sent = encode(path).chunks[0]
        assert sent.endswith(b"\xff\xd9") and b"ftypmp42" not in sent


class TestTaken:
    def test_date_time_original(self, tmp_path: Path) -> None:
        path = make_jpeg(tmp_path / "a.jpg", taken="2024:05:06 07:08:09")
        assert probe_image(path, limits=LIMITS).taken == "2024-05-06 07:08:09"

    def test_falls_back_to_date_time(self, tmp_path: Path) -> None:
        exif = Image.Exif()
        exif[306] = "2021:12:31 23:59:58"
        path = tmp_path / "a.jpg"
        picture((32, 24)).save(path, exif=exif.tobytes())
        assert probe_image(path, limits=LIMITS).taken == "2021-12-31 23:59:58"

    @pytest.mark.parametrize("value", ["0000:00:00 00:00:00", "    :  :     :  :  ", "2024:13:01 00:00:00", "soon"])
    def test_invalid(self, tmp_path: Path, value: str) -> None:
        assert probe_image(make_jpeg(tmp_path / "a.jpg", taken=value), limits=LIMITS).taken == ""

    def test_absent(self, tmp_path: Path) -> None:
        facts = probe_image(make_png(tmp_path / "a.png"), limits=LIMITS)
        assert (facts.format, facts.taken, facts.frames) == ("PNG", "", 1)


SOURCES = {
    "jpeg": lambda p, size, seed, detail: make_jpeg(p.with_suffix(".jpg"), size, seed=seed, detail=detail),
    "jpeg-L": lambda p, size, seed, detail: make_jpeg(p.with_suffix(".jpg"), size, mode="L", seed=seed, detail=detail),
    "jpeg-CMYK": lambda p, size, seed, detail: make_jpeg(p.with_suffix(".jpg"), size, mode="CMYK", seed=seed),
    "png": lambda p, size, seed, detail: make_png(p.with_suffix(".png"), size, seed=seed, detail=detail),
    "png-RGBA": lambda p, size, seed, detail: make_png(p.with_suffix(".png"), size, mode="RGBA", seed=seed),
    "png-P": lambda p, size, seed, detail: make_png(p.with_suffix(".png"), size, mode="P", transparency=0),
    "png-I;16": lambda p, size, seed, detail: make_png(p.with_suffix(".png"), size, mode="I;16", seed=seed),
    "webp": lambda p, size, seed, detail: make_webp(p.with_suffix(".webp"), size, seed=seed, detail=detail),
    "gif": lambda p, size, seed, detail: make_gif(p.with_suffix(".gif"), size, seed=seed, detail=detail),
}
_counter = itertools.count()


@pytest.fixture(scope="module")
def photo_24mp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_jpeg(tmp_path_factory.mktemp("big") / "IMG_24MP.jpg", (6000, 4000), quality=92)


class TestBudget:
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        source=st.sampled_from(sorted(SOURCES)),
        size=st.tuples(st.integers(1, 320), st.integers(1, 320)),
        detail=st.booleans(),
        seed=st.integers(0, 5),
        fmt=st.sampled_from(["jpeg", "png", "webp"]),
        passthrough=st.booleans(),
        max_side=st.integers(8, 400),
        budget=st.one_of(st.integers(0, 3000), st.integers(3000, 300_000)),
    )
    def test_fits_or_refuses(self, tmp_path_factory, source, size, detail, seed, fmt, passthrough, max_side, budget):
        folder = tmp_path_factory.getbasetemp() / "budget"
        path = SOURCES[source](folder / f"src{next(_counter)}", size, seed, detail)
        spec = ImageSpec(format=fmt, passthrough=passthrough, max_side=max_side, max_pixels=60_000)
        try:
            part = encode_image(path, spec, budget=budget, limits=LIMITS)
        except BudgetExceeded as exc:
            assert path.name in str(exc) and str(budget) in str(exc)
            return
        assert part.url_len <= budget
        assert part.url_len == len(part.url())
        img = decoded(part)
        if part.origin == "original":
            assert part.chunks == (path.read_bytes(),)
        else:
            assert part.mime == {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}[fmt]
            assert max(img.size) <= max_side and img.width * img.height <= 60_000
            assert max(img.size) >= min(MIN_SIDE, max(fit_size(size, spec)))

    def test_24mp_photo_into_300kb(self, photo_24mp: Path) -> None:
        budget = 300_000
        part = encode(photo_24mp, budget=budget)
        assert part.url_len <= budget
        # 6000x4000 decodes at 1/4 scale to 1500x1000, 2% under max_side 1536: sent as is, not resized
        assert (part.width, part.height) == (1500, 1000)  # fits by quality alone, no pixels lost
        assert part.quality is not None and 50 <= part.quality < 85
        assert part.url_len > 0.8 * budget  # uses the budget rather than undershooting wildly

    def test_few_encodes(self) -> None:
        img = picture((1536, 1024))
        spec = ImageSpec()
        for budget in (200_000, 300_000, 400_000):
            result = fit_budget(img, spec, budget=budget, name="x.jpg")
            assert data_url_len("image/jpeg", len(result.data)) <= budget
            assert result.encodes <= 3, (budget, result)

    def test_scales_down_below_min_quality(self) -> None:
        result = fit_budget(picture((1536, 1024)), ImageSpec(), budget=40_000, name="x.jpg")
        assert result.quality == 50 and result.width < 1536
        assert data_url_len("image/jpeg", len(result.data)) <= 40_000
        assert result.encodes <= 5, result

    def test_png_stays_png_and_shrinks(self, tmp_path: Path) -> None:
        path = make_png(tmp_path / "shot.png", (400, 300))
        part = encode(path, budget=60_000, format="png", passthrough=False)
        assert part.mime == "image/png" and part.quality is None
        assert part.url_len <= 60_000 and part.width < 400
        assert part.width / part.height == pytest.approx(4 / 3, rel=0.02)

    def test_webp_lowers_quality(self, tmp_path: Path) -> None:
        path = make_png(tmp_path / "a.png", (400, 300))
        full = encode(path, format="webp", passthrough=False)
        part = encode(path, budget=int(full.url_len * 0.8), format="webp", passthrough=False)
        assert part.mime == "image/webp" and (part.width, part.height) == (400, 300)
        assert part.quality is not None and part.quality < 85

    def test_impossible_budget(self, tmp_path: Path) -> None:
        path = make_jpeg(tmp_path / "IMG_9.jpg", (400, 300))
        with pytest.raises(BudgetExceeded) as caught:
            encode(path, budget=600)
        message = str(caught.value)
        assert message.startswith("IMG_9.jpg: cannot fit the byte budget")
        assert "600" in message and f"{MIN_SIDE}x24" in message
        assert "raise endpoint.max_request_bytes or shorten the prompt" in message

    @pytest.mark.parametrize("budget", [0, 10, len("data:image/jpeg;base64,")])
    def test_budget_below_the_prefix(self, tmp_path: Path, budget: int) -> None:
        with pytest.raises(BudgetExceeded):
            encode(make_jpeg(tmp_path / "a.jpg"), budget=budget)

    @pytest.mark.parametrize("budget", range(23, 60))
    def test_max_payload_is_exact(self, budget: int) -> None:
        n = max_payload("image/jpeg", budget)
        assert data_url_len("image/jpeg", n) <= budget or n == 0
        assert data_url_len("image/jpeg", n + 1) > budget


class TestThreads:
    def test_parallel_results_match_serial(self, tmp_path: Path) -> None:
        paths = [make_jpeg(tmp_path / f"{i}.jpg", (900, 600), seed=i, orientation=1 + i % 8) for i in range(8)]
        paths += [make_png(tmp_path / f"{i}.png", (500, 400), mode="RGBA", seed=i) for i in range(4)]
        spec = ImageSpec(max_side=256, passthrough=False)

        def run(path: Path) -> bytes:
            return encode_image(path, spec, budget=20_000, limits=LIMITS).chunks[0]

        serial = [run(p) for p in paths]
        with ThreadPoolExecutor(max_workers=4) as pool:
            parallel = list(pool.map(run, paths * 2))
        assert parallel == serial * 2


# ------------------------------------------------------------------------------------------- the shared media corpus

needs_corpus = pytest.mark.skipif(not SHARED_MEDIA.is_dir(), reason="shared media corpus not present")


def corpus(folder: str) -> list[Path]:
    root = SHARED_MEDIA / folder
    return sorted(p for p in root.iterdir() if p.is_file()) if root.is_dir() else []


DISPLAYED = {  # per SOURCES.md: size as displayed, before any resize
    **{f"Landscape_{n}.jpg": (1800, 1200) for n in range(9)},
    "arrow.heic": (3024, 4032),
    "pug.heic": (4032, 3024),
    "rot1mir0.avif": (640, 427),
    "orientation_rectangle.jpg": (1, 2),
    "example.avif": (800, 533),
    "frozenpond.mpo": (640, 480),
    "chi.gif": (320, 240),
    "iss634.webp": (245, 245),
    "star.avifs": (159, 159),
    "multipage.tiff": (10, 10),
}


@needs_corpus
class TestSharedCorpus:
    @pytest.mark.parametrize("path", corpus("images"), ids=lambda p: p.name)
    def test_good_images_encode(self, path: Path) -> None:
        spec = ImageSpec()
        part = encode_image(path, spec, budget=2_000_000, limits=LIMITS)
        img = decoded(part)
        facts = probe_image(path, limits=LIMITS)
        if path.name in DISPLAYED:
            assert (facts.width, facts.height) == DISPLAYED[path.name]
        want = fit_size((facts.width, facts.height), spec)
        assert part.width <= want[0] and part.height <= want[1]
        assert part.width >= 0.95 * want[0] and part.height >= 0.95 * want[1]
        assert img.mode in ("L", "RGB", "RGBA")

    @pytest.mark.parametrize("n", range(9))
    def test_landscape_orientations_agree(self, n: int) -> None:
        reference = decoded(encode(SHARED_MEDIA / "images" / "Landscape_1.jpg", max_side=300))
        img = decoded(encode(SHARED_MEDIA / "images" / f"Landscape_{n}.jpg", max_side=300))
        assert img.size == (300, 200)
        assert near(mean(img, (0, 0, 100, 100)), mean(reference, (0, 0, 100, 100)), tol=8)
        assert near(mean(img, (200, 100, 300, 200)), mean(reference, (200, 100, 300, 200)), tol=8)

    @pytest.mark.parametrize("path", corpus("images/bad"), ids=lambda p: p.name)
    def test_bad_images_refused(self, path: Path) -> None:
        with pytest.raises(MediaError) as caught:
            encode_image(path, ImageSpec(), budget=2_000_000, limits=LIMITS)
        assert str(caught.value).startswith(f"{path.name}: ")
        with contextlib.suppress(MediaError):
            probe_image(path, limits=LIMITS)  # header-only: may pass, but only ever fails with a MediaError

    def test_expected_verdicts(self) -> None:
        bad = SHARED_MEDIA / "images" / "bad"
        expected = {
            "decompression_bomb.gif": MediaTooLarge,
            "png_decompression_dos.png": MediaTooLarge,
            "png-truncated.png": DecodeError,  # no IEND: Pillow alone would accept it
            "truncated.heic": DecodeError,  # its second image runs past the end of the file
            "truncated_jpeg.jpg": DecodeError,
            "truncated_image.png": DecodeError,
            "corrupted.heic": DecodeError,
        }
        for name, error in expected.items():
            with pytest.raises(error):
                encode(bad / name)

    def test_cmyk_not_inverted(self) -> None:
        img = decoded(encode(SHARED_MEDIA / "images" / "pil_sample_cmyk.jpg"))
        assert is_red(img.getpixel((0, 0)))  # C=0 M=242 Y=230 K=0 in the file

    @pytest.mark.parametrize(
        ("name", "origin"),
        [
            ("hopper.jpg", "original"),
            ("hopper_gray.jpg", "original"),
            ("basn6a16.png", "encoded"),  # 16-bit
            ("i_trns.png", "encoded"),  # 16-bit grey with a transparency key
            ("frozenpond.mpo", "encoded"),
            ("pil_sample_cmyk.jpg", "encoded"),
            ("chi.gif", "encoded"),  # animated
            ("Landscape_6.jpg", "encoded"),
        ],
    )
    def test_passthrough_choices(self, name: str, origin: str) -> None:
        assert encode(SHARED_MEDIA / "images" / name, max_side=4096, max_pixels=10**8).origin == origin

    @pytest.mark.parametrize("name", ["basn6a16.png", "ibasn6a16.png"])
    def test_16_bit_rgba(self, name: str) -> None:
        path = SHARED_MEDIA / "images" / name
        img = decoded(encode(path, format="png"))
        assert img.mode == "RGBA"
        with Image.open(path) as reference:
            assert near(mean(img), mean(reference), tol=1)
            assert img.getchannel("A").getextrema() == reference.getchannel("A").getextrema()

    def test_iphone_heic_thumbnail_keeps_orientation(self) -> None:
        path = SHARED_MEDIA / "images" / "arrow.heic"  # 3024x4032 after irot 270; 240x320 thumbnail
        with Image.open(path) as im:
            assert _load_scaled(im, (240, 320)).size == (240, 320)  # the thumbnail, not the 12 MP image
        img = decoded(encode(path, max_side=320))
        assert img.size == (240, 320)
        with Image.open(path) as full:
            reference = full.convert("RGB").resize((240, 320))
        for box in ((0, 0, 120, 160), (120, 0, 240, 160), (0, 160, 120, 320), (120, 160, 240, 320)):
            assert near(mean(img, box), mean(reference, box), tol=6), box

    def test_heic_taken_and_orientation(self) -> None:
        facts = probe_image(SHARED_MEDIA / "images" / "arrow.heic", limits=LIMITS)
        assert (facts.width, facts.height, facts.taken) == (3024, 4032, "2018-07-31 14:52:07")


class TestScaledJpegDecode:
    """JPEGs decode at any M/8 DCT scale (libjpeg-turbo through simplejpeg), not only Pillow's 1/2, 1/4, 1/8."""

    def test_12mp_at_1536_decodes_at_three_eighths_and_skips_the_resize(self, tmp_path: Path) -> None:
        # 3/8 of 4000x3000 is 1500x1125, 2% under 1536x1152: sent at that size. Pillow's 1/2 scale would have given
        # 2000x1500, resized to 1536x1152.
        path = make_jpeg(tmp_path / "big.jpg", (4000, 3000), detail=False, corner=RED)
        part = encode(path, max_side=1536, passthrough=False)
        assert (part.width, part.height) == (1500, 1125)
        assert is_red(mean(decoded(part), (0, 0, 40, 40)))

    @pytest.mark.parametrize(
        ("kind", "m8"),
        [("rgb", True), ("orientation-6", True), ("progressive", True), ("grey", True), ("cmyk", False)],
    )
    def test_same_picture_as_a_full_pillow_decode(self, tmp_path: Path, kind: str, m8: bool) -> None:
        # 1600x1200 to 610 px: 3/8 gives 600x450 (within 5% of 610x457, no resize); Pillow's path resizes from
        # 1/2 scale to 610x457. CMYK stays with Pillow (Adobe's inverted CMYK is its business).
        make = {
            "rgb": lambda p: make_jpeg(p, (1600, 1200), corner=RED),
            "orientation-6": lambda p: make_jpeg(p, (1600, 1200), orientation=6, corner=RED),
            "progressive": lambda p: make_jpeg(p, (1600, 1200), progressive=True, corner=RED),
            "grey": lambda p: make_jpeg(p, (1600, 1200), mode="L"),
            "cmyk": lambda p: make_jpeg(p, (1600, 1200), mode="CMYK", corner=RED),
        }[kind]
        path = make(tmp_path / f"{kind}.jpg")
        img = decoded(encode(path, max_side=610, passthrough=False))
        assert img.size == ((600, 450) if m8 else (610, 457))
        with Image.open(path) as im:
            full = ImageOps.exif_transpose(im).convert(img.mode)
        reference = full.resize(img.size, Image.Resampling.LANCZOS)
        diff = ImageStat.Stat(ImageChops.difference(img, reference)).mean
        # Measured: 3.1/255 (grey 2.3) for both paths, the 1/2-scale-and-resize one and the 3/8 one: the noise in
        # the picture and quality 85 make most of it.
        assert max(diff) < 3.6, diff
        if kind != "grey":
            assert is_red(mean(img, (0, 0, 20, 20)))

    def test_a_truncated_file_gets_the_same_error_as_before(self, tmp_path: Path) -> None:
        path = make_truncated(make_jpeg(tmp_path / "t.jpg", (1600, 1200)), keep=0.6)
        with pytest.raises(DecodeError, match=r"^t-truncated\.jpg: truncated JPEG"):
            encode(path, max_side=610, passthrough=False)

    def test_in_a_decoder_process_with_and_without_room_for_numpy(self, tmp_path: Path) -> None:
        from mmwatchd.isolate import Isolator

        path = make_jpeg(tmp_path / "big.jpg", (4000, 3000), detail=False)
        spec = ImageSpec(max_side=1536, passthrough=False)
        # Under the default-sized limit the M/8 path runs in the worker; under a 64 MiB one, where importing numpy
        # would kill the worker (OpenBLAS exits when its buffer does not fit), Pillow's path does the work.
        for memory_mb, width in ((1024, 1500), (64, 1536)):
            with Isolator(workers=1, timeout_s=60, memory_bytes=memory_mb * 2**20) as iso:
                part = iso.call(encode_image, path, spec, budget=BIG, limits=LIMITS, label=path.name)
            assert part.width == width, memory_mb


def _pillow_jpeg(img: Image.Image, quality: int, *, optimize: bool) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, optimize=optimize)
    return buf.getvalue()


class TestJpegOutput:
    """JPEG output over 1 MP: libjpeg's standard Huffman tables (a third of the CPU of optimising them), the same
    pixels; optimised tables below, where they save more and cost little."""

    @pytest.fixture(params=["photo", "picture", "grey"])
    def source(self, request: pytest.FixtureRequest) -> Image.Image:
        if request.param == "picture":
            return picture((1200, 900))
        photo = SHARED_MEDIA / "images" / "Landscape_0.jpg"
        if not photo.is_file():
            pytest.skip("shared media corpus not present")
        with Image.open(photo) as im:  # a real photo, scaled as the encoder would (off its 8x8 grid)
            img = im.convert("RGB").resize((1440, 960), Image.Resampling.LANCZOS)
        return img.convert("L") if request.param == "grey" else img

    @pytest.mark.parametrize("quality", [85, 60])
    def test_same_picture_as_with_optimised_tables(self, source: Image.Image, quality: int) -> None:
        data = save_image(source, "jpeg", quality)
        optimised = _pillow_jpeg(source, quality, optimize=True)
        assert data == _pillow_jpeg(source, quality, optimize=False)  # standard tables
        ours, theirs = Image.open(io.BytesIO(data)), Image.open(io.BytesIO(optimised))
        # Same quantisation tables, chroma subsampling (4:2:0, or one grey component), size and mode...
        assert ours.quantization == theirs.quantization  # type: ignore[attr-defined]
        assert ours.layer == theirs.layer  # type: ignore[attr-defined]
        assert (ours.size, ours.mode) == (theirs.size, theirs.mode) == (source.size, source.mode)
        # ...so the very same pixels: only the entropy coding differs...
        assert ours.tobytes() == theirs.tobytes()
        # ...for a few percent more bytes (measured here: 0.4-4% at quality 85, 2-8% at 60).
        assert len(optimised) < len(data) <= 1.1 * len(optimised)

    def test_optimised_tables_up_to_a_megapixel(self) -> None:
        for size in ((1000, 1000), (160, 90)):
            img = picture(size)
            assert save_image(img, "jpeg", 85) == _pillow_jpeg(img, 85, optimize=True), size
        img = picture((1001, 1000))
        assert save_image(img, "jpeg", 85) == _pillow_jpeg(img, 85, optimize=False)

    @pytest.mark.parametrize("orientation", [1, 6])
    def test_m8_decode_goes_to_the_encoder_in_its_own_rgbx(self, tmp_path: Path, orientation: int) -> None:
        # 3200x2400 to 1230 px decodes at 3/8 (1200x900, no resize) into RGBX: encoded (and turned) as it is, with
        # no RGB copy in between, to the same bytes as the RGB image would give; nothing else minds RGBX.
        import simplejpeg

        path = make_jpeg(tmp_path / "m8.jpg", (3200, 2400), orientation=orientation, corner=RED, detail=False)
        stored, floor = ((1230, 922), (1169, 876)) if orientation == 1 else ((922, 1230), (876, 1169))  # floor: 95%
        with path.open("rb") as fp, Image.open(fp) as im:
            assert _load_scaled(im, stored, slack=0.05, fp=fp, file_size=path.stat().st_size).mode == "RGBX"
        array = simplejpeg.decode_jpeg(  # type: ignore[attr-defined]
            path.read_bytes(), colorspace="RGB", min_width=floor[0], min_height=floor[1]
        )
        rgb = Image.fromarray(array)
        if orientation == 6:
            rgb = rgb.transpose(Image.Transpose.ROTATE_270)
        part = encode(path, max_side=1230, passthrough=False)
        assert part.chunks == (_pillow_jpeg(rgb, 85, optimize=False),)  # over 1 MP: standard Huffman tables
        assert (part.width, part.height) == (1200, 900) and part.quality == 85
        assert is_red(mean(decoded(part), (0, 0, 20, 20)))
        # The budget search lowers quality on the RGBX image, then scales it down: every result fits, in RGB.
        for budget, smaller in ((int(part.url_len * 0.95), False), (int(part.url_len * 0.15), True)):
            tight = encode(path, budget, max_side=1230, passthrough=False)
            img = decoded(tight)
            assert tight.url_len <= budget and tight.quality is not None and tight.quality < 85
            assert (img.mode, tight.width < 1200) == ("RGB", smaller)
            assert img.width / img.height == pytest.approx(4 / 3, rel=0.02)
            assert is_red(mean(img, (0, 0, 8, 8)))
        # PNG and WebP get RGB.
        for fmt in ("png", "webp"):
            img = decoded(encode(path, max_side=1230, passthrough=False, format=fmt))
            assert (img.mode, img.size) == ("RGB", (1200, 900)), fmt
            assert is_red(mean(img, (0, 0, 20, 20))), fmt
