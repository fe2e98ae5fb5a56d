"""The seed of this run's fuzzing: ``MMWATCHD_FUZZ_SEED`` when set, else a fresh one, printed in pytest's header.

A fresh seed each run keeps finding new inputs; printing it (and naming it in every fuzz failure) makes any failure
repeatable with ``MMWATCHD_FUZZ_SEED=<seed> python -m pytest tests/test_fuzz.py``. One module, so the header and the
test agree on the value.
"""

from __future__ import annotations

import os
import secrets

ENV = "MMWATCHD_FUZZ_SEED"


def _seed() -> int:
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return secrets.randbelow(2**32)
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{ENV}={raw!r}: must be an integer, as printed in a previous run's header") from None


SEED = _seed()


def repeat_hint() -> str:
    return f"{ENV}={SEED} python -m pytest tests/test_fuzz.py"
