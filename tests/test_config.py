from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import structlog
import yaml
from configs import write_config
from fakevlm import FakeVLM
from media import make_jpeg

from mmwatchd import config
from mmwatchd.cli import api_key, main
from mmwatchd.errors import ConfigError
from mmwatchd.vlm import NO_KEY

REPO = Path(__file__).resolve().parents[1]

MINIMAL = """\
rules:
  - name: photos
    prompt: "Describe {name}."
"""


def problems(text: str, tmp_path: Path) -> list[str]:
    f = tmp_path / "c.yaml"
    f.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as info:
        config.load(f)
    return info.value.problems


class TestValid:
    def test_example_config_loads_with_every_documented_key(self) -> None:
        cfg = config.load(REPO / "config.example.yaml")
        assert cfg.endpoint.max_request_bytes == 20_000_000
        assert cfg.rules[0].name == "photos"
        assert cfg.rules[0].schema is not None
        assert cfg.watch[0].path == REPO / "inbox"  # relative to the config file, not the working directory

    def test_defaults(self, tmp_path: Path) -> None:
        f = tmp_path / "c.yaml"
        f.write_text(MINIMAL)
        cfg = config.load(f)
        assert cfg.settle_s == 2.0
        assert cfg.sidecar.suffix == ".json"
        assert cfg.rules[0].match.kind == "any"
        assert cfg.rules[0].match.glob == ("**/*",)
        assert cfg.source == f

    def test_single_glob_becomes_a_tuple_and_home_expands(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("HOME", str(tmp_path))
        f = tmp_path / "c.yaml"
        f.write_text(MINIMAL + "    match: {glob: '*.jpg'}\nwatch:\n  - path: ~/pics\n")
        cfg = config.load(f)
        assert cfg.rules[0].match.glob == ("*.jpg",)
        assert cfg.watch[0].path == tmp_path / "pics"

    def test_config_is_frozen(self, tmp_path: Path) -> None:
        f = tmp_path / "c.yaml"
        f.write_text(MINIMAL)
        cfg = config.load(f)
        with pytest.raises(AttributeError):
            cfg.settle_s = 5  # type: ignore[misc]


class TestErrors:
    def test_unknown_key_names_file_line_path_and_suggestion(self, tmp_path: Path) -> None:
        out = problems(
            """\
            endpoint:
              modle: x
            rules:
              - name: photos
                prompt: hi
            """,
            tmp_path,
        )
        assert out == [f"{tmp_path / 'c.yaml'}:2:3: endpoint.modle: unknown key (did you mean 'model'?)"]

    def test_every_problem_is_reported_in_file_order(self, tmp_path: Path) -> None:
        out = problems(
            """\
            endpoint:
              base_url: ftp://x
              concurrency: 0
            rules:
              - name: a
                prompt: "hello {nme}"
                image: {format: gif, max_side: -5}
            """,
            tmp_path,
        )
        assert len(out) == 5
        assert out[0].endswith("endpoint.base_url: must be an http:// or https:// URL, like http://127.0.0.1:11434/v1")
        assert ":3:16: endpoint.concurrency: must be greater than or equal to 1, got 0" in out[1]
        assert ":6:13: rules[0].prompt: unknown placeholder {nme}" in out[2]
        assert "rules[0].image.format: must be 'jpeg', 'png' or 'webp', got 'gif'" in out[3]
        assert "rules[0].image.max_side: must be greater than or equal to 16, got -5" in out[4]

    def test_missing_required_keys(self, tmp_path: Path) -> None:
        out = problems("rules:\n  - name: a\n", tmp_path)
        assert out == [f"{tmp_path / 'c.yaml'}:2:5: rules[0].prompt: required key is missing"]
        out = problems("settle_s: 1\n", tmp_path)
        assert out == [f"{tmp_path / 'c.yaml'}:1:1: rules: required key is missing"]

    def test_duplicate_keys_are_errors_not_last_one_wins(self, tmp_path: Path) -> None:
        out = problems(MINIMAL + "settle_s: 1\nsettle_s: 3\n", tmp_path)
        assert out == [f"{tmp_path / 'c.yaml'}:5:1: settle_s: duplicate key (first at line 4); only one may stay"]

    def test_duplicate_rule_names(self, tmp_path: Path) -> None:
        out = problems(MINIMAL + "  - name: photos\n    prompt: again\n", tmp_path)
        assert out == [
            f"{tmp_path / 'c.yaml'}:4:11: rules[1].name: 'photos' is already used by rules[0]; each name may appear once"
        ]

    @pytest.mark.parametrize(
        ("prompt", "expected"),
        [
            ("{0}", "placeholder {0} is not allowed"),
            ("{name.__class__}", "placeholder {name.__class__} is not allowed"),
            ("{name[0]}", "placeholder {name[0]} is not allowed"),
            ("{name!r}", "may not have a format spec or conversion"),
            ("{name:>10}", "may not have a format spec or conversion"),
            ("{", "write {{ and }} for literal braces"),
        ],
    )
    def test_restricted_placeholders(self, tmp_path: Path, prompt: str, expected: str) -> None:
        out = problems(f"rules:\n  - name: a\n    prompt: '{prompt}'\n", tmp_path)
        assert len(out) == 1 and expected in out[0], out

    def test_duplicate_watch_folders(self, tmp_path: Path) -> None:
        out = problems(MINIMAL + f"watch:\n  - path: {tmp_path}\n  - path: {tmp_path}/\n", tmp_path)
        assert len(out) == 1 and "watch[1].path:" in out[0] and "already used by watch[0]" in out[0]

    def test_api_key_must_be_a_variable_name_not_the_key(self, tmp_path: Path) -> None:
        out = problems(MINIMAL + "endpoint: {api_key_env: 'sk-abc123-secret'}\n", tmp_path)
        assert len(out) == 1 and "must be the NAME of an environment variable" in out[0]

    def test_yaml_syntax_error_has_position(self, tmp_path: Path) -> None:
        out = problems("rules: [\n  - a: b\n", tmp_path)
        assert out[0].startswith(f"{tmp_path / 'c.yaml'}:") and "not valid YAML" in out[0]

    def test_empty_file_and_wrong_top_level(self, tmp_path: Path) -> None:
        assert "empty" in problems("", tmp_path)[0]
        assert "top level must be a mapping" in problems("- a\n- b\n", tmp_path)[0]

    def test_bad_glob(self, tmp_path: Path) -> None:
        out = problems(MINIMAL + "    match: {glob: 'a/[bc'}\n", tmp_path)
        assert len(out) == 1 and "rules[0].match.glob" in out[0] and "unclosed '['" in out[0]

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="config file not found"):
            config.load(tmp_path / "nope.yaml")


class TestFinding:
    def test_search_order(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(tmp_path)
        env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path)}
        with pytest.raises(ConfigError, match="no config file found"):
            config.find_config(None, env)
        xdg = tmp_path / "xdg" / "mmwatchd" / "config.yaml"
        xdg.parent.mkdir(parents=True)
        xdg.write_text(MINIMAL)
        assert config.find_config(None, env) == xdg
        (tmp_path / "mmwatchd.yaml").write_text(MINIMAL)
        assert config.find_config(None, env) == Path("mmwatchd.yaml")
        assert config.find_config(None, {**env, "MMWATCHD_CONFIG": "/x/y.yaml"}) == Path("/x/y.yaml")
        assert config.find_config("given.yaml", env) == Path("given.yaml")


def test_reply_schema_must_be_a_valid_json_schema(tmp_path: Path) -> None:
    out = problems(MINIMAL + "    schema: {type: objekt}\n", tmp_path)
    assert len(out) == 1 and ":4:13: rules[0].schema: not a valid JSON schema: at $.type:" in out[0], out


class TestApiKey:
    """``endpoint.api_key_env`` defaults to none: a key exported in the shell is sent only where the config says."""

    SHELL_KEY = "sk-shell-secret-for-openai"

    def _config(self, tmp_path: Path, base_url: str, **endpoint: object) -> Path:
        path = write_config(tmp_path, base_url=base_url)
        doc = yaml.safe_load(path.read_text())
        del doc["endpoint"]["api_key_env"]  # as a user writes it: the key is simply absent
        doc["endpoint"].update(endpoint)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def _once(self, cfg: Path, photo: Path, tmp_path: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OPENAI_API_KEY": self.SHELL_KEY}
        env.pop("CREDENTIALS_DIRECTORY", None)
        done = subprocess.run([sys.executable, "-m", "mmwatchd", "once", "-c", str(cfg), str(photo)],
                              cwd=tmp_path, env=env, capture_output=True, timeout=120, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()[-2000:]

    def test_the_default_reads_no_variable(self, tmp_path: Path) -> None:
        f = tmp_path / "c.yaml"
        f.write_text(MINIMAL)
        assert config.load(f).endpoint.api_key_env is None
        assert config.load(REPO / "config.example.yaml").endpoint.api_key_env is None

    def test_a_key_in_the_shell_never_reaches_a_server_the_config_does_not_name_it_for(
        self, tmp_path: Path, fake_vlm: FakeVLM
    ) -> None:
        photo = make_jpeg(tmp_path / "inbox" / "a.jpg", (64, 48))
        self._once(self._config(tmp_path, fake_vlm.base_url), photo, tmp_path)
        assert fake_vlm.chat_requests, "the file was not sent"
        for request in fake_vlm.requests:  # /v1/models too
            assert self.SHELL_KEY not in repr(request.headers), request.path
            assert request.headers["authorization"] == f"Bearer {NO_KEY}"  # the SDK's required key: a placeholder

    def test_naming_the_variable_sends_its_key(
        self, tmp_path: Path, fake_vlm: FakeVLM, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The control for the test above: the same key does arrive once the config names its variable."""
        monkeypatch.setenv("OPENAI_API_KEY", self.SHELL_KEY)
        monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
        photo = make_jpeg(tmp_path / "inbox" / "a.jpg", (64, 48))
        cfg = self._config(tmp_path, fake_vlm.base_url, api_key_env="OPENAI_API_KEY")
        try:
            assert main(["once", "-c", str(cfg), str(photo)]) == 0
        finally:
            structlog.reset_defaults()
        assert fake_vlm.chat_requests
        assert {r.headers["authorization"] for r in fake_vlm.requests} == {f"Bearer {self.SHELL_KEY}"}

    def test_systemd_credential_and_key_file_with_the_default(self, tmp_path: Path) -> None:
        cfg = config.load(self._config(tmp_path, "http://127.0.0.1:9/v1"))
        creds = tmp_path / "creds"
        creds.mkdir()
        assert api_key(cfg, {"OPENAI_API_KEY": self.SHELL_KEY, "CREDENTIALS_DIRECTORY": str(creds)}) is None
        # A credential is handed to this one service on purpose (LoadCredential=OPENAI_API_KEY:...): it is read.
        (creds / "OPENAI_API_KEY").write_text("sk-credential\n")
        assert api_key(cfg, {"OPENAI_API_KEY": self.SHELL_KEY, "CREDENTIALS_DIRECTORY": str(creds)}) == "sk-credential"
        # A key file the config names comes before that default credential.
        key = tmp_path / "key"
        key.write_text("sk-from-file\n")
        key.chmod(0o600)
        with_file = config.load(self._config(tmp_path, "http://127.0.0.1:9/v1", api_key_file=str(key)))
        assert api_key(with_file, {"CREDENTIALS_DIRECTORY": str(creds)}) == "sk-from-file"
        # With api_key_env set, the credential of that name is read, and no other.
        named = config.load(self._config(tmp_path, "http://127.0.0.1:9/v1", api_key_env="GATEWAY_KEY"))
        assert api_key(named, {"CREDENTIALS_DIRECTORY": str(creds)}) is None
        (creds / "GATEWAY_KEY").write_text("sk-gateway\n")
        assert api_key(named, {"CREDENTIALS_DIRECTORY": str(creds)}) == "sk-gateway"
        assert api_key(named, {"CREDENTIALS_DIRECTORY": str(creds), "GATEWAY_KEY": "sk-env"}) == "sk-env"


class TestConcurrency:
    def test_auto_and_its_maximum(self, tmp_path: Path) -> None:
        f = tmp_path / "c.yaml"
        f.write_text("endpoint:\n  concurrency: auto\n  max_concurrency: 12\n" + MINIMAL)
        cfg = config.load(f)
        assert cfg.endpoint.concurrency == "auto" and cfg.endpoint.max_concurrency == 12

    @pytest.mark.parametrize(
        ("value", "said"),
        [
            ("fast", "must be a whole number of requests in flight, or auto, got 'fast'"),
            ("2.5", "must be a whole number of requests in flight, or auto, got 2.5"),
            ("300", "must be less than or equal to 256, got 300 (or auto, to find the server's capacity)"),
        ],
    )
    def test_one_clear_message_for_a_bad_value(self, tmp_path: Path, value: str, said: str) -> None:
        out = problems(f"endpoint:\n  concurrency: {value}\n" + MINIMAL, tmp_path)
        assert out == [f"{tmp_path / 'c.yaml'}:2:16: endpoint.concurrency: {said}"]

    def test_a_maximum_without_auto_is_an_error(self, tmp_path: Path) -> None:
        out = problems("endpoint:\n  concurrency: 4\n  max_concurrency: 16\n" + MINIMAL, tmp_path)
        said = (
            "applies only with concurrency: auto (concurrency is 4); set concurrency: auto, or remove max_concurrency"
        )
        assert out == [f"{tmp_path / 'c.yaml'}:3:20: endpoint.max_concurrency: {said}"]
