"""The house rules of DEVELOPERS' guide, checked on the source (issue 12, item 8).

- one engine: nothing outside ``models/`` registers hooks or swaps a module's forward;
- no state on the model object: no ``_ffkv_*`` attributes, no ``model.__dict__`` caches;
- other capabilities are imported at module top: no function-level import across capability folders
  (the CLI's lazy loading of sub-commands goes through importlib, not an import statement);
- no import cycle among ffkv's modules (module-level imports form a DAG).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "ffkv"
CAPABILITIES = {"models", "memory", "locate", "edit", "evaluate", "recall", "testbed", "serve"}


def modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for f in sorted(SRC.rglob("*.py")):
        rel = f.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(["ffkv", *parts])] = (f, ast.parse(f.read_text()))
    return out


def _target(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _capability(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in CAPABILITIES else None


def test_no_hooks_or_module_swaps_outside_models():
    bad = []
    for name, (f, tree) in modules().items():
        if _capability(name) == "models":
            continue
        text = f.read_text()
        for needle in ("register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
                       ".forward = "):
            if needle in text:
                bad.append((name, needle))
    assert not bad, bad


def test_no_state_on_the_model_object():
    bad = [name for name, (f, _) in modules().items()
           if "_ffkv_" in f.read_text() or "model.__dict__" in f.read_text() or "hf.__dict__" in f.read_text()]
    assert not bad, bad


def test_capabilities_are_imported_at_module_top():
    bad = []
    for name, (f, tree) in modules().items():
        is_pkg = f.name == "__init__.py"
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom):
                    targets = [_target(name, is_pkg, node)]
                elif isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                else:
                    continue
                for t in targets:
                    tc = _capability(t)
                    if t.startswith("ffkv") and tc is not None and tc != _capability(name):
                        bad.append(f"{f.relative_to(SRC)}:{node.lineno} imports {t} inside {fn.name}()")
    assert not bad, "\n".join(bad)


def test_module_level_imports_have_no_cycle():
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, (f, tree) in mods.items():
        is_pkg = f.name == "__init__.py"
        deps = set()
        for node in tree.body:  # module level only: function-level imports run after the module exists
            if isinstance(node, ast.ImportFrom):
                t = _target(name, is_pkg, node)
                cands = [t] + [f"{t}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                cands = [a.name for a in node.names]
            else:
                continue
            deps |= {c for c in cands if c in mods and c != name}
        graph[name] = deps
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in graph[n]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n)
    assert len(graph) > 50
