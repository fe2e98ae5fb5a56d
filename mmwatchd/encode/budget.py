"""Fitting encoded parts under a data-URL budget: the shared model of how size follows quality and scale, the search
that predicts a quality or scale from measured sizes, and the data-URL arithmetic.

Sizes are predicted, then measured: each guess aims a little under the budget, and a result that uses most of it
is accepted rather than spending more encodes on the last few percent. :func:`mmwatchd.encode.image.fit_budget`
(one picture) and the video encoder's ``_fit`` (many frames, then fewer frames) degrade in their own order and record
each step; both use the tuning below.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Final, Literal, TypeVar

from mmwatchd.model import b64_len, data_url_prefix

__all__ = ["GOOD_ENOUGH", "QUALITY_SLOPE", "SCALE_EXPONENT", "Budget", "FrameRoom", "max_payload", "search", "slope"]

#: A fit that uses this share of the limit ends the search.
GOOD_ENOUGH: Final = 0.85
#: d ln(size) / d quality for JPEG/WebP between quality 50 and 95, before two sizes are measured (photos: 0.02-0.03;
#: the low end makes the first guess err towards fitting).
QUALITY_SLOPE: Final = 0.02
#: size ~ scale**exponent (linear scale) before two sizes are measured: 2 (size ~ pixel count) is right for
#: detailed images; flat ones shrink more slowly, which the measured exponent then corrects.
SCALE_EXPONENT: Final = 2.0

#: Data-URL characters available when a clip is sent as ``n`` parts (decreasing in ``n``: each part costs JSON).
Budget = Callable[[int], int]

T = TypeVar("T")


def max_payload(mime: str, budget: int) -> int:
    """Most payload bytes whose data URL fits in ``budget`` characters (inverse of ``data_url_len``)."""
    room = budget - len(data_url_prefix(mime))
    return max(0, room // 4 * 3)  # b64_len(n) == 4 * ceil(n / 3): whole groups of 3 bytes


class FrameRoom:
    """Data-URL arithmetic for video frames sent in one mode: how many base64 characters ``n`` frames may use
    (``video_url``: one part, one prefix, commas between frames; ``images``: one part and one prefix per frame)."""

    def __init__(self, mode: Literal["video_url", "images"], fmt: str, budget: Budget) -> None:
        self.mode = mode
        self.mime = f"video/{fmt}" if mode == "video_url" else f"image/{fmt}"
        self.prefix = len(data_url_prefix(self.mime))
        self._budget = budget
        self._cache: dict[int, int] = {}

    def budget(self, frames: int) -> int:
        parts = 1 if self.mode == "video_url" else frames
        if parts not in self._cache:
            self._cache[parts] = self._budget(parts)
        return self._cache[parts]

    def room(self, frames: int) -> int:
        if self.mode == "video_url":
            return self.budget(frames) - self.prefix - (frames - 1)  # one prefix, commas between frames
        return self.budget(frames) - frames * self.prefix

    @staticmethod
    def chars(sizes: Sequence[int]) -> int:
        return sum(b64_len(s) for s in sizes)


def search(measure: Callable[[float], tuple[int, T]], limit: int, start: float, start_total: int, *,
            lowest: float, rate: float, power_law: bool, aim: float, trials: int,
            snap: Callable[[float], float], key: Callable[[float], object]) -> tuple[float, int, T] | None:  # fmt: skip
    """Largest parameter value in ``[lowest, start)`` whose measured total fits ``limit``, or None.

    The parameter is a quality (total ~ exp(rate * quality)) or a linear scale (``power_law``: total ~ scale^rate).
    Each guess is predicted from the two nearest measurements (``rate`` until there are two), aiming at
    ``aim * limit``; a fit that uses :data:`GOOD_ENOUGH` of the limit ends the search. ``snap`` turns a guess into a
    value that can be encoded, ``key`` tells which values encode identically (tried once at most).
    """
    over = [(start, start_total)]  # measured too big, by decreasing value
    fit: tuple[float, int, T] | None = None
    tried = {key(start)}
    for _ in range(trials):
        high, high_total = over[-1]
        if fit is not None:
            low, low_total, _payload = fit
            if low_total >= GOOD_ENOUGH * limit:
                break
            rise = slope(high, high_total, low, low_total, power_law, rate)
            base, base_total, bottom = low, low_total, low
        else:
            rise = slope(*over[-2], high, high_total, power_law, rate) if len(over) > 1 else rate
            base, base_total, bottom = high, high_total, lowest
        ratio = aim * limit / base_total
        guess = base * ratio ** (1 / rise) if power_law else base + math.log(ratio) / rise
        candidates = [snap(min(max(guess, bottom), high)), snap((bottom + high) / 2)]
        value = next((v for v in candidates if bottom <= v < high and key(v) not in tried), None)
        if value is None:
            break
        tried.add(key(value))
        total, payload = measure(value)
        if total <= limit:
            fit = (value, total, payload)
        else:
            over.append((value, total))
    return fit


def slope(high: float, high_total: int, low: float, low_total: int, power_law: bool, default: float) -> float:
    """d ln(total) / d value (or d ln(total) / d ln(value)) between two measurements; ``default`` if not usable."""
    if high_total <= low_total or high <= low or low <= 0:
        return default
    if power_law:
        return min(4.0, max(0.5, math.log(high_total / low_total) / math.log(high / low)))
    return max(1e-3, math.log(high_total / low_total) / (high - low))
