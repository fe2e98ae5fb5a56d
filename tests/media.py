"""Real media files for tests, written into a folder the test owns (usually ``tmp_path``).

Every ``make_*`` helper writes one file at ``path`` (parent folders are created) and returns ``path``. Content is
deterministic for a given ``seed``. Sizes are *as displayed*: ``make_jpeg(p, (60, 40), orientation=6)`` stores
40x60 pixels tagged Orientation=6, which a viewer shows as the 60x40 picture :func:`picture` draws, so a test can
check where things land after orientation is applied.

``detail=True`` means photo-like, hard-to-compress content (seeded noise at two scales over gradients and shapes:
a 12 MP JPEG at quality 90 is ~4.5 MB, like a phone photo), so byte budgets are actually exercised;
``detail=False`` is flat colour and a few shapes, which compresses to almost nothing. Generation uses Pillow's C
primitives only (no per-pixel Python), ~0.3 s for 12 MP.
"""

from __future__ import annotations

import random
import struct
import zipfile
import zlib
from collections.abc import Sequence
from datetime import datetime
from fractions import Fraction
from pathlib import Path

from PIL import Image, ImageDraw, ImageStat

__all__ = [
    "FRAME_BITS",
    "INVERSE_ORIENTATION",
    "make_audio",
    "make_avif",
    "make_bmp",
    "make_empty",
    "make_gif",
    "make_heic",
    "make_jpeg",
    "make_named_text",
    "make_numbered_video",
    "make_pdf",
    "make_pixel_flood_png",
    "make_png",
    "make_tiff",
    "make_truncated",
    "make_video",
    "make_webp",
    "make_zip",
    "numbered_picture",
    "picture",
    "read_number",
]

Size = tuple[int, int]
RGB = tuple[int, int, int]

#: The transpose that turns a displayed picture into the stored pixels for each EXIF orientation
#: (the inverse of what a viewer, or ImageOps.exif_transpose, applies).
INVERSE_ORIENTATION: dict[int, Image.Transpose | None] = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def _prepare(path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def picture(size: Size, *, detail: bool = True, seed: int = 0, corner: RGB | None = None) -> Image.Image:
    """An RGB picture of ``size``; with ``corner``, a solid square of that colour in the top-left corner.

    The square's side is a quarter of the shorter side (at least 1 px). With ``detail`` the rest is noisy enough to
    be hard to compress; without it, flat colour and a few shapes.
    """
    width, height = size
    rng = random.Random(seed)
    if detail:
        ramp = Image.linear_gradient("L")
        base = Image.merge(
            "RGB", (ramp.resize(size), ramp.rotate(90).resize(size), Image.radial_gradient("L").resize(size))
        )
    else:
        base = Image.new("RGB", size, (90, 140, 200))
    draw = ImageDraw.Draw(base)
    for _ in range(24 if detail else 4):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        box = (x0, y0, x0 + rng.randrange(1, width // 2 + 2), y0 + rng.randrange(1, height // 2 + 2))
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    if detail:
        cw, ch = max(1, width // 6), max(1, height // 6)
        coarse = Image.frombytes("L", (cw, ch), rng.randbytes(cw * ch)).resize(size, Image.Resampling.BICUBIC)
        fine = Image.frombytes("L", size, rng.randbytes(width * height))
        base = Image.blend(base, Image.blend(coarse, fine, 0.5).convert("RGB"), 0.25)
    if corner is not None:
        side = max(1, min(width, height) // 4)
        ImageDraw.Draw(base).rectangle((0, 0, side - 1, side - 1), fill=corner)
    return base


def _exif(orientation: int | None, taken: datetime | str | None) -> Image.Exif:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    if taken is not None:
        stamp = taken.strftime("%Y:%m:%d %H:%M:%S") if isinstance(taken, datetime) else taken
        exif[306] = stamp  # DateTime, IFD0
        exif.get_ifd(0x8769)[36867] = stamp  # DateTimeOriginal, Exif IFD
    return exif


def _stored(img: Image.Image, orientation: int | None) -> Image.Image:
    transpose = INVERSE_ORIENTATION.get(orientation or 1)
    return img.transpose(transpose) if transpose is not None else img


def make_jpeg(
    path: Path,
    size: Size = (64, 48),
    *,
    orientation: int | None = None,
    mode: str = "RGB",
    taken: datetime | str | None = None,
    quality: int = 90,
    detail: bool = True,
    seed: int = 0,
    corner: RGB | None = None,
    progressive: bool = False,
) -> Path:
    """A JPEG showing ``picture(size)`` (``mode`` "RGB", "L" or "CMYK"), with optional EXIF.

    ``orientation`` (0-8; 0 and others outside 1-8 are written as is) stores transposed pixels so the picture is
    upright once the tag is applied. ``taken`` sets DateTimeOriginal and DateTime ("YYYY:MM:DD HH:MM:SS" strings
    are written verbatim, so invalid ones can be tested).
    """
    path = _prepare(path)
    img = _stored(picture(size, detail=detail, seed=seed, corner=corner), orientation).convert(mode)
    exif = _exif(orientation, taken)
    img.save(path, "JPEG", quality=quality, progressive=progressive, exif=exif.tobytes() if len(exif) else b"")
    return path


def make_png(
    path: Path,
    size: Size = (64, 48),
    *,
    mode: str = "RGB",
    transparency: int | RGB | None = None,
    detail: bool = True,
    seed: int = 0,
    corner: RGB | None = None,
    orientation: int | None = None,
) -> Path:
    """A PNG in ``mode``:

    - "RGB", "L", "1": the picture; ``transparency`` adds a tRNS colour key (an RGB tuple or a grey level);
    - "RGBA", "LA": alpha ramps from 0 (left edge) to 255 (right edge);
    - "P": up to 256 colours (quantised picture); ``transparency`` is the palette index made transparent;
    - "I;16": 16-bit grey over the full 0..65535 range (the picture's grey × 257); ``transparency`` is a grey
      level (0..65535) made transparent by tRNS.

    ``orientation`` writes an eXIf chunk and stores the pixels transposed, as :func:`make_jpeg` does.
    """
    path = _prepare(path)
    rgb = _stored(picture(size, detail=detail, seed=seed, corner=corner), orientation)
    params: dict[str, object] = {}
    if mode in ("RGB", "L", "1"):
        img = rgb.convert(mode)
        if transparency is not None:
            params["transparency"] = transparency
    elif mode in ("RGBA", "LA"):
        img = rgb.convert(mode[:-1])
        img.putalpha(Image.linear_gradient("L").rotate(90).resize(img.size))
        img = img.convert(mode)
    elif mode == "P":
        img = rgb.quantize(256)
        if transparency is not None:
            params["transparency"] = transparency
    elif mode == "I;16":
        img = rgb.convert("L").convert("I").point(lambda v: v * 257).convert("I;16")
        if transparency is not None:
            params["transparency"] = transparency
    else:
        raise ValueError(f"make_png: unsupported mode {mode!r}")
    exif = _exif(orientation, None)
    if len(exif):
        params["exif"] = exif.tobytes()
    img.save(path, "PNG", **params)
    return path


def make_heic(path: Path, size: Size = (64, 48), *, quality: int = 60, detail: bool = True, seed: int = 0,
              corner: RGB | None = None, thumbnails: Sequence[int] = ()) -> Path:  # fmt: skip
    """A HEIC (HEVC) still image, via pillow-heif's encoder; ``thumbnails``: longest sides of embedded thumbnails.

    x265's fastest preset: its default spends 4 s on a 2000x1500 test picture, this 0.5 s, for a file just as valid.
    """
    import pillow_heif

    pillow_heif.register_heif_opener()
    path = _prepare(path)
    img = picture(size, detail=detail, seed=seed, corner=corner)
    img.save(path, "HEIF", quality=quality, thumbnails=list(thumbnails), enc_params={"preset": "ultrafast"})
    return path


def make_avif(path: Path, size: Size = (64, 48), *, quality: int = 60, detail: bool = True, seed: int = 0,
              corner: RGB | None = None) -> Path:  # fmt: skip
    """An AVIF still image, via Pillow's own encoder."""
    path = _prepare(path)
    picture(size, detail=detail, seed=seed, corner=corner).save(path, "AVIF", quality=quality, speed=10)
    return path


def make_gif(path: Path, size: Size = (64, 48), *, frames: int = 1, transparency: bool = False,
             detail: bool = False, seed: int = 0, corner: RGB | None = None) -> Path:  # fmt: skip
    """A GIF; with ``frames`` > 1 an animation whose frame *i* uses seed ``seed + i`` (only frame 0 has ``corner``).

    ``transparency`` makes palette index 0 transparent.
    """
    path = _prepare(path)
    images = [
        picture(size, detail=detail, seed=seed + i, corner=corner if i == 0 else None).quantize(255)
        for i in range(frames)
    ]
    params: dict[str, object] = {"transparency": 0} if transparency else {}
    images[0].save(path, "GIF", save_all=frames > 1, append_images=images[1:], duration=100, loop=0, **params)
    return path


def make_webp(path: Path, size: Size = (64, 48), *, frames: int = 1, mode: str = "RGB", lossless: bool = False,
              quality: int = 80, detail: bool = True, seed: int = 0, corner: RGB | None = None) -> Path:  # fmt: skip
    """A WebP ("RGB" or "RGBA", alpha ramping left to right); ``frames`` > 1 writes an animation."""
    path = _prepare(path)
    images = []
    for i in range(frames):
        img = picture(size, detail=detail, seed=seed + i, corner=corner if i == 0 else None)
        if mode == "RGBA":
            img.putalpha(Image.linear_gradient("L").rotate(90).resize(size))
        images.append(img)
    images[0].save(path, "WEBP", save_all=frames > 1, append_images=images[1:], lossless=lossless,
                   quality=quality, duration=100)  # fmt: skip
    return path


def make_tiff(path: Path, size: Size = (64, 48), *, mode: str = "RGB", pages: int = 1,
              compression: str | None = "tiff_deflate", detail: bool = True, seed: int = 0,
              corner: RGB | None = None, orientation: int | None = None) -> Path:  # fmt: skip
    """A TIFF in ``mode``; ``pages`` > 1 writes a multi-page file (page *i*: seed + i).

    "RGB", "L", "CMYK", "RGBA", ...: the picture converted; "I;16", "I": grey × 257 (16-bit range);
    "F": grey / 255 (0.0..1.0 floats).
    """
    path = _prepare(path)
    images = []
    for i in range(pages):
        rgb = _stored(picture(size, detail=detail, seed=seed + i, corner=corner if i == 0 else None), orientation)
        if mode.startswith("I"):
            images.append(rgb.convert("L").convert("I").point(lambda v: v * 257).convert(mode))
        elif mode == "F":
            images.append(rgb.convert("L").convert("F").point(lambda v: v / 255))
        else:
            images.append(rgb.convert(mode))
    params: dict[str, object] = {"compression": compression} if compression else {}
    exif = _exif(orientation, None)
    if len(exif):
        params["exif"] = exif.tobytes()
    images[0].save(path, "TIFF", save_all=pages > 1, append_images=images[1:], **params)
    return path


def make_bmp(path: Path, size: Size = (64, 48), *, mode: str = "RGB", detail: bool = True, seed: int = 0,
             corner: RGB | None = None) -> Path:  # fmt: skip
    """A BMP ("RGB", "L", "P" or "1")."""
    path = _prepare(path)
    picture(size, detail=detail, seed=seed, corner=corner).convert(mode).save(path, "BMP")
    return path


def make_empty(path: Path) -> Path:
    """A zero-byte file (what a copy looks like the instant it starts)."""
    path = _prepare(path)
    path.write_bytes(b"")
    return path


def make_truncated(source: Path, path: Path | None = None, *, keep: float | int = 0.5) -> Path:
    """The first part of ``source``: ``keep`` bytes (int) or that fraction of it (float), at ``path``.

    Without ``path``, writes ``<stem>-truncated<suffix>`` beside ``source``.
    """
    data = Path(source).read_bytes()
    n = keep if isinstance(keep, int) else int(len(data) * keep)
    path = _prepare(path or Path(source).with_name(f"{Path(source).stem}-truncated{Path(source).suffix}"))
    path.write_bytes(data[:n])
    return path


def make_named_text(path: Path, text: str = "This is not a photo.\n") -> Path:
    """A text file, typically under an image's name (``notes.jpg``)."""
    path = _prepare(path)
    path.write_text(text, encoding="utf-8")
    return path


def make_pdf(path: Path) -> Path:
    """A minimal one-page PDF."""
    path = _prepare(path)
    path.write_bytes(
        b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Count 1/Kids[3 0 R]>>endobj\n"
        b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 72 72]>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
    )
    return path


def make_zip(path: Path, members: Sequence[str] = ("IMG_0001.jpg",)) -> Path:
    """A ZIP archive holding small text members with the given names."""
    path = _prepare(path)
    with zipfile.ZipFile(path, "w") as archive:
        for member in members:
            archive.writestr(member, "not really an image\n")
    return path


def _png_chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def make_pixel_flood_png(path: Path, width: int = 50_000, height: int = 50_000) -> Path:
    """A tiny, valid-looking PNG whose header declares ``width`` x ``height`` grey pixels (a decompression bomb).

    Only the first rows' worth of image data is present, so anything that decodes it either allocates the full
    size first or fails as truncated; a size check on the header must refuse it before either happens.
    """
    path = _prepare(path)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (min(width, 4096) + 1) * 4)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    )
    return path


_CONTAINERS = {
    ".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".avi": "avi",
    ".ts": "mpegts", ".mts": "mpegts", ".mpg": "mpeg", ".mpeg": "mpeg", ".wmv": "asf", ".asf": "asf",
    ".flv": "flv", ".3gp": "3gp",
}  # fmt: skip
_DEFAULT_CODECS = {"webm": "libvpx-vp9", "mpeg": "mpeg2video", "mpegts": "mpeg2video", "asf": "wmv2", "flv": "flv",
                   "3gp": "h263"}  # fmt: skip


def make_video(path: Path, size: Size = (64, 48), *, frames: int = 6, fps: int = 6, codec: str | None = None,
               container: str | None = None, detail: bool = False, seed: int = 0) -> Path:  # fmt: skip
    """A short video written with PyAV; the container comes from the suffix (.mp4 .mov .mkv .webm .avi .ts .mpg
    .wmv .flv .3gp) unless ``container`` names one.

    Default codecs are built into every FFmpeg: mpeg4 (MP4/MOV/MKV/AVI), libvpx-vp9 (WebM, falling back to libvpx),
    mpeg2video (MPEG-PS/TS), wmv2, flv, h263 (3GP: ``size`` must then be an H.263 size such as 176x144).
    Frame *i* shows ``picture(size, seed=seed + i)``; ``size`` must be even for yuv420p.
    """
    import av

    path = _prepare(path)
    fmt = container or _CONTAINERS[path.suffix.lower()]
    name = codec or _DEFAULT_CODECS.get(fmt, "mpeg4")
    if name == "libvpx-vp9" and name not in av.codecs_available:
        name = "libvpx"
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(name, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_image(picture(size, detail=detail, seed=seed + i))
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


# ---------------------------------------------------------------------------------------------------- numbered video

#: Bits :func:`numbered_picture` encodes (frame numbers 0..255).
FRAME_BITS = 8


def numbered_picture(number: int, size: Size = (160, 120), *, detail: bool = False, seed: int = 0) -> Image.Image:
    """A picture that says which frame it is, readable back after JPEG and downscaling (:func:`read_number`).

    Top half: ``FRAME_BITS`` vertical stripes, left to right bit 0 upwards, white for 1 and black for 0. Bottom half:
    a red block in the left quarter (it shows where "bottom left" ended up after rotation), then grey, or with
    ``detail`` the hard-to-compress :func:`picture` content, so byte budgets bite.
    """
    width, height = size
    img = Image.new("RGB", size, (110, 110, 110))
    if detail:
        img.paste(picture((width, height - height // 2), detail=True, seed=seed + number), (0, height // 2))
    draw = ImageDraw.Draw(img)
    for bit in range(FRAME_BITS):
        x0, x1 = bit * width // FRAME_BITS, (bit + 1) * width // FRAME_BITS - 1
        draw.rectangle((x0, 0, x1, height // 2 - 1), fill=(255, 255, 255) if number >> bit & 1 else (0, 0, 0))
    draw.rectangle((0, height // 2, max(0, width // 4 - 1), height - 1), fill=(255, 0, 0))
    return img


def read_number(img: Image.Image) -> int:
    """The frame number :func:`numbered_picture` drew into ``img`` (any size, upright)."""
    grey = img.convert("L")
    width, height = grey.size
    number = 0
    for bit in range(FRAME_BITS):
        x0, x1 = bit * width / FRAME_BITS, (bit + 1) * width / FRAME_BITS
        margin = (x1 - x0) / 4
        box = (round(x0 + margin), height // 8, max(round(x0 + margin) + 1, round(x1 - margin)), 3 * height // 8)
        if ImageStat.Stat(grey.crop(box)).mean[0] > 128:
            number |= 1 << bit
    return number


def make_numbered_video(path: Path, size: Size = (160, 120), *, frames: int = 40, fps: int = 10,
                        codec: str | None = None, container: str | None = None, gop: int | None = None,
                        pts_ms: Sequence[int] | None = None, rotation: int | None = None,
                        options: dict[str, str] | None = None, detail: bool = False,
                        bit_rate: int | None = None) -> Path:  # fmt: skip
    """A video whose frame *i* shows :func:`numbered_picture` *i* (as displayed).

    ``gop`` sets the keyframe interval (frames); ``pts_ms`` gives each frame's time in milliseconds (variable frame
    rate; ``frames`` is then its length); ``rotation`` writes a display matrix (FFmpeg's convention: degrees
    counter-clockwise, so -90 is what phones write for portrait) and stores the pixels turned the other way, so the
    clip shows ``size`` upright once the matrix is applied. ``options`` are muxer options (``{"movflags":
    "faststart"}``); ``bit_rate`` (bits/s) keeps ``detail`` from being smoothed away by the encoder.

    The container comes from the suffix as for :func:`make_video`, plus ``.h264``/``.m4v`` for raw elementary
    streams (libx264/mpeg4) without any container timing.
    """
    import av

    path = _prepare(path)
    suffix = path.suffix.lower()
    raw = {".h264": ("h264", "libx264"), ".m4v": ("m4v", "mpeg4")}
    fmt = container or (raw[suffix][0] if suffix in raw else _CONTAINERS[suffix])
    name = codec or (raw[suffix][1] if suffix in raw else _DEFAULT_CODECS.get(fmt, "mpeg4"))
    if name == "libvpx-vp9" and name not in av.codecs_available:
        name = "libvpx"
    times = list(pts_ms) if pts_ms is not None else None
    count = len(times) if times is not None else frames
    stored = size if rotation is None or rotation % 180 == 0 else (size[1], size[0])
    with av.open(str(path), "w", format=fmt, options=options or {}) as out:
        stream = out.add_stream(name, rate=fps)
        stream.width, stream.height = stored
        stream.pix_fmt = "yuv420p"
        if gop is not None:  # exactly every ``gop`` frames: no extra keyframes at scene changes
            stream.codec_context.gop_size = gop
            stream.options = {"sc_threshold": "1000000000"}
        if bit_rate is not None:
            stream.codec_context.bit_rate = bit_rate
        if times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
            stream.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(count):
            img = numbered_picture(i, size, detail=detail)
            if rotation:
                img = img.rotate(-rotation, expand=True)  # the display matrix turns it back by +rotation
            frame = av.VideoFrame.from_image(img)
            if times is not None:
                frame.pts, frame.time_base = times[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def make_audio(path: Path, seconds: float = 1.0, *, container: str | None = None) -> Path:
    """An audio-only file (AAC silence), e.g. under a video's name (``clip.mp4``)."""
    import av

    path = _prepare(path)
    fmt = container or _CONTAINERS.get(path.suffix.lower(), "mp4")
    rate, samples = 44100, 1024
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream("aac", rate=rate)
        stream.layout = "mono"
        for i in range(max(1, int(seconds * rate / samples))):
            frame = av.AudioFrame(format="fltp", layout="mono", samples=samples)
            frame.planes[0].update(bytes(frame.planes[0].buffer_size))
            frame.sample_rate, frame.pts = rate, i * samples
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


#: Where make_with_metadata's photos say they were taken (a GPS position the server must never see by default).
GPS_LATITUDE = (52.0, 31.0, 12.5)
XMP_PACKET = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description photoshop:City="Secretville"/></rdf:RDF></x:xmpmeta>'


def make_with_metadata(path: Path, fmt: str, *, progressive: bool = False) -> Path:
    """A small upright JPEG, PNG, WebP or GIF carrying EXIF with GPS, XMP and a comment (and an sRGB ICC profile
    where the format has one): what a phone photo shared from a gallery app looks like to mmwatchd."""
    from PIL import ImageCms, PngImagePlugin

    path = _prepare(path)
    img = picture((64, 48), detail=True)
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"
    exif[0x0112] = 1
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2], gps[3], gps[4] = "N", GPS_LATITUDE, "E", (13.0, 24.0, 36.0)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    if fmt == "jpeg":
        img.save(path, "JPEG", exif=exif, xmp=XMP_PACKET, comment=b"taken at home", icc_profile=icc,
                 progressive=progressive, quality=90)  # fmt: skip
    elif fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text("Comment", "taken at home")
        info.add_itxt("XML:com.adobe.xmp", XMP_PACKET.decode())
        img.save(path, "PNG", pnginfo=info, exif=exif, icc_profile=icc)
    elif fmt == "webp":
        img.save(path, "WEBP", exif=exif, xmp=XMP_PACKET, icc_profile=icc, quality=80)
    elif fmt == "gif":
        img.quantize(255).save(path, "GIF", comment=b"taken at home", xmp=XMP_PACKET)
    else:
        raise ValueError(fmt)
    return path
