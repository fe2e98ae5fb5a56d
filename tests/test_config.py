from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mmwatchd import config
from mmwatchd.errors import ConfigError

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

    def test_single_glob_becomes_a_tuple_and_home_expands(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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
        assert out == [f"{tmp_path / 'c.yaml'}:4:11: rules[1].name: 'photos' is already used by rules[0]; each name may appear once"]

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
