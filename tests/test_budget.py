"""The one budget search both encoders run (``mmwatchd.encode.budget.fit``), on a size model instead of encodes.

The encoders' own tests (test_encode_image.py, test_encode_video.py) fit real pictures and frames; here the measured
total is a known function of quality and scale, so what each step gives up and how many encodes it takes are exact.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from mmwatchd.encode.budget import FRAMES, PICTURE, Step, Tuning, fit

WIDTH, HEIGHT = 1000, 750


def dims(scale: float) -> tuple[int, int]:
    return max(1, round(WIDTH * scale)), max(1, round(HEIGHT * scale))


class Sizes:
    """total = full * exp(slope * (quality - 85)) * (pixels / full pixels): JPEG-like, one payload per call."""

    def __init__(self, full: int = 200_000, slope: float = 0.03) -> None:
        self.full = full
        self.slope = slope
        self.calls: list[tuple[int | None, tuple[int, int]]] = []

    def __call__(self, quality: int | None, scale: float) -> tuple[int, str]:
        size = dims(scale)
        self.calls.append((quality, size))
        by_quality = 1.0 if quality is None else math.exp(self.slope * (quality - 85))
        total = int(self.full * by_quality * size[0] * size[1] / (WIDTH * HEIGHT))
        return total, f"q{quality} {size[0]}x{size[1]}"


@pytest.mark.parametrize("tuning", [PICTURE, FRAMES], ids=["picture", "frames"])
class TestFit:
    def test_what_fits_as_it_is_is_encoded_once(self, tuning: Tuning) -> None:
        sizes = Sizes()
        result = fit(sizes, 300_000, quality=85, min_quality=50, min_scale=0.05, dims=dims, tuning=tuning)
        assert (result.fits, result.quality, result.scale, result.steps) == (True, 85, 1.0, ())
        assert len(sizes.calls) == 1

    def test_quality_gives_first_and_the_step_is_recorded(self, tuning: Tuning) -> None:
        sizes = Sizes()
        result = fit(sizes, 120_000, quality=85, min_quality=50, min_scale=0.05, dims=dims, tuning=tuning)
        assert result.fits and result.scale == 1.0 and result.quality is not None
        assert 50 <= result.quality < 85
        assert result.total <= 120_000
        assert result.steps == (Step("quality", 85, result.quality),)
        assert result.payload == f"q{result.quality} 1000x750"
        assert len(sizes.calls) <= 1 + tuning.quality_trials

    def test_then_size_at_the_minimum_quality(self, tuning: Tuning) -> None:
        sizes = Sizes()
        result = fit(sizes, 20_000, quality=85, min_quality=50, min_scale=0.05, dims=dims, tuning=tuning)
        assert result.fits and result.quality == 50 and result.scale < 1.0
        assert result.total <= 20_000
        assert [s.what for s in result.steps] == ["quality", "scale"]
        assert result.steps[0] == Step("quality", 85, 50)
        assert all(q == 50 for q, size in sizes.calls if size != (WIDTH, HEIGHT))

    def test_a_format_without_quality_only_scales(self, tuning: Tuning) -> None:
        sizes = Sizes()
        result = fit(sizes, 50_000, quality=None, min_quality=50, min_scale=0.05, dims=dims, tuning=tuning)
        assert result.fits and result.quality is None
        assert [s.what for s in result.steps] == ["scale"]
        assert all(q is None for q, _size in sizes.calls)

    def test_nothing_fits_returns_the_smallest_measured(self, tuning: Tuning) -> None:
        sizes = Sizes(full=10**9)
        result = fit(sizes, 1_000, quality=85, min_quality=50, min_scale=0.1, dims=dims, tuning=tuning)
        assert not result.fits
        assert result.total > 1_000
        assert [s.what for s in result.steps] == ["quality", "scale"]
        if tuning.try_floor:  # frames end on the floor itself, whose payload the frame-count step needs
            assert result.scale == 0.1 and result.payload == "q50 100x75"


def test_only_frames_measure_the_floor_the_search_did_not_reach() -> None:
    """With too few trials to get there, a picture scales from the smallest total measured; frames measure the
    minimum quality first (and take it when it fits)."""
    # Size falls more slowly with quality than the prior says, so the one guess (quality 71) is still too big; only
    # quality 50 (49,268) fits.
    limit = 50_000
    picture = Sizes(full=70_000, slope=0.01)
    fit(
        picture,
        limit,
        quality=95,
        min_quality=50,
        min_scale=0.05,
        dims=dims,
        tuning=replace(PICTURE, quality_trials=1, scale_trials=1),
    )
    frames = Sizes(full=70_000, slope=0.01)
    result = fit(
        frames,
        limit,
        quality=95,
        min_quality=50,
        min_scale=0.05,
        dims=dims,
        tuning=replace(FRAMES, quality_trials=1, scale_trials=1),
    )
    assert (50, (WIDTH, HEIGHT)) not in picture.calls
    assert (50, (WIDTH, HEIGHT)) in frames.calls
    assert result.fits and result.quality == 50 and result.scale == 1.0
