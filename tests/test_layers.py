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
    ),
    # Which rule a file gets; loading the config.
    ("mmwatchd.rules", "mmwatchd.config"),
    # Files on disk: sidecars, the state database, the walk, the watchers, what is done, hooks, notifications.
    (
        "mmwatchd.sidecar",
        "mmwatchd.state",
        "mmwatchd.walk",
        "mmwatchd.settle",
        "mmwatchd.watch",
        "mmwatchd.index",
        "mmwatchd.actions",
        "mmwatchd.notify",
        "mmwatchd.xmp",
    ),
    # Reading what was written: search, status, the gallery.
    ("mmwatchd.search", "mmwatchd.status", "mmwatchd.gallery", "mmwatchd.progress", "mmwatchd.metrics"),
    # The model endpoint: what each server takes, the request body, the client, the endpoint check.
    ("mmwatchd.servers", "mmwatchd.wire", "mmwatchd.vlm", "mmwatchd.doctor"),
    # One file, start to end.
    ("mmwatchd.pipeline",),
    # The service: queue, workers, watchers, signals.
    ("mmwatchd.daemon",),
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


@pytest.mark.parametrize("module", [m for m in MODULES if m != "mmwatchd.__main__"])
def test_a_module_imports_nothing_above_its_layer(module: str) -> None:
    code = (
        f"import importlib, json, sys; importlib.import_module({module!r}); "
        "print(json.dumps(sorted(m for m in sys.modules if m == 'mmwatchd' or m.startswith('mmwatchd.'))))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=PACKAGE.parent,
        env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)},
    )
    assert run.returncode == 0, run.stderr
    loaded = json.loads(run.stdout)
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
                found += [f"{module}: {a.name}" for a in node.names if a.name.startswith("_") and a.name != "__version__"]
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
    "module", ["mmwatchd.walk", "mmwatchd.settle", "mmwatchd.index", "mmwatchd.gallery", "mmwatchd.search", "mmwatchd.pipeline"]
)
def test_walking_folders_does_not_load_watchdog(module: str) -> None:
    """The pipeline, the done-index, the gallery and search walk folders and filter names; only the live watch
    needs watchdog (and its threads)."""
    code = f"import importlib, sys; importlib.import_module({module!r}); print('watchdog' in sys.modules)"
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=PACKAGE.parent,
        env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)},
    )
    assert (run.returncode, run.stdout.strip()) == (0, "False"), run.stderr
