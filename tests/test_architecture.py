"""The packages import one way (docs/architecture.md): task -> environment -> models and utilities; agents use the
environments' public API; nothing below imports what is above it. Every import counts, lazy ones in functions
too, because a lazy import against the direction is still a dependency (and a cycle waiting to happen)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

ALLOWED = {
    "utils": set(),
    "models": {"utils"},
    "rewards": {"models", "utils"},
    "envs": {"rewards", "models", "utils"},
    "zoo": {"rewards", "models", "utils"},
    "tasks": {"envs", "zoo", "rewards", "models", "utils"},
    "label": {"rewards", "models", "utils"},
    "agents": {"envs", "rewards", "models", "utils", "lmgym"},
    "integrations": {"agents", "tasks", "envs", "zoo", "rewards", "models", "utils", "lmgym"},
    "bench": {"integrations", "agents", "tasks", "envs", "zoo", "rewards", "models", "utils", "lmgym"},
}
"""each package of lmgym and what it may import besides itself (``lmgym``: the top-level package, which
registers the tasks, so that an export can rebuild a run's environment by its id); ``lmgym/cli.py``,
``lmgym/train_own.py`` and ``lmgym/run_folders.py`` sit on top and may import anything"""

TOP = {"lmgym", "cli", "train_own", "run_folders", "_moved"}


def package_of(module: str) -> str | None:
    """``lmgym.envs.core`` -> ``envs``; ``lmgym.agents.common.base`` -> ``agents``; ``lmgym`` -> ``lmgym``."""
    parts = module.split(".")
    if parts[0] != "lmgym":
        return None
    return parts[1] if len(parts) > 1 else "lmgym"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "agents":
        parts = ["lmgym", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path):
    """``(line, imported module)`` for every import in the file, at any depth."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:  # from lmgym import zoo: the submodule lmgym.zoo
                yield node.lineno, f"{node.module}.{alias.name}"


def sources() -> list[Path]:
    return sorted([*(ROOT / "lmgym").rglob("*.py"), *(ROOT / "agents").rglob("*.py")])


def cross_package_imports():
    """``(path, line, package, imported module, its package)`` for each import from one lmgym package into
    another (the command line on top left out)."""
    for path in sources():
        here = package_of(module_name(path))
        if here in TOP:
            continue
        for line, target in imports_of(path):
            there = package_of(target)
            if there is None or there == here or target.split(".")[-1][:1].isupper():
                continue  # outside lmgym, inside the same package, or a name (from lmgym.envs import TextGenEnv)
            yield path, line, here, target, there


def violations():
    return [f"{path.relative_to(ROOT)}:{line} ({here}) imports {target} ({there})"
            for path, line, here, target, there in cross_package_imports() if there not in ALLOWED[here]]


def test_every_package_has_a_place_in_the_direction():
    packages = {package_of(module_name(p)) for p in sources()} - TOP
    assert packages <= set(ALLOWED), packages - set(ALLOWED)


def test_imports_follow_the_direction():
    assert violations() == []


def test_the_check_catches_an_import_against_the_direction():
    """A model module importing the environment, or the environment importing an agent, is caught."""
    bad = ROOT / "lmgym" / "models" / "_direction_probe.py"
    bad.write_text("from lmgym.envs import TextGenEnv\nimport lmgym.envs.core\n\n"
                   "def f():\n    from lmgym.agents import PPO\n")
    try:
        found = [v for v in violations() if "_direction_probe" in v]
    finally:
        bad.unlink()
    assert any("imports lmgym.envs.core (envs)" in v for v in found)
    assert any("imports lmgym.agents (agents)" in v for v in found)


def test_no_import_cycle_between_packages():
    """The package graph of the actual imports has no cycle (the allowed graph above has none either)."""
    edges: dict[str, set[str]] = {}
    for _, _, here, _, there in cross_package_imports():
        if there not in TOP:
            edges.setdefault(here, set()).add(there)
    seen, stack = set(), []

    def visit(node):
        if node in stack:
            pytest.fail(f"import cycle: {' -> '.join(stack[stack.index(node):] + [node])}")
        if node in seen:
            return
        stack.append(node)
        for nxt in edges.get(node, ()):
            visit(nxt)
        stack.pop()
        seen.add(node)

    for node in list(edges):
        visit(node)
