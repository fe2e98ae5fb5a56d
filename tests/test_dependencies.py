"""pyproject.toml declares every package mmwatchd imports, with ranges the installed versions satisfy."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def _declared() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {_norm(r.name): r for r in map(Requirement, project["dependencies"])}


def _imported_distributions() -> dict[str, set[str]]:
    """Distribution name -> the modules of mmwatchd that import it (standard library and mmwatchd itself left out)."""
    owners = importlib.metadata.packages_distributions()
    out: dict[str, set[str]] = {}
    for source in (REPO / "mmwatchd").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "mmwatchd":
                    continue
                for dist in owners.get(top, [top]):
                    out.setdefault(_norm(dist), set()).add(source.relative_to(REPO).as_posix())
    return out


def test_every_imported_package_is_declared() -> None:
    declared = _declared()
    # pydantic-core is imported (model.py's HttpUrl hook) but pinned to an exact version by pydantic itself.
    missing = {d: sorted(m) for d, m in _imported_distributions().items() if d not in declared and d != "pydantic-core"}
    assert not missing, f"imported but not in pyproject.toml's dependencies: {missing}"
    assert "pydantic" in declared


def test_installed_versions_are_in_the_declared_ranges() -> None:
    wrong = {
        name: f"{importlib.metadata.version(name)} not in {req.specifier}"
        for name, req in _declared().items()
        if not req.specifier.contains(importlib.metadata.version(name), prereleases=True)
    }
    assert not wrong, wrong


def test_the_bounds_the_code_relies_on() -> None:
    declared = _declared()
    # watch.py subclasses watchdog's private inotify reader: a new major may change it without notice.
    assert not declared["watchdog"].specifier.contains("8.0")
    # AVIF is decoded by Pillow itself (pillow-heif 1.x has no AVIF decoder); 11.3 is the first with it in the wheels.
    assert not declared["pillow"].specifier.contains("11.2.1") and declared["pillow"].specifier.contains("11.3.0")
    from PIL import features

    assert features.check("avif"), "this Pillow cannot read AVIF"
