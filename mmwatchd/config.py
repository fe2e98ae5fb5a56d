"""YAML → frozen, typed config. Every problem is reported with ``file:line:col`` and its key path.

Validation is pydantic's, run straight on the dataclasses in model.py, so each constraint is stated once.
Unknown keys and duplicate keys are errors: a typo must never be silently ignored.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from mmwatchd.errors import ConfigError
from mmwatchd.model import (
    ActionSpec,
    Config,
    EndpointConfig,
    KeyPath,
    check_globs,
    dotted,
    locate,
    members,
)
from mmwatchd.templates import check_template, template_fields

_ADAPTER = TypeAdapter(Config)
_UNSET_IN_YAML = {"source", "positions"}


# ---------------------------------------------------------------------------------------------------------------
# Finding the file


def candidate_paths(env: Mapping[str, str] | None = None) -> list[Path]:
    """Where a config is looked for when ``-c`` is not given, in order."""
    env = os.environ if env is None else env
    out: list[Path] = []
    if env.get("MMWATCHD_CONFIG"):
        out.append(Path(env["MMWATCHD_CONFIG"]).expanduser())
    out.append(Path("mmwatchd.yaml"))
    xdg = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".config")
    out.append(Path(xdg) / "mmwatchd" / "config.yaml")
    out.append(Path("/etc/mmwatchd/config.yaml"))
    return out


def find_config(explicit: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> Path:
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ if env is None else env
    candidates = candidate_paths(env)
    if env.get("MMWATCHD_CONFIG"):
        # An explicit variable that points nowhere is a mistake, not a reason to fall through to other files.
        return candidates[0]
    for c in candidates:
        if c.is_file():
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"no config file found (tried {tried}); pass one with -c CONFIG, e.g. -c config.example.yaml")


# ---------------------------------------------------------------------------------------------------------------
# Loading with positions


def load(path: str | os.PathLike[str]) -> Config:
    """Read, validate and freeze a config file; raises ConfigError listing every problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read config file: {exc}") from exc
    return loads(text, source=p)


def loads(text: str, *, source: Path | None = None) -> Config:
    name = str(source) if source else "<config>"
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: not valid YAML: {problem}") from exc
    finally:
        loader.dispose()
    if node is None:
        raise ConfigError(f"{name}: the config file is empty; start from config.example.yaml")
    reader = _Reader(loader, name)
    data = reader.read(node)
    positions, key_positions, problems = reader.positions, reader.key_positions, reader.problems
    if not isinstance(data, dict):
        raise ConfigError(f"{name}:1:1: the top level must be a mapping of keys (endpoint:, watch:, rules:, ...)")
    for k in _UNSET_IN_YAML & data.keys():
        problems.append(f"{locate(source, key_positions, (k,))}: unknown key")
        del data[k]
    base = source.parent if source else Path.cwd()
    for root in data.get("watch") or []:
        if isinstance(root, dict) and isinstance(root.get("path"), str):
            root["path"] = str(_resolve(root["path"], base))
    if isinstance(data.get("state_dir"), str):
        data["state_dir"] = str(_resolve(data["state_dir"], base))
    named = data.get("endpoints")
    for endpoint in [data.get("endpoint"), *(named if isinstance(named, list) else [])]:
        if isinstance(endpoint, dict) and isinstance(endpoint.get("api_key_file"), str):
            endpoint["api_key_file"] = str(_resolve(endpoint["api_key_file"], base))
    if "endpoint" in data and "endpoints" in data:
        problems.append(
            f"{locate(source, key_positions, ('endpoints',))}: give either endpoint: (one endpoint) or endpoints: "
            f"(several, each with a name), not both; move the endpoint: settings into an entry of endpoints:"
        )
    side = data.get("sidecar")
    if isinstance(side, dict) and isinstance(side.get("dir"), str):
        side["dir"] = str(_resolve(side["dir"], base))
    for rule in data.get("rules") or []:
        if not isinstance(rule, dict):
            continue
        refs = rule.get("reference_images")
        if isinstance(refs, list):
            rule["reference_images"] = [str(_resolve(r, base)) if isinstance(r, str) else r for r in refs]
        keywords = rule.get("keywords")
        if isinstance(keywords, dict) and isinstance(keywords.get("vocabulary"), str):
            keywords["vocabulary"] = str(_resolve(keywords["vocabulary"], base))
        for key in ("on_success", "on_error"):
            action = rule.get(key)
            if isinstance(action, dict) and isinstance(action.get("move_to"), str):
                action["move_to"] = str(_resolve(action["move_to"], base))
    try:
        cfg = _ADAPTER.validate_python(data)
    except ValidationError as exc:
        problems.extend(_explain(exc, data, source, positions, key_positions))
        raise ConfigError(sorted(problems, key=_by_position)) from None
    problems.extend(_cross_checks(cfg, source, positions))
    if problems:
        raise ConfigError(problems)
    return _with(cfg, source=source, positions=positions, endpoint=encode_for(cfg))


def encode_for(cfg: Config) -> EndpointConfig:
    """``endpoint`` as the rest of the program reads it. With ``endpoints:``: the first one listed, but with the
    smallest request and frame limits of them all, so that one encoding fits whichever endpoint a file is routed to
    (and a file that fails over to another endpoint is not encoded again)."""
    if not cfg.endpoints:
        return cfg.endpoint
    first = cfg.endpoints[0]
    frames = [e.max_video_frames for e in cfg.endpoints if e.max_video_frames is not None]
    values = {f.name: getattr(first, f.name) for f in fields(EndpointConfig)}
    values.update(
        max_request_bytes=min(e.max_request_bytes for e in cfg.endpoints),
        max_video_frames=min(frames) if frames else None,
    )
    return EndpointConfig(**values)


def _resolve(raw: str, base: Path) -> Path:
    """``~`` and ``$VARS`` expand; a relative path is relative to the config file's folder, not the working dir."""
    p = Path(os.path.expandvars(os.path.expanduser(raw)))
    return p if p.is_absolute() else (base / p).resolve()


def _with(cfg: Config, **changes: Any) -> Config:
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    values.update(changes)
    return Config(**values)


class _Reader:
    """Turns a composed YAML node tree into plain data, remembering where every key and value sits."""

    def __init__(self, loader: yaml.SafeLoader, name: str) -> None:
        self.loader = loader
        self.name = name
        self.positions: dict[KeyPath, tuple[int, int]] = {}
        self.key_positions: dict[KeyPath, tuple[int, int]] = {}
        self.problems: list[str] = []

    def read(self, node: yaml.Node, path: KeyPath = ()) -> Any:
        self.positions[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.SequenceNode):
            return [self.read(v, (*path, i)) for i, v in enumerate(node.value)]
        if not isinstance(node, yaml.MappingNode):
            return self.loader.construct_object(node, deep=True)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self.loader.construct_object(key_node, deep=True)
            kpos = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if not isinstance(key, str):
                self.problems.append(f"{self.name}:{kpos[0]}:{kpos[1]}: {key!r}: keys must be names")
                continue
            if key in out:
                first = self.key_positions[(*path, key)]
                self.problems.append(
                    f"{self.name}:{kpos[0]}:{kpos[1]}: {dotted((*path, key))}: duplicate key "
                    f"(first at line {first[0]}); only one may stay"
                )
                continue
            self.key_positions[(*path, key)] = kpos
            out[key] = self.read(value_node, (*path, key))
        return out


def _data_path(loc: tuple[Any, ...], data: Any) -> KeyPath:
    """Pydantic locations include union branch names ('str', 'tuple[...]'); keep only real keys and indexes."""
    out: list[str | int] = []
    cur = data
    for part in loc:
        if (isinstance(cur, dict) and part in cur) or (
            isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur)
        ):
            cur = cur[part]
            out.append(part)
        elif isinstance(part, str) and not out and part in {f.name for f in fields(Config)}:
            out.append(part)  # a missing top-level key
            cur = None
        elif isinstance(part, str) and isinstance(cur, dict) and not part.startswith(("tuple[", "list[", "str", "int")):
            out.append(part)  # a missing nested key
            cur = None
    return tuple(out)


def _known_keys(loc: KeyPath) -> list[str]:
    """The key names allowed at the mapping that holds ``loc``'s last key."""
    typ: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not is_dataclass(typ) or part not in (hints := typing.get_type_hints(typ)):
            return []
        typ = _dataclass_in(hints[part])
    return [f.name for f in fields(typ) if f.name not in _UNSET_IN_YAML] if is_dataclass(typ) else []


def _dataclass_in(annotation: Any) -> Any:
    """The dataclass a field holds directly, in a tuple, or in an optional."""
    if is_dataclass(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        if (found := _dataclass_in(arg)) is not None:
            return found
    return None


def _explain(
    exc: ValidationError,
    data: Any,
    source: Path | None,
    positions: Mapping[KeyPath, tuple[int, int]],
    key_positions: Mapping[KeyPath, tuple[int, int]],
) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    errors = exc.errors(include_url=False)
    failed = [_data_path(e["loc"], data) for e in errors]
    for err, path in zip(errors, failed, strict=True):
        kind = err["type"]
        if kind == "too_short" and any(len(p) > len(path) and p[: len(path)] == path for p in failed):
            continue  # pydantic also says "too short" for a list whose every item failed: the items say why
        if kind in ("unexpected_keyword_argument", "extra_forbidden"):
            key = str(path[-1]) if path else "?"
            known = _known_keys(path)
            hint = difflib.get_close_matches(key, known, n=1)
            msg = "unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else "")
            if known and not hint:
                msg += f"; allowed here: {', '.join(known)}"
            line = f"{locate(source, key_positions, path)}: {msg}"
        elif kind in {"missing", "missing_keyword_argument"}:
            line = f"{locate(source, positions, path)}: required key is missing"
        else:
            line = f"{locate(source, positions, path)}: {_message(err)}"
        if line not in seen:
            seen.add(line)
            out.append(line)
    return out


def _by_position(line: str) -> tuple[int, int]:
    m = re.match(r".*?:(\d+):(\d+): ", line)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _message(err: Any) -> str:
    msg = str(err["msg"])
    msg = re.sub(r"^Value error, ", "", msg)
    msg = re.sub(r"^Input should be", "must be", msg)
    msg = re.sub(r"^String should", "must", msg)
    msg = re.sub(r"^Tuple should", "must", msg)
    msg = msg[:1].lower() + msg[1:]
    value = err.get("input")
    if err["type"] != "value_error" and not isinstance(value, (dict, list)) and value is not None:
        shown = repr(value)
        msg += f", got {shown if len(shown) <= 60 else shown[:57] + '...'}"
    return msg


def _cross_checks(cfg: Config, source: Path | None, positions: Mapping[KeyPath, tuple[int, int]]) -> list[str]:
    problems: list[str] = []
    unique: tuple[tuple[str, str, tuple[Any, ...]], ...] = (
        ("rules", "name", tuple(r.name for r in cfg.rules)),
        ("watch", "path", tuple(r.path for r in cfg.watch)),
        ("endpoints", "name", tuple(e.name for e in cfg.endpoints)),
    )
    for section, key, values in unique:
        first: dict[Any, int] = {}
        for i, value in enumerate(values):
            if value in first:
                problems.append(
                    f"{locate(source, positions, (section, i, key))}: {str(value)!r} is already used by "
                    f"{section}[{first[value]}]; each {key} may appear once"
                )
            first.setdefault(value, i)
    for i, root in enumerate(cfg.watch):
        for key in ("include", "exclude"):
            for j, pattern in enumerate(getattr(root, key)):
                try:
                    check_globs((pattern,))
                except ValueError as exc:
                    problems.append(f"{locate(source, positions, ('watch', i, key, j))}: {exc}")
    for i, rule in enumerate(cfg.rules):
        for key in ("prompt", "system"):
            text = getattr(rule, key)
            if rule.keywords is None and text and "vocabulary" in template_fields(text):
                problems.append(
                    f"{locate(source, positions, ('rules', i, key))}: {{vocabulary}} needs a vocabulary: set "
                    f"rules[{i}].keywords.vocabulary to a keyword file, or remove the placeholder"
                )
        for key in ("on_success", "on_error"):
            action: ActionSpec | None = getattr(rule, key)
            for j, arg in enumerate(action.exec or () if action else ()):
                try:
                    check_template(arg, extra=("sidecar", "status"))
                except ValueError as exc:
                    problems.append(f"{locate(source, positions, ('rules', i, key, 'exec', j))}: {exc}")
        for j, ref in enumerate(rule.reference_images):
            if not ref.is_file():
                problems.append(
                    f"{locate(source, positions, ('rules', i, 'reference_images', j))}: {ref} is not a readable file"
                )
    names = list(dict.fromkeys(m.name for m in members(cfg)))
    for i, rule in enumerate(cfg.rules):
        for j, name in enumerate(rule.endpoints):
            if name not in names:
                hint = difflib.get_close_matches(name, names, n=1)
                problems.append(
                    f"{locate(source, positions, ('rules', i, 'endpoints', j))}: no endpoint is named {name!r}"
                    + (f" (did you mean {hint[0]!r}?)" if hint else "")
                    + f"; the endpoints are: {', '.join(names)}"
                )
    keyed: list[tuple[KeyPath, EndpointConfig]] = [(("endpoint",), cfg.endpoint)]
    keyed += [(("endpoints", i), e) for i, e in enumerate(cfg.endpoints)]
    for where, endpoint in keyed:
        if endpoint.max_concurrency is not None and endpoint.concurrency != "auto":
            problems.append(
                f"{locate(source, positions, (*where, 'max_concurrency'))}: applies only with concurrency: auto "
                f"(concurrency is {endpoint.concurrency}); set concurrency: auto, or remove max_concurrency"
            )
        if endpoint.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", endpoint.api_key_env):
            problems.append(
                f"{locate(source, positions, (*where, 'api_key_env'))}: must be the NAME of an environment "
                "variable (like OPENAI_API_KEY), not the key itself"
            )
    return problems
