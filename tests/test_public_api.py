"""The public API stays put: every import line of the README's and docs' code blocks and of every example runs,
without a deprecation warning; the module paths of lmgym 0.1 still import (the same module), with one."""

import ast
import importlib
import re
import sys
import warnings
from pathlib import Path

import pytest

from lmgym._moved import MOVED

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def import_statements(code: str) -> list[str]:
    """Every import statement in ``code`` (at any depth), as source text."""
    tree = ast.parse(code)
    return [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


CASES = [(page.name, stmt) for page in PAGES for block in python_blocks(page) for stmt in import_statements(block)]
CASES += [(example.name, stmt) for example in EXAMPLES for stmt in import_statements(example.read_text())]


def test_the_pages_and_examples_have_imports_to_check():
    assert {"README.md", "quickstart.py", "custom_agent.py"} <= {where for where, _ in CASES}


@pytest.mark.parametrize("where,statement", CASES, ids=[f"{w}:{s}" for w, s in CASES])
def test_an_import_of_the_docs_or_examples_runs_without_deprecation(where, statement):
    first = statement.split()[1].split(".")[0]
    if first != "lmgym" and importlib.util.find_spec(first) is None:
        pytest.skip(f"{first} is an optional extra, not installed here")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        exec(statement, {})


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_imports_the_moved_module_and_says_where_it_went(old):
    new = importlib.import_module(MOVED[old])
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{re.escape(old)} has moved to {re.escape(MOVED[old])}"):
        module = importlib.import_module(old)
    assert module is new


def test_the_tours_first_block_runs_as_written():
    """The README's 'Make an environment' block: a zoo model that exists offline, a diagnostic task, a batch."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("**Make an environment.**")[1].split("```python\n")[1].split("```")[0]
    scope = {}
    exec(block.replace('device="auto"', 'device="cpu"'), scope)
    assert scope["env"].unwrapped.optimal_return > 0 and scope["venv"].num_envs == 64
