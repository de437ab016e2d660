"""Caption backends, found through the ``lenscap.backends`` entry-point group.

The built-in backends register through the same entry points as third-party ones (see
``pyproject.toml``), so a plugin package adds a backend without touching lenscap.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from lenscap.backends.base import CaptionBackend
from lenscap.errors import UsageError

__all__ = ["available_backends", "backend_class"]

_BUILTIN = {
    "openai": "lenscap.backends.openai_chat:OpenAIChatBackend",
    "openai-batch": "lenscap.backends.openai_batch:OpenAIBatchBackend",
    "batch-files": "lenscap.backends.openai_batch:BatchFilesBackend",
}


def available_backends() -> dict[str, str]:
    """Backend name -> ``module:Class``, built-ins included even when running from a source tree."""
    found = dict(_BUILTIN)
    for ep in entry_points(group="lenscap.backends"):
        found[ep.name] = ep.value
    return found


def backend_class(name: str) -> type[CaptionBackend]:
    import importlib

    known = available_backends()
    if name not in known:
        raise UsageError(f"unknown backend {name!r}; installed backends: {', '.join(sorted(known))}")
    module_name, _, attr = known[name].partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(cls, type) and issubclass(cls, CaptionBackend)):
        raise UsageError(f"backend {name!r} ({known[name]}) is not a CaptionBackend")
    return cls
