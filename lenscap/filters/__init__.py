"""Content annotators for ``lenscap filter``: each computes score columns from a decoded image and,
given a threshold, names the samples to drop. Found through the ``lenscap.filters`` entry points,
built-ins included, like caption backends."""

from __future__ import annotations

from lenscap.filters.base import Annotator
from lenscap.plugins import Registry

__all__ = ["annotator_class", "available_annotators", "REGISTRY"]

REGISTRY = Registry("lenscap.filters", "annotator", Annotator, {
    "blur": "lenscap.filters.builtin:Blur",
    "uniform": "lenscap.filters.builtin:Uniform",
    "ocr": "lenscap.filters.builtin:TextArea",
    "faces": "lenscap.filters.builtin:Faces",
    "nsfw": "lenscap.filters.builtin:Nsfw",
    "clip": "lenscap.filters.clip:ClipScore",
})


def available_annotators() -> dict[str, str]:
    return REGISTRY.available()


def annotator_class(name: str) -> type[Annotator]:
    return REGISTRY.load(name)  # type: ignore[no-any-return]
