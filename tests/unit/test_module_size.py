"""Product modules stay small enough to read in one sitting (ruff's C901 at 12, in pyproject.toml, keeps each
function small; this keeps each module under 600 lines)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cacovid_rl", "cacovid_cli", "actors", "learner")
MAX_LINES = 600


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_above_600_lines(package: str) -> None:
    modules = sorted((ROOT / package).rglob("*.py"))
    assert modules, f"no modules found under {package}/"
    too_long = {
        m.relative_to(ROOT).as_posix(): n for m in modules if (n := len(m.read_text().splitlines())) > MAX_LINES
    }
    assert not too_long, f"split these modules (lines): {too_long}"
