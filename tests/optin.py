"""Opt-in test markers: a test that needs a real server or a container runs when its variable is set or when the
``-m`` expression names its marker without negating it."""

from __future__ import annotations

import os
import re

import pytest


def opted_in(config: pytest.Config, marker: str, variable: str) -> bool:
    """``variable=1``, or a ``-m`` expression that names ``marker`` without negating it."""
    if os.environ.get(variable) == "1":
        return True
    return re.search(rf"(?<!not )\b{marker}\b", config.getoption("markexpr", "") or "") is not None
