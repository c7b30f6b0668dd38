"""docs/architecture.md names modules: each of them exists, and every module of
the package is named there (so the page keeps up with the code)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent.parent
DOC = ROOT / "docs" / "architecture.md"
NAMED = re.compile(r"`([a-z_]+(?:/[a-z_]+)*\.py)`")


def named_modules() -> set[str]:
    return set(NAMED.findall(DOC.read_text()))


def test_every_module_the_page_names_exists() -> None:
    named = {name for name in named_modules() if not name.startswith("tests/")}
    missing = sorted(name for name in named if not (ROOT / "uproxy" / name).exists())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


def test_every_module_is_on_the_page() -> None:
    modules = {str(path.relative_to(ROOT / "uproxy")) for path in (ROOT / "uproxy").rglob("*.py")
               if path.name not in ("__init__.py", "__main__.py")}
    unnamed = sorted(modules - named_modules())
    assert not unnamed, f"docs/architecture.md does not name: {unnamed}"
