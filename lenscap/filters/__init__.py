"""Content annotators for ``lenscap filter``: each computes score columns from a decoded image and,
given a threshold, names the samples to drop. Found through the ``lenscap.filters`` entry points,
built-ins included, like caption backends."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from lenscap.errors import UsageError
from lenscap.filters.base import Annotator

__all__ = ["annotator_class", "available_annotators"]

_BUILTIN = {
    "blur": "lenscap.filters.builtin:Blur",
    "uniform": "lenscap.filters.builtin:Uniform",
    "ocr": "lenscap.filters.builtin:TextArea",
    "faces": "lenscap.filters.builtin:Faces",
    "nsfw": "lenscap.filters.builtin:Nsfw",
    "clip": "lenscap.filters.clip:ClipScore",
}


def available_annotators() -> dict[str, str]:
    found = dict(_BUILTIN)
    for ep in entry_points(group="lenscap.filters"):
        found[ep.name] = ep.value
    return found


def annotator_class(name: str) -> type[Annotator]:
    known = available_annotators()
    if name not in known:
        raise UsageError(f"unknown annotator {name!r}; installed: {', '.join(sorted(known))}")
    module, _, attr = known[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Annotator)):
        raise UsageError(f"annotator {name!r} ({known[name]}) is not an Annotator")
    return cls
