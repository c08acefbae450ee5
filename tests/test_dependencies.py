"""pyproject declares every third-party package lens_jax imports (runtime or an extra), and every
runtime dependency is imported by lens_jax (or is in the short list of why not)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# runtime dependencies lens_jax does not import itself, and why
NOT_IMPORTED = {"jinja2": "transformers renders the GPT-OSS chat template with it but does not require it"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imported_modules() -> set[str]:
    names = set()
    for path in (ROOT / "lens_jax").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"lens_jax", "__future__"}


def test_imports_are_declared_and_runtime_dependencies_used():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_name(r) for r in project["dependencies"]}
    declared = runtime | {_name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    dists = packages_distributions()
    used = set()
    for module in sorted(_imported_modules()):
        names = {_name(d) for d in dists.get(module, [module])}
        assert names & declared, f"lens_jax imports {module!r} ({sorted(names)}) but pyproject does not declare it"
        used |= names
    assert runtime - used == set(NOT_IMPORTED), f"runtime dependencies lens_jax never imports: {runtime - used}"
