"""lenscap installs by a name nobody else holds: ``lenscap`` on the package registry is another project,
so every install hint, in the code and in the docs, names the distribution ``pyproject.toml`` names."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from lenscap.core.install import DISTRIBUTION, install_hint

ROOT = Path(__file__).resolve().parent.parent
# A requirement with extras after `pip install` (options such as -e or --upgrade may come first).
_PIP_EXTRAS = re.compile(r"pip install\s+(?:-[-\w]+\s+)*['\"]?([\w.\-/]+)\[")
# The import name with extras: what pip would take for the other project.
_IMPORT_NAME_EXTRAS = re.compile(r"(?<![\w\-./])lenscap\[")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _texts() -> dict[str, str]:
    """Every file a user or the code reads an install command from: the code, the docs, the examples,
    the benchmarks, the tests, the project files."""
    paths = [ROOT / "README.md", ROOT / "pyproject.toml", ROOT / "dev.py", ROOT / "mkdocs.yml"]
    for folder, patterns in {
        "lenscap": ("*.py", "*.toml"),
        "docs": ("*.md", "*.py"),
        "examples": ("*.md", "*.py", "*.toml"),
        "bench": ("*.py", "*.md"),
        "tests": ("*.py",),
    }.items():
        paths += [p for pattern in patterns for p in (ROOT / folder).rglob(pattern) if "__pycache__" not in p.parts]
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in paths if p.is_file()}


def test_the_code_installs_by_the_name_pyproject_gives():
    assert _project()["name"] == DISTRIBUTION != "lenscap"
    assert install_hint("ray") == f"pip install '{DISTRIBUTION}[ray]'"
    # the `all` extra names its own distribution, or pip would fetch the other project's
    assert all(extra.startswith(f"{DISTRIBUTION}[") for extra in _project()["optional-dependencies"]["all"])


def test_every_install_hint_names_the_distribution():
    texts = _texts()
    assert "lenscap/core/executors.py" in texts and "docs/ray.md" in texts  # the scan reaches code and docs
    wrong = []
    for name, text in texts.items():
        for line_no, line in enumerate(text.splitlines(), 1):
            named = [m.group(1) for m in _PIP_EXTRAS.finditer(line)]
            if _IMPORT_NAME_EXTRAS.search(line) or any(n not in (DISTRIBUTION, ".") for n in named):
                wrong.append(f"{name}:{line_no}: {line.strip()}")
    assert not wrong, f"install hints that do not name {DISTRIBUTION!r}:\n" + "\n".join(wrong)


def test_the_example_plugins_depend_on_the_distribution():
    for pyproject in sorted((ROOT / "examples").glob("*/pyproject.toml")):
        needs = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
        ours = [d for d in needs if re.match(r"lenscap\b", d)]
        assert ours and all(re.match(rf"{re.escape(DISTRIBUTION)}\b(?!-)", d) for d in ours), (pyproject, needs)
