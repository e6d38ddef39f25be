"""Imports go one way: the shell (``cacovid_cli``) -> Ray layers (``learner`` -> ``actors``) -> the library.

``cacovid_rl`` is the library: everything in it must run in one process without Ray, so it may not import Ray,
the Ray layers, the command line or the (not installed) research recipes. ``actors/`` may not reach into the
learner's side or the command line, and ``learner/`` may not import the command line. The check reads every
module's syntax tree, so imports inside functions (the lazy ones) count too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FORBIDDEN = {
    "cacovid_rl": ("ray", "actors", "learner", "cacovid_cli", "research"),
    "actors": ("learner", "cacovid_cli"),
    "learner": ("cacovid_cli",),
}
"""Top-level package -> the top-level packages none of its modules may import."""

_DYNAMIC_IMPORTERS = {"import_module", "__import__"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """Every module ``source`` imports, absolute, with its line: ``import``/``from`` statements anywhere in the
    tree (functions, ``try`` blocks, ``if TYPE_CHECKING``) plus ``importlib.import_module("x")`` and
    ``__import__("x")`` calls with a literal name. Relative imports are resolved against ``module``."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0]
            if called in _DYNAMIC_IMPORTERS and isinstance(first, ast.Constant) and isinstance(first.value, str):
                found.append((node.lineno, first.value))
    return found


def violations(package: str) -> list[str]:
    banned = FORBIDDEN[package]
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        module = _module_name(path)
        for line, name in sorted(imported_modules(path.read_text(), module, path.name == "__init__.py")):
            top = name.split(".")[0]
            if top in banned:
                out.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return out


def test_the_scanner_finds_every_kind_of_import():
    source = (
        "import os, ray.util\n"
        "from learner import driver\n"
        "def f():\n"
        "    from actors.evaluation import run_evaluation\n"
        "    try:\n"
        "        import research.tiny_vlm.train as t\n"
        "    except ImportError:\n"
        "        pass\n"
        "    importlib.import_module('cacovid_cli.main')\n"
        "    __import__('yaml')\n"
        "from . import config\n"
        "from ..answers import extract_answer\n"
        "from .sub import thing\n"
    )
    got = imported_modules(source, "cacovid_rl.data.records")
    assert sorted(got) == [
        (1, "os"),
        (1, "ray.util"),
        (2, "learner"),
        (4, "actors.evaluation"),
        (6, "research.tiny_vlm.train"),
        (9, "cacovid_cli.main"),
        (10, "yaml"),
        (11, "cacovid_rl.data"),
        (12, "cacovid_rl.answers"),
        (13, "cacovid_rl.data.sub"),
    ]
    # In a package's __init__, "." is the package itself.
    assert imported_modules("from .records import x\n", "cacovid_rl.data", is_package=True) == [
        (1, "cacovid_rl.data.records")
    ]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package: str):
    assert len(list((ROOT / package).rglob("*.py"))) > 1, f"{package}/ has no modules: the check would pass on nothing"
    bad = violations(package)
    assert not bad, f"{package}/ may not import {', '.join(FORBIDDEN[package])}:\n" + "\n".join(bad)


def test_library_never_imports_ray():
    """What actually lands in sys.modules, which also catches Ray pulled in by a third-party import."""
    code = (
        "import importlib, pkgutil, sys, cacovid_rl\n"
        "names = [m.name for m in pkgutil.walk_packages(cacovid_rl.__path__, 'cacovid_rl.')]\n"
        "assert len(names) > 20, names\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(k for k in sys.modules if k == 'ray' or k.startswith('ray.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
