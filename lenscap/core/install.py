"""How lenscap is installed: the name it has in the package registry, and the command a missing extra
asks for.

The import name and the command are ``lenscap``; the distribution is not, because ``lenscap`` on the
registry is another project (pip installing it gets that one). ``tests/test_install_hints.py`` holds
this name to ``pyproject.toml``'s and every install hint in the code and the docs to this name.
"""

from __future__ import annotations

__all__ = ["DISTRIBUTION", "install_hint"]

DISTRIBUTION = "lenscap-datasets"


def install_hint(extra: str) -> str:
    """The command that adds ``extra`` (``ocr``, ``ray``, ...) to an installed lenscap."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"
