"""YAML → frozen, typed config. Every problem is reported with ``file:line:col`` and its key path.

Validation is pydantic's, run straight on the dataclasses (here and in model.py), so each constraint is stated once.
Unknown keys and duplicate keys are errors: a typo must never be silently ignored.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import jsonschema
import yaml
from pydantic import AfterValidator, BeforeValidator, Field, TypeAdapter, ValidationError

from mmwatchd import rules
from mmwatchd.errors import ConfigError
from mmwatchd.metricsspec import MetricsSpec
from mmwatchd.model import _STRICT, ActionSpec, EndpointConfig, ImageSpec, Limits, VideoSpec, WatchRoot
from mmwatchd.xmpspec import KeywordsSpec, XmpSpec

KeyPath = tuple[str | int, ...]


def _as_tuple(value: object) -> object:
    return (value,) if isinstance(value, str) else value


def _valid_globs(patterns: tuple[str, ...]) -> tuple[str, ...]:
    from mmwatchd.globs import compile_glob

    for p in patterns:
        compile_glob(p)  # ValueError becomes a config error at this key
    return patterns


def _valid_schema(schema: dict[str, Any]) -> dict[str, Any]:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        raise ValueError(f"not a valid JSON schema: at {exc.json_path}: {exc.message}") from None
    return schema


Globs = Annotated[tuple[str, ...], BeforeValidator(_as_tuple), AfterValidator(_valid_globs)]


@dataclass(frozen=True, slots=True, kw_only=True)
class MatchSpec:
    __pydantic_config__ = _STRICT

    kind: Literal["image", "video", "any"] = "any"
    #: Patterns relative to the watch root (see globs.py); a file outside every root is matched by its name.
    glob: Globs = ("**/*",)


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """What to ask about the files a rule matches; the first matching rule wins."""

    __pydantic_config__ = _STRICT

    name: Annotated[str, Field(min_length=1, pattern=r"^[\w.-]+$")]
    prompt: Annotated[str, Field(min_length=1), AfterValidator(rules.check_template)]
    match: MatchSpec = MatchSpec()
    system: Annotated[str, AfterValidator(rules.check_template)] | None = None
    #: JSON schema the reply must follow; sent as ``response_format`` (json_schema).
    schema: Annotated[dict[str, Any], AfterValidator(_valid_schema)] | None = None
    #: Overrides of the endpoint's defaults for this rule.
    model: Annotated[str, Field(min_length=1)] | None = None
    max_tokens: Annotated[int, Field(gt=0)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    image: ImageSpec = ImageSpec()
    #: How videos are sampled and sent. Animated GIF/WebP are sent as videos only when a rule sets this.
    video: VideoSpec | None = None
    #: Images sent before the file's own parts, in this order, with every request of this rule.
    reference_images: tuple[Path, ...] = ()
    #: What to do with the file and its sidecar once described, or once it failed for good.
    on_success: ActionSpec | None = None
    on_error: ActionSpec | None = None
    #: Map the model's keywords onto a person's own tags (and offer them through {vocabulary}).
    keywords: KeywordsSpec | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SidecarConfig:
    __pydantic_config__ = _STRICT

    #: Appended to the media file's full name: IMG_1.jpg → IMG_1.jpg.json
    suffix: Annotated[str, Field(pattern=r"^\.[A-Za-z0-9._-]+$")] = ".json"
    #: Write sidecars into this folder, under each media file's full path, instead of beside the media (for
    #: read-only photo folders): /srv/photos/a.jpg → <dir>/srv/photos/a.jpg.json. Files outside every watched
    #: folder go to its top level.
    dir: Path | None = None
    #: Also write an XMP sidecar beside the media, for photo apps (off unless set; ``xmp: {}`` for the defaults).
    xmp: XmpSpec | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    __pydantic_config__ = _STRICT

    endpoint: EndpointConfig = EndpointConfig()
    watch: tuple[WatchRoot, ...] = ()
    #: Quiet time before a file counts as complete.
    settle_s: Annotated[float, Field(ge=0, le=3600)] = 2.0
    rules: Annotated[tuple[Rule, ...], Field(min_length=1)]
    sidecar: SidecarConfig = SidecarConfig()
    limits: Limits = Limits()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: Full rescan of every watched folder this often, as a safety net for missed events (0: never).
    rescan_interval_s: Annotated[float, Field(ge=0)] = 600.0
    #: Where no terminal shows a progress bar (journald, CI, a pipe): a progress log line this often during a scan,
    #: ``once`` with several files, and the service's startup backlog (0: none).
    progress_interval_s: Annotated[float, Field(ge=0)] = 30.0
    #: Where retry counters and history are kept (default: $STATE_DIRECTORY, else $XDG_STATE_HOME/mmwatchd).
    state_dir: Path | None = None
    metrics: MetricsSpec | None = None
    #: Where the config came from, and where each key sits in it (for messages about values found later).
    source: Path | None = field(default=None, compare=False)
    positions: Mapping[KeyPath, tuple[int, int]] = field(default_factory=dict, compare=False, repr=False)

    def where(self, path: KeyPath) -> str:
        """``file:line:col: key.path`` for a key, as config errors print it."""
        return _locate(self.source, self.positions, path)


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
        problems.append(f"{_locate(source, key_positions, (k,))}: unknown key")
        del data[k]
    base = source.parent if source else Path.cwd()
    for root in data.get("watch") or []:
        if isinstance(root, dict) and isinstance(root.get("path"), str):
            root["path"] = str(_resolve(root["path"], base))
    if isinstance(data.get("state_dir"), str):
        data["state_dir"] = str(_resolve(data["state_dir"], base))
    endpoint = data.get("endpoint")
    if isinstance(endpoint, dict) and isinstance(endpoint.get("api_key_file"), str):
        endpoint["api_key_file"] = str(_resolve(endpoint["api_key_file"], base))
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
    return _with(cfg, source=source, positions=positions)


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
                    f"{self.name}:{kpos[0]}:{kpos[1]}: {_dotted((*path, key))}: duplicate key "
                    f"(first at line {first[0]}); only one may stay"
                )
                continue
            self.key_positions[(*path, key)] = kpos
            out[key] = self.read(value_node, (*path, key))
        return out


def _dotted(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _locate(source: Path | None, positions: Mapping[KeyPath, tuple[int, int]], path: KeyPath) -> str:
    name = str(source) if source else "<config>"
    for n in range(len(path), -1, -1):
        if path[:n] in positions:
            line, col = positions[path[:n]]
            return f"{name}:{line}:{col}: {_dotted(path)}"
    return f"{name}: {_dotted(path)}"


def _data_path(loc: tuple[Any, ...], data: Any) -> KeyPath:
    """Pydantic locations include union branch names ('str', 'tuple[...]'); keep only real keys and indexes."""
    out: list[str | int] = []
    cur = data
    for part in loc:
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
            out.append(part)
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
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
            line = f"{_locate(source, key_positions, path)}: {msg}"
        elif kind == "missing" or kind == "missing_keyword_argument":
            line = f"{_locate(source, positions, path)}: required key is missing"
        else:
            line = f"{_locate(source, positions, path)}: {_message(err)}"
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
    )
    for section, key, values in unique:
        first: dict[Any, int] = {}
        for i, value in enumerate(values):
            if value in first:
                problems.append(
                    f"{_locate(source, positions, (section, i, key))}: {str(value)!r} is already used by "
                    f"{section}[{first[value]}]; each {key} may appear once"
                )
            first.setdefault(value, i)
    for i, root in enumerate(cfg.watch):
        for key in ("include", "exclude"):
            for j, pattern in enumerate(getattr(root, key)):
                try:
                    _valid_globs((pattern,))
                except ValueError as exc:
                    problems.append(f"{_locate(source, positions, ('watch', i, key, j))}: {exc}")
    for i, rule in enumerate(cfg.rules):
        for key in ("prompt", "system"):
            text = getattr(rule, key)
            if rule.keywords is None and text and "vocabulary" in rules.template_fields(text):
                problems.append(
                    f"{_locate(source, positions, ('rules', i, key))}: {{vocabulary}} needs a vocabulary: set "
                    f"rules[{i}].keywords.vocabulary to a keyword file, or remove the placeholder"
                )
        for key in ("on_success", "on_error"):
            action: ActionSpec | None = getattr(rule, key)
            for j, arg in enumerate(action.exec or () if action else ()):
                try:
                    rules.check_template(arg, extra=("sidecar", "status"))
                except ValueError as exc:
                    problems.append(f"{_locate(source, positions, ('rules', i, key, 'exec', j))}: {exc}")
        for j, ref in enumerate(rule.reference_images):
            if not ref.is_file():
                problems.append(
                    f"{_locate(source, positions, ('rules', i, 'reference_images', j))}: {ref} is not a readable file"
                )
    if cfg.endpoint.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", cfg.endpoint.api_key_env):
        problems.append(
            f"{_locate(source, positions, ('endpoint', 'api_key_env'))}: must be the NAME of an environment "
            "variable (like OPENAI_API_KEY), not the key itself"
        )
    return problems
