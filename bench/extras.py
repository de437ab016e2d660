"""What a benchmark needs beyond lenscap's core: a part whose package is missing says so in one line
and is skipped, and the benchmark runs the rest (run as ``python bench/X.py``, this file is beside it)."""

from __future__ import annotations

import importlib.util

from lenscap.core.install import install_hint


def missing(part: str, extra: str, *modules: str) -> bool:
    """True, having printed one line saying so, when any of ``modules`` (which lenscap's ``extra``
    installs) cannot be imported: the caller skips ``part``."""
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if absent:
        print(f"skipped {part}: it needs {', '.join(absent)} ({install_hint(extra)})", flush=True)
    return bool(absent)
