"""The import direction of the package: every module sits in one layer and imports only from its own layer or below.

A module imported "upwards" is how import cycles start (config and rules once imported each other), and it drags
heavy modules into processes that do not need them (decoder workers, ``status``). Each module is imported in a fresh
interpreter, so what counts is everything it really loads at import time, not what its source seems to say; imports
inside functions (the CLI loading a command's module when it runs) are not import-time and do not count.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mmwatchd"

#: Bottom first. A module may import modules of its own layer and of the layers below it, never above.
LAYERS: tuple[tuple[str, ...], ...] = (
    # Plain building blocks: no mmwatchd imports of their own.
    (
        "mmwatchd",
        "mmwatchd.errors",
        "mmwatchd.log",
        "mmwatchd.globs",
        "mmwatchd.templates",
        "mmwatchd.isobmff",
        "mmwatchd.vocabulary",
        "mmwatchd.live",
        "mmwatchd.limiter",
    ),
    # Every frozen value: the config specs and what passes between stages.
    ("mmwatchd.model",),
    # Reading and encoding media, in isolated decoder processes.
    (
        "mmwatchd.media",
        "mmwatchd.isolate",
        "mmwatchd.encode",
        "mmwatchd.encode.budget",
        "mmwatchd.encode.strip",
        "mmwatchd.encode.raw",
        "mmwatchd.encode.image",
        "mmwatchd.encode.container",
        "mmwatchd.encode.sampling",
        "mmwatchd.encode.video",
        "mmwatchd.encode.warm",
    ),
    # Which rule a file gets; loading the config.
    ("mmwatchd.rules", "mmwatchd.config"),
    # Files on disk: sidecars, the state database, the walk, the watchers, what is done, hooks, notifications.
    (
        "mmwatchd.sidecar",
        "mmwatchd.state",
        "mmwatchd.done",
        "mmwatchd.walk",
        "mmwatchd.settle",
        "mmwatchd.watch",
        "mmwatchd.index",
        "mmwatchd.actions",
        "mmwatchd.notify",
        "mmwatchd.xmp",
        "mmwatchd.outputs",
    ),
    # Reading what was written: search, status, the gallery.
    ("mmwatchd.search", "mmwatchd.status", "mmwatchd.gallery", "mmwatchd.progress", "mmwatchd.metrics"),
    # The model endpoint: what each server takes, the request body, the client, the endpoint check; the endpoints
    # as the daemon runs them (meter, gate, prober, routing) and how a file's failed tries end.
    ("mmwatchd.servers", "mmwatchd.wire", "mmwatchd.vlm", "mmwatchd.doctor", "mmwatchd.endpoint", "mmwatchd.retry"),
    # One file, start to end.
    ("mmwatchd.pipeline",),
    # The service: queue, workers, watchers, signals.
    ("mmwatchd.daemon", "mmwatchd.backfill"),
    # The command line.
    ("mmwatchd.cli", "mmwatchd.__main__"),
)

LAYER_OF = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(_module_name(p) for p in PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    missing = [m for m in MODULES if m not in LAYER_OF]
    assert not missing, f"add {missing} to LAYERS in tests/test_layers.py (and to the README's module map)"
    gone = [m for m in LAYER_OF if m not in MODULES]
    assert not gone, f"{gone} no longer exist: remove them from LAYERS"


#: Run in one interpreter that has loaded these (and no mmwatchd module): each module is then imported in a fork of
#: it, which sees the same mmwatchd modules load as a fresh interpreter would, without paying for these each time.
#: watchdog is not among them: whether a module loads it is one of the things looked at.
_THIRD_PARTY = ("pydantic", "pydantic_core", "yaml", "structlog", "jsonschema", "lxml.etree", "PIL.Image", "av",
                "pillow_heif", "numpy", "rawpy", "openai", "tqdm", "prometheus_client")  # fmt: skip

_PROBE = r"""
import importlib, json, os, sys
for name in sys.argv[2:]:
    try:
        importlib.import_module(name)
    except ImportError:
        pass
assert not [m for m in sys.modules if m == "mmwatchd" or m.startswith("mmwatchd.")]
with open(sys.argv[1], "w") as out:
    for module in json.loads(sys.stdin.read()):
        out.flush()
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(module)
                loaded = sorted(m for m in sys.modules if m == "mmwatchd" or m.startswith("mmwatchd."))
                line = {"module": module, "loaded": loaded, "watchdog": "watchdog" in sys.modules}
            except BaseException as exc:
                line = {"module": module, "error": f"{type(exc).__name__}: {exc}"}
            out.write(json.dumps(line) + "\n")
            out.flush()
            os._exit(0)
        os.waitpid(pid, 0)
"""


@pytest.fixture(scope="module")
def loads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    """What importing each module loads, each in a fork of an interpreter that has loaded no mmwatchd module."""
    out = tmp_path_factory.mktemp("layers") / "loads.jsonl"
    run = subprocess.run(
        [sys.executable, "-c", _PROBE, str(out), *_THIRD_PARTY],
        input=json.dumps([m for m in MODULES if m != "mmwatchd.__main__"]),
        capture_output=True,
        text=True,
        cwd=PACKAGE.parent,
        env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)},
    )
    assert run.returncode == 0, run.stderr
    found = {}
    for line in out.read_text().splitlines():
        entry = json.loads(line)
        found[entry["module"]] = entry
    return found


@pytest.mark.parametrize("module", [m for m in MODULES if m != "mmwatchd.__main__"])
def test_a_module_imports_nothing_above_its_layer(module: str, loads: dict[str, dict[str, object]]) -> None:
    entry = loads[module]
    assert "error" not in entry, entry.get("error")
    loaded = entry["loaded"]
    assert isinstance(loaded, list)
    above = [m for m in loaded if LAYER_OF.get(m, len(LAYERS)) > LAYER_OF[module]]
    assert not above, f"importing {module} (layer {LAYER_OF[module]}) loads {above}, which sit above it"


def _top_level_imports(module: str) -> set[str]:
    """The mmwatchd modules a module imports at its top level, those for type checking included (a cycle of type
    imports is still a cycle for the reader and for mypy); imports inside functions do not count."""
    path = PACKAGE.parent.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    body = list(tree.body)
    for node in body:
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            body.extend(node.body)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m in LAYER_OF and m != module}


def test_no_module_imports_another_modules_private_names() -> None:
    """A name one module shares with another is public: a private import (the video encoder once borrowed the image
    encoder's tuning constants) hides a dependency that belongs in a module of its own."""
    found = []
    for module in MODULES:
        path = PACKAGE.parent.joinpath(*module.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("mmwatchd")):
                found += [
                    f"{module}: {a.name}" for a in node.names if a.name.startswith("_") and a.name != "__version__"
                ]
    assert not found


def test_no_import_cycle() -> None:
    """Modules of one layer may import each other, but never round in a circle."""
    graph = {m: _top_level_imports(m) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(n) :], n]))
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize(
    "module",
    ["mmwatchd.walk", "mmwatchd.settle", "mmwatchd.index", "mmwatchd.gallery", "mmwatchd.search", "mmwatchd.pipeline"],
)
def test_walking_folders_does_not_load_watchdog(module: str, loads: dict[str, dict[str, object]]) -> None:
    """The pipeline, the done-index, the gallery and search walk folders and filter names; only the live watch
    needs watchdog (and its threads)."""
    assert loads[module].get("watchdog") is False, loads[module]


def test_the_probe_sees_what_a_module_loads(loads: dict[str, dict[str, object]]) -> None:
    """The forked probe is not blind: the CLI loads the config and the watcher's module loads watchdog."""
    assert "mmwatchd.config" in loads["mmwatchd.cli"]["loaded"]  # type: ignore[operator]
    assert loads["mmwatchd.watch"]["watchdog"] is True
