"""Config values for the Prometheus metrics (issue 14): ``Config.metrics: MetricsSpec | None = None``.

Off unless set. Validated by pydantic straight from this dataclass, like those in :mod:`mmwatchd.model`: an unknown
key or a malformed ``listen`` is reported at its key when the config is loaded; a port that is taken is reported when
the service starts (only binding can tell).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator

from mmwatchd.model import _STRICT


def split_listen(value: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9464`` for IPv6) as (host, port); ValueError says what is wrong."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port:
        raise ValueError(f"{value!r} is not host:port (for example 127.0.0.1:9464)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{value!r}: write an IPv6 address in brackets, as [::1]:9464")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r}: the port must be a number from 1 to 65535")
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"{value!r}: the host is empty or has spaces")
    return host, int(port)


def _listen(value: str) -> str:
    split_listen(value)
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsSpec:
    """Where the service serves Prometheus ``/metrics``. Bound to loopback by default: the page says which rules
    and models are in use, which is nobody else's business."""

    __pydantic_config__ = _STRICT

    #: ``host:port`` to serve ``/metrics`` on (9464 is the port Prometheus' default-port list gives exporters).
    listen: Annotated[str, AfterValidator(_listen)] = "127.0.0.1:9464"
