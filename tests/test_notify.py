from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from mmwatchd import notify
from mmwatchd.notify import Notifier


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket in tmp_path, as systemd's notify socket; yields it and its NOTIFY_SOCKET value."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(2)
    path = str(tmp_path / "notify")
    sock.bind(path)
    try:
        yield sock, path
    finally:
        sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[tuple[socket.socket, str]]:
    name = f"mmwatchd-test-{secrets.token_hex(6)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(2)
    sock.bind("\0" + name)
    try:
        yield sock, "@" + name
    finally:
        sock.close()


def pending(sock: socket.socket) -> bytes | None:
    """A datagram waiting on ``sock``, or None."""
    sock.setblocking(False)
    try:
        return sock.recv(4096)
    except BlockingIOError:
        return None
    finally:
        sock.settimeout(2)


class TestDatagrams:
    def test_path_socket(self, receiver: tuple[socket.socket, str]) -> None:
        sock, address = receiver
        with Notifier({"NOTIFY_SOCKET": address}) as n:
            assert n.enabled
            n.ready("watching 2 folders")
            assert sock.recv(4096) == b"READY=1\nSTATUS=watching 2 folders"
            n.ready()
            assert sock.recv(4096) == b"READY=1"
            n.status("3 queued, 1 in flight")
            assert sock.recv(4096) == b"STATUS=3 queued, 1 in flight"
            n.stopping()
            assert sock.recv(4096) == b"STOPPING=1"
            n.watchdog()
            assert sock.recv(4096) == b"WATCHDOG=1"
            assert n.send(STATUS="x", ERRNO=5) is True
            assert sock.recv(4096) == b"STATUS=x\nERRNO=5"
        assert pending(sock) is None

    def test_abstract_socket(self, abstract_receiver: tuple[socket.socket, str]) -> None:
        sock, address = abstract_receiver
        with Notifier({"NOTIFY_SOCKET": address}) as n:
            assert n.send(READY=1, STATUS="ok") is True
            assert sock.recv(4096) == b"READY=1\nSTATUS=ok"

    def test_values_stay_on_one_line(self, receiver: tuple[socket.socket, str]) -> None:
        sock, address = receiver
        with Notifier({"NOTIFY_SOCKET": address}) as n:
            n.status("first\nREADY=1\r\nthird")
            assert sock.recv(4096) == b"STATUS=first READY=1  third"
            n.status("caf" + os.fsdecode(b"\xff") + ".jpg")  # a surrogate-escaped file name
            assert sock.recv(4096) == b"STATUS=caf?.jpg"

    def test_reloading_carries_the_monotonic_clock(self, receiver: tuple[socket.socket, str]) -> None:
        sock, address = receiver
        with Notifier({"NOTIFY_SOCKET": address}) as n:
            before = time.monotonic_ns() // 1000
            n.reloading()
            after = time.monotonic_ns() // 1000
        reloading, monotonic = sock.recv(4096).decode().split("\n")
        assert reloading == "RELOADING=1"
        key, value = monotonic.split("=")
        assert key == "MONOTONIC_USEC"
        assert before <= int(value) <= after

    def test_closed_notifier_sends_nothing(self, receiver: tuple[socket.socket, str]) -> None:
        sock, address = receiver
        n = Notifier({"NOTIFY_SOCKET": address})
        n.ready()
        assert sock.recv(4096) == b"READY=1"
        n.close()
        n.close()
        assert n.send(STATUS="late") is False
        assert pending(sock) is None


class TestDisabled:
    def test_unset_is_a_no_op(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def no_sockets(*args: object, **kw: object) -> None:
            raise AssertionError("no socket may be created")

        monkeypatch.setattr(notify.socket, "socket", no_sockets)
        for env in ({}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:1234"}):
            n = Notifier(env)
            assert not n.enabled
            assert n.send(READY=1) is False
            n.ready("x")
            n.status("x")
            n.reloading()
            n.stopping()
            n.watchdog()
            n.close()

    def test_missing_socket_returns_false_and_logs_once(self, tmp_path: Path) -> None:
        n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
        assert n.enabled
        with capture_logs() as logs:
            assert n.send(READY=1) is False
            assert n.send(STATUS="again") is False
            n.watchdog()
        n.close()
        assert [(e["event"], e["log_level"]) for e in logs] == [("notify.failed", "debug")]

    def test_missing_abstract_socket(self) -> None:
        with Notifier({"NOTIFY_SOCKET": f"@mmwatchd-test-absent-{secrets.token_hex(6)}"}) as n:
            assert n.send(READY=1) is False


class TestWatchdogInterval:
    @pytest.mark.parametrize(
        ("env", "expected"),
        [
            ({"WATCHDOG_USEC": "30000000"}, 15.0),
            ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
            ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
            ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "nope"}, None),
            ({"WATCHDOG_USEC": "0"}, None),
            ({"WATCHDOG_USEC": "soon"}, None),
            ({"WATCHDOG_PID": str(os.getpid())}, None),
            ({}, None),
        ],
    )
    def test_interval(self, env: dict[str, str], expected: float | None) -> None:
        assert Notifier(env).watchdog_interval() == expected
