"""sd_notify(3) without libsystemd: one datagram of ``KEY=value`` lines to ``$NOTIFY_SOCKET``.

Used for ``Type=notify`` / ``Type=notify-reload`` units: ``READY=1`` once watching, ``STATUS=`` for
``systemctl status``, ``RELOADING=1``/``STOPPING=1`` around reloads and shutdown, ``WATCHDOG=1`` pings when
``WatchdogSec=`` is set. Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op.

Notifications are advisory: a failed send is logged once (debug) and never raised, so a missing or broken socket cannot
take the service down. systemd would then time out waiting for READY=1 and say so in its own log.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Mapping

from mmwatchd.log import get_logger

log = get_logger()

#: A send blocks while the receiver's queue is full; a stuck manager must not stall the service for long.
SEND_TIMEOUT_S = 2.0


class Notifier:
    """Sends sd_notify datagrams to $NOTIFY_SOCKET (path, or abstract when it starts with '@'). A no-op when unset.

    The environment is read once, here. Thread-safe.
    """

    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        raw = env.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        if raw.startswith("@"):
            self._address = "\0" + raw[1:]  # Linux abstract namespace
        elif raw.startswith("/"):
            self._address = raw
        elif raw:
            # e.g. "vsock:CID:PORT" (systemd >= 254, for VMs): not something a service on the host is given.
            log.debug("notify.unsupported_socket", socket=raw)
        self._socket_name = raw
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._closed = False
        self._failure_logged = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines as one datagram, in the order given. True when sent; never raises.

        Newlines in values become spaces, since each line is one assignment.
        """
        if self._address is None or not fields:
            return False
        message = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items())
        data = message.encode("utf-8", errors="replace")  # a surrogate-escaped file name must not raise
        with self._lock:
            if self._closed:
                return False
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._sock.settimeout(SEND_TIMEOUT_S)
                self._sock.sendto(data, self._address)
            except OSError as exc:
                if not self._failure_logged:
                    self._failure_logged = True
                    log.debug("notify.failed", socket=self._socket_name, error=f"{type(exc).__name__}: {exc}")
                return False
        return True

    def ready(self, status: str = "") -> None:
        """Startup (or a reload) is complete."""
        if status:
            self.send(READY=1, STATUS=status)
        else:
            self.send(READY=1)

    def status(self, text: str) -> None:
        """One line shown by ``systemctl status``."""
        self.send(STATUS=text)

    def reloading(self) -> None:
        """A reload has begun; call :meth:`ready` when it is done.

        ``Type=notify-reload`` requires MONOTONIC_USEC with RELOADING=1, on CLOCK_MONOTONIC as systemd reads it.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send(RELOADING=1, MONOTONIC_USEC=usec)

    def stopping(self) -> None:
        self.send(STOPPING=1)

    def watchdog(self) -> None:
        self.send(WATCHDOG=1)

    def watchdog_interval(self) -> float | None:
        """How often to call :meth:`watchdog`: half of ``WatchdogSec=``, as sd_watchdog_enabled(3) advises.

        None when no watchdog is set, or when it is meant for another process (``WATCHDOG_PID``).
        """
        try:
            usec = int(self._watchdog_usec or "")
        except ValueError:
            return None
        if usec <= 0:
            return None
        if self._watchdog_pid:
            try:
                pid = int(self._watchdog_pid)
            except ValueError:
                return None
            if pid != os.getpid():
                return None
        return usec / 2 / 1_000_000

    def close(self) -> None:
        """Close the socket; later sends return False. Idempotent."""
        with self._lock:
            self._closed = True
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _one_line(value: str | int) -> str:
    return str(value).replace("\r", " ").replace("\n", " ")
