"""Packaging habits: every third-party package the code imports is declared in
pyproject.toml (the product's in ``dependencies``, the tests' also in the ``dev`` extra),
so ``pip install .`` into a clean environment brings what an import needs."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"client", "server", "shared", "simulations", "tests", "helpers", "deployment"}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(*extras: str) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in extras:
        specs += project["optional-dependencies"][extra]
    return {_normal(re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0]) for spec in specs}


def _third_party_imports(folders: list[str]) -> dict[str, set[str]]:
    """Top-level imported module -> the files importing it, outside the stdlib and ours."""
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top not in OURS and top not in sys.stdlib_module_names \
                            and top != "__future__":
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize(("folders", "extras"), [
    (["client", "server", "shared", "simulations"], ()),
    (["tests"], ("dev",)),
])
def test_every_imported_package_is_declared(folders, extras):
    distributions = packages_distributions()
    declared = _declared(*extras)
    imports = _third_party_imports(folders)

    missing = {top: sorted(files)[:3] for top, files in imports.items()
               if not {_normal(d) for d in distributions.get(top, [])} & declared}

    assert missing == {}
    assert "torch" in imports  # the scan saw the code
