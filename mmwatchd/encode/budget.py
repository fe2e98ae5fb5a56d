"""Fitting encoded parts under a data-URL budget: the one search both encoders run, its tuning, and the data-URL
arithmetic.

What gives, in this order and only as far as needed (:func:`fit`):

1. quality (JPEG/WebP; PNG has none), toward the minimum quality, predicted from the measured totals (log size is
   close to linear in quality): typically 2-3 encodes;
2. size, all parts alike, predicted as total ~ scale^e (e = 2 until two sizes are measured), down to a floor scale;
3. (video only, in :mod:`mmwatchd.encode.video`) part count at the floor size: exact, from the sizes measured there.

Sizes are predicted, then measured: each guess aims a little under the limit, and a result that uses most of it is
accepted rather than spending more encodes on the last few percent. Each step given up is recorded (:class:`Step`).
One picture and a clip's frames differ in how hard they search and how a guess becomes a value to try: see
:class:`Tuning`, :data:`PICTURE` and :data:`FRAMES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Generic, Literal, TypeVar

from mmwatchd.model import b64_len, data_url_prefix

__all__ = [
    "FRAMES",
    "GOOD_ENOUGH",
    "PICTURE",
    "QUALITY_SLOPE",
    "SCALE_EXPONENT",
    "Budget",
    "Fitted",
    "FrameRoom",
    "Step",
    "Tuning",
    "fit",
    "max_payload",
]

#: A fit that uses this share of the limit ends the search.
GOOD_ENOUGH: Final = 0.85
#: d ln(size) / d quality for JPEG/WebP between quality 50 and 95, before two sizes are measured (photos: 0.02-0.03;
#: the low end makes the first guess err towards fitting).
QUALITY_SLOPE: Final = 0.02
#: size ~ scale**exponent (linear scale) before two sizes are measured: 2 (size ~ pixel count) is right for
#: detailed images; flat ones shrink more slowly, which the measured exponent then corrects.
SCALE_EXPONENT: Final = 2.0
#: The measured scale exponent is kept in this range (one noisy pair of sizes must not send a guess far off).
_EXPONENT_RANGE: Final = (0.5, 4.0)

#: Data-URL characters available when a clip is sent as ``n`` parts (decreasing in ``n``: each part costs JSON).
Budget = Callable[[int], int]

P = TypeVar("P")
#: (value, measured total, payload).
_Measured = tuple[float, int, P]


@dataclass(frozen=True, slots=True)
class Tuning:
    """How hard one kind of search works, and how a predicted value becomes the next one to encode."""

    #: Each guess aims at this share of the limit.
    aim: float
    #: Encodes the quality step may spend after the first one, and the size step.
    quality_trials: int
    scale_trials: int
    #: ``"step"``: a guess is kept strictly between the nearest fit and the nearest value too big (at least one
    #: quality step or one pixel from each); the search ends when no such value is left, or when a fit measures no
    #: smaller than a value too big (the model no longer holds). ``"halve"``: a guess is kept within the two; one
    #: that encodes like a value already tried is replaced by the midpoint, and a model that no longer holds falls
    #: back on its prior.
    guess: Literal["step", "halve"]
    #: When a step's search ends without a fit (out of trials, say), measure its floor value (the minimum quality,
    #: the smallest size) before giving the step up; else the next step starts from the smallest total measured.
    try_floor: bool
    #: The smallest d ln(total) / d quality a quality guess is predicted with.
    min_quality_rate: float


#: One picture: aim a little under the budget; an encode is cheap, so search finely.
PICTURE: Final = Tuning(aim=0.97, quality_trials=4, scale_trials=10, guess="step", try_floor=False,
                        min_quality_rate=0.0)  # fmt: skip
#: A clip's frames: more margin (every guess encodes every frame, so one wrong guess costs more) and fewer tries.
FRAMES: Final = Tuning(aim=0.95, quality_trials=4, scale_trials=5, guess="halve", try_floor=True,
                       min_quality_rate=1e-3)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Step:
    """One thing given up to fit: ``what`` went from ``before`` to ``after`` (for a size: the scale, 1.0 first)."""

    what: Literal["quality", "scale", "count"]
    before: float
    after: float


@dataclass(frozen=True, slots=True)
class Fitted(Generic[P]):
    """What :func:`fit` ends with: the parts that fit, or (``fits`` false) the smallest encoding measured."""

    payload: P
    total: int
    quality: int | None
    scale: float
    steps: tuple[Step, ...]
    fits: bool


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


def fit(measure: Callable[[int | None, float], tuple[int, P]], limit: int, *, quality: int | None, min_quality: int,
        min_scale: float, dims: Callable[[float], tuple[int, int]], tuning: Tuning) -> Fitted[P]:  # fmt: skip
    """Give up quality, then size, as far as needed for the measured total to fit ``limit``.

    ``measure(quality, scale)`` encodes every part at that quality (None: a format without one) and linear scale
    (1.0: as they are) and returns the total to compare with ``limit`` and the payload; ``dims(scale)`` is the pixel
    size a scale encodes at (scales with the same size encode identically and are tried once at most). Quality goes
    from ``quality`` toward ``min_quality``, scale from 1.0 toward ``min_scale``. Nothing is raised: a result that
    does not fit says so (``fits``), for the caller's own last step or error.
    """
    total, payload = measure(quality, 1.0)
    if total <= limit:
        return Fitted(payload, total, quality, 1.0, (), fits=True)
    steps: list[Step] = []
    start: _Measured[P] = (1.0, total, payload)
    if quality is not None and min_quality < quality:
        by_quality = _Knob(lowest=min_quality, rate=QUALITY_SLOPE, power_law=False, snap=math.floor, key=int,
                           below=lambda q: q - 1, above=lambda q: q + 1, min_rate=tuning.min_quality_rate)  # fmt: skip
        found, smallest = _search(lambda q: measure(int(q), 1.0), limit, (quality, total, payload), by_quality,
                                  tuning, tuning.quality_trials)  # fmt: skip
        if found is None and tuning.try_floor:
            found, smallest = _at_floor(lambda: measure(min_quality, 1.0), min_quality, limit)
        if found is not None:
            steps.append(Step("quality", quality, found[0]))
            return Fitted(found[2], found[1], int(found[0]), 1.0, tuple(steps), fits=True)
        steps.append(Step("quality", quality, min_quality))
        quality = min_quality
        start = (1.0, smallest[1], smallest[2])  # at scale 1: the smallest total measured, at (or nearest) the floor

    full = dims(1.0)
    if dims(min_scale) == full:  # nothing smaller to try
        return Fitted(start[2], start[1], quality, 1.0, tuple(steps), fits=False)
    longest = max(full)
    at_quality = quality
    by_scale = _Knob(lowest=min_scale, rate=SCALE_EXPONENT, power_law=True, snap=_same, key=dims,
                     below=lambda s: (max(dims(s)) - 1) / longest, above=_same, min_rate=0.0)  # fmt: skip
    found, smallest = _search(lambda s: measure(at_quality, s), limit, start, by_scale, tuning, tuning.scale_trials)
    if found is None and tuning.try_floor:
        found, smallest = _at_floor(lambda: measure(at_quality, min_scale), min_scale, limit)
    steps.append(Step("scale", 1.0, found[0] if found is not None else min_scale))
    if found is not None:
        return Fitted(found[2], found[1], quality, found[0], tuple(steps), fits=True)
    return Fitted(smallest[2], smallest[1], quality, smallest[0], tuple(steps), fits=False)


def _same(value: float) -> float:
    return value


@dataclass(frozen=True, slots=True)
class _Knob:
    """One thing a search turns: quality (total ~ exp(rate * quality)) or linear scale (``power_law``: total ~
    scale^rate)."""

    lowest: float
    rate: float  # before two measurements say otherwise
    power_law: bool
    snap: Callable[[float], float]  # a predicted value -> one that can be encoded
    key: Callable[[float], object]  # values with the same key encode identically
    below: Callable[[float], float]  # ("step") the largest value worth trying under one too big
    above: Callable[[float], float]  # ("step") the smallest value worth trying over one that fits
    min_rate: float


def _at_floor(measure: Callable[[], tuple[int, P]], floor: float,
              limit: int) -> tuple[_Measured[P] | None, _Measured[P]]:  # fmt: skip
    total, payload = measure()
    return ((floor, total, payload) if total <= limit else None), (floor, total, payload)


def _search(measure: Callable[[float], tuple[int, P]], limit: int, start: _Measured[P], knob: _Knob, tuning: Tuning,
            trials: int) -> tuple[_Measured[P] | None, _Measured[P]]:  # fmt: skip
    """The largest value in ``[knob.lowest, start)`` whose measured total fits ``limit`` (None when none was found),
    and the smallest measurement too big.

    Each guess is predicted from the two nearest measurements (``knob.rate`` until there are two), aiming at
    ``tuning.aim * limit``; a fit that uses :data:`GOOD_ENOUGH` of the limit ends the search.
    """
    step = tuning.guess == "step"
    over: list[_Measured[P]] = [start]  # measured too big, by decreasing value
    fit: _Measured[P] | None = None
    tried = {knob.key(start[0])}
    for _ in range(trials):
        high, high_total, _payload = over[-1]
        if fit is not None:
            low, low_total, _fit_payload = fit
            if low_total >= GOOD_ENOUGH * limit:
                break
            rise = _rate(high, high_total, low, low_total, knob)
            if rise is None:
                if step:
                    break
                rise = knob.rate
            base, base_total, bottom = low, low_total, knob.above(low) if step else low
        else:
            measured = _rate(over[-2][0], over[-2][1], high, high_total, knob) if len(over) > 1 else None
            rise = knob.rate if measured is None else measured
            base, base_total, bottom = high, high_total, knob.lowest
        ratio = tuning.aim * limit / base_total
        guess = base * ratio ** (1 / rise) if knob.power_law else base + math.log(ratio) / rise
        if step:
            candidates = [knob.snap(max(min(guess, knob.below(high)), bottom))]
        else:
            candidates = [knob.snap(min(max(guess, bottom), high)), knob.snap((bottom + high) / 2)]
        value = next((v for v in candidates if bottom <= v < high and knob.key(v) not in tried), None)
        if value is None:
            break
        tried.add(knob.key(value))
        total, payload = measure(value)
        if total <= limit:
            fit = (value, total, payload)
        else:
            over.append((value, total, payload))
    return fit, over[-1]


def _rate(high: float, high_total: int, low: float, low_total: int, knob: _Knob) -> float | None:
    """d ln(total) / d value (or d ln(total) / d ln(value)) between two measurements; None when they do not show one
    (the larger value measured no bigger)."""
    if high_total <= low_total or high <= low or low <= 0:
        return None
    if knob.power_law:
        return min(_EXPONENT_RANGE[1], max(_EXPONENT_RANGE[0], math.log(high_total / low_total) / math.log(high / low)))
    return max(knob.min_rate, math.log(high_total / low_total) / (high - low))
