"""bench/ and examples/ import ffkv inside their functions (so that --help is fast): check statically that every
ffkv name they import exists and is public, so a renamed or removed name fails here and not in a long run."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*REPO.glob("bench/*.py"), *REPO.glob("examples/*.py")])


def _ffkv_imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(module, name or None for `import module`, line) of every ffkv import in the script."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ffkv":
            out += [(node.module, a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "ffkv"]
    return out


def test_there_are_scripts():
    assert {p.parent.name for p in SCRIPTS} == {"bench", "examples"}


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_ffkv_name_a_script_imports_exists_and_is_public(path):
    imports = _ffkv_imports(path)
    assert imports, f"{path.name} imports nothing from ffkv"
    for module, name, line in imports:
        where = f"{path.parent.name}/{path.name}:{line}"
        assert not any(part.startswith("_") for part in module.split(".")), f"{where}: private module {module}"
        mod = importlib.import_module(module)
        if name is None:
            continue
        assert not name.startswith("_"), f"{where}: private name {module}.{name}"
        submodule = hasattr(mod, "__path__") and importlib.util.find_spec(f"{module}.{name}") is not None
        assert hasattr(mod, name) or submodule, f"{where}: {module} has no {name}"


@pytest.mark.parametrize("path", [p for p in SCRIPTS if p.name in ("bench_edit.py", "sequential_stress.py")],
                         ids=lambda p: p.name)
def test_help_runs(path):
    res = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout
