"""lenscap: captioned, filtered, deduplicated, training-ready image-text datasets from URL lists."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Resolved on first use: img2dataset's worker processes import lenscap's hooks module, and should
# not pay for pyarrow and the rest of the library on every spawn.
_EXPORTS = {
    "Dataset": "lenscap.core.dataset",
    "Sample": "lenscap.core.record",
    "LenscapError": "lenscap.core.errors",
    "UsageError": "lenscap.core.errors",
    "InputError": "lenscap.core.errors",
    "DatasetError": "lenscap.core.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lenscap' has no attribute {name!r}")
