"""The shipped systemd units pass systemd-analyze verify; the API key is found where the units put it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from configs import load_config

from mmwatchd.cli import api_key

REPO = Path(__file__).resolve().parents[1]


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
    assert "Type=notify" in text and "ExecReload=/bin/kill -HUP $MAINPID" in text and "WatchdogSec=" in text
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
