"""The shipped systemd units pass systemd-analyze verify; the API key is found where the units put it; a shell's
``mmwatchd status`` finds the system service's state. (The units under a real systemd: tests/test_nspawn.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from configs import load_config, write_config
from media import make_jpeg

from mmwatchd import config as config_mod
from mmwatchd.cli import _state_path, api_key, main
from mmwatchd.state import default_state_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """``main()`` points structlog at the captured stderr of the test; later tests must not write to it."""
    yield
    structlog.reset_defaults()


@pytest.mark.parametrize(
    ("unit", "user", "exe"),
    [
        ("mmwatchd.service", False, "/opt/mmwatchd/bin/mmwatchd"),
        ("mmwatchd-user.service", True, "%h/.local/share/mmwatchd/venv/bin/mmwatchd"),
    ],
)
def test_units_verify(tmp_path: Path, unit: str, user: bool, exe: str) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    stub = tmp_path / "mmwatchd"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    text = (REPO / "systemd" / unit).read_text()
    assert exe in text
    assert "Type=notify" in text and "ExecReload=/bin/sh -c 'kill -HUP $MAINPID'" in text and "WatchdogSec=" in text
    (tmp_path / "units").mkdir()
    target = tmp_path / "units" / "mmwatchd.service"
    target.write_text(text.replace(exe, str(stub)))  # verify insists the program exists
    (tmp_path / "run").mkdir(mode=0o700)
    cmd = [analyze, *(["--user"] if user else []), "verify", str(target)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={"XDG_RUNTIME_DIR": str(tmp_path / "run"),
                          "PATH": "/usr/bin:/bin"}, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "mmwatchd.service" not in done.stderr, done.stderr


def test_api_key_from_environment_or_systemd_credential(tmp_path: Path) -> None:
    cfg = load_config(tmp_path, base_url="http://127.0.0.1:9/v1")
    assert api_key(cfg, {}) is None
    assert api_key(cfg, {"MMWATCHD_TEST_KEY": "sk-env"}) == "sk-env"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "MMWATCHD_TEST_KEY").write_text("sk-credential\n")
    assert api_key(cfg, {"CREDENTIALS_DIRECTORY": str(creds)}) == "sk-credential"
    assert api_key(cfg, {"CREDENTIALS_DIRECTORY": str(creds), "MMWATCHD_TEST_KEY": "sk-env"}) == "sk-env"


@pytest.mark.parametrize(
    ("url", "insecure"),
    [
        ("http://127.0.0.1:11434/v1", False),
        ("http://localhost:8000/v1", False),
        ("http://[::1]:8000/v1", False),
        ("https://api.openai.com/v1", False),
        ("http://192.168.1.20:11434/v1", True),
        ("http://gpu-box.lan:8000/v1", True),
    ],
)
def test_plain_http_to_another_host_is_flagged(url: str, insecure: bool) -> None:
    from mmwatchd.cli import insecure_endpoint

    assert insecure_endpoint(url) is insecure


def test_api_key_file_must_be_private(tmp_path: Path) -> None:
    from mmwatchd.errors import ConfigError

    key = tmp_path / "key"
    key.write_text("sk-from-file\n")
    key.chmod(0o644)
    cfg = load_config(tmp_path, base_url="http://127.0.0.1:9/v1", endpoint={"api_key_env": None,
                      "api_key_file": str(key)})  # fmt: skip
    with pytest.raises(ConfigError, match="can be read by other users \\(mode 644\\); run: chmod 600"):
        api_key(cfg, {})
    key.chmod(0o600)
    assert api_key(cfg, {}) == "sk-from-file"


def test_a_config_in_etc_mmwatchd_means_the_system_services_state() -> None:
    """A root shell has no $STATE_DIRECTORY: with the system service's config it reads /var/lib/mmwatchd."""
    system = Path("/etc/mmwatchd/config.yaml")
    root_shell = {"HOME": "/root", "PATH": "/usr/bin:/bin"}
    assert default_state_dir(root_shell, config=system) == Path("/var/lib/mmwatchd")
    assert default_state_dir(root_shell, config=Path("/etc/mmwatchd/./config.yaml")) == Path("/var/lib/mmwatchd")
    assert default_state_dir(root_shell, config=Path("/home/a/.config/mmwatchd/config.yaml")) == Path(
        "/root/.local/state/mmwatchd"
    )
    assert default_state_dir(root_shell) == Path("/root/.local/state/mmwatchd")
    assert default_state_dir({**root_shell, "STATE_DIRECTORY": "/var/lib/x"}, config=system) == Path("/var/lib/x")
    # The same through the CLI's lookup, with a config as the system service loads it (nothing is read from /etc).
    text = "watch: [{path: /srv/photos}]\nrules: [{name: p, prompt: hi}]\n"
    cfg = config_mod.loads(text, source=system)
    assert _state_path(cfg, root_shell) == Path("/var/lib/mmwatchd/state.sqlite3")
    cfg = config_mod.loads(text + "state_dir: /x\n", source=system)
    assert _state_path(cfg, root_shell) == Path("/x/state.sqlite3")


def test_a_user_units_state_beside_its_config_is_found(tmp_path: Path) -> None:
    """systemd 252 gives a user unit's StateDirectory=mmwatchd as ~/.config/mmwatchd, beside config.yaml."""
    from mmwatchd.state import State

    home = tmp_path / "home"
    config = home / ".config" / "mmwatchd" / "config.yaml"
    shell = {"HOME": str(home)}
    assert default_state_dir(shell, config=config) == home / ".local" / "state" / "mmwatchd"  # nothing there yet
    with State(config.parent / "state.sqlite3"):  # what the service made
        pass
    assert default_state_dir(shell, config=config) == config.parent
    assert default_state_dir({**shell, "STATE_DIRECTORY": "/x"}, config=config) == Path("/x")


def test_status_without_a_database_says_so_and_creates_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, base_url="http://127.0.0.1:9/v1")
    for i in range(2):
        make_jpeg(tmp_path / "inbox" / f"{i}.jpg", (16, 16), seed=i)
    state = tmp_path / "state"
    assert main(["status", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"no state yet at {state / 'state.sqlite3'} ")
    assert f"{tmp_path / 'inbox'}: 0 done, 0 failed, 2 pending, 0 retrying" in out  # the folders are still counted
    assert main(["status", "-c", str(cfg), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["state_found"] is False and report["state_path"] == str(state / "state.sqlite3")
    assert report["roots"][str(tmp_path / "inbox")]["pending"] == 2
    assert not state.exists()
    assert not list(Path(tempfile.gettempdir()).glob("mmwatchd-status-*"))


def test_status_reads_an_existing_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mmwatchd.state import State

    cfg = write_config(tmp_path, base_url="http://127.0.0.1:9/v1")
    with State(tmp_path / "state" / "state.sqlite3") as state:
        state.count_request()
    assert main(["status", "-c", str(cfg), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["state_found"] is True and report["requests_today"] == 1


def test_status_with_a_state_dir_it_cannot_read_says_so(tmp_path: Path) -> None:
    """Not a "no state yet" (the database may well be there): a clear error, no traceback, nothing created."""
    (tmp_path / "file").write_text("")
    cfg = write_config(tmp_path, base_url="http://127.0.0.1:9/v1", state_dir=str(tmp_path / "file" / "state"))
    run = subprocess.run([sys.executable, "-m", "mmwatchd", "status", "-c", str(cfg)], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert run.returncode == 1, run
    db = tmp_path / "file" / "state" / "state.sqlite3"
    assert run.stderr == f"mmwatchd: {db}: cannot read the state database: Not a directory\n"
