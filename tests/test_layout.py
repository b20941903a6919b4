"""The tree shows the architecture: the pure core (aggregation, privacy math, config,
data, persona assignment, small helpers) runs without Flower, and no floor imports the
one above it (simulations over client and server over shared)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PURE = ("server.aggregation", "shared.config", "shared.data", "shared.personas",
        "shared.privacy", "shared.util")
# a package may import these of ours, and nothing above
FLOORS = {"shared": {"shared"}, "client": {"shared", "client"},
          "server": {"shared", "server"},
          "simulations": {"shared", "client", "server", "simulations"}}


@pytest.mark.parametrize("package", PURE)
def test_the_pure_core_imports_no_flower(package):
    # Act: import the package and every module under it in a fresh interpreter
    code = (
        "import importlib, pkgutil, sys\n"
        f"root = importlib.import_module({package!r})\n"
        "for info in pkgutil.walk_packages(getattr(root, '__path__', []), root.__name__ + '.'):\n"
        "    importlib.import_module(info.name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'flwr'))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)

    # Assert
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def _our_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return {name.split(".")[0] for name in names} & set(FLOORS)


@pytest.mark.parametrize("floor", sorted(FLOORS))
def test_no_floor_imports_the_one_above(floor):
    above = {str(path.relative_to(ROOT)): sorted(_our_imports(path) - FLOORS[floor])
             for path in sorted((ROOT / floor).rglob("*.py"))}

    assert {path: names for path, names in above.items() if names} == {}
    assert above  # the floor has modules: the check saw something
