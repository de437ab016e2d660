"""Content annotators for ``lenscap filter``: each computes score columns from a decoded image and,
given a threshold, names the samples to drop. Found through the ``lenscap.filters`` entry points,
built-ins included, like caption backends. ``describe_filters`` lists them (``lenscap filters``)."""

from __future__ import annotations

import sys
from typing import Any

from lenscap.core.install import install_hint
from lenscap.core.registry import Registry
from lenscap.filter.annotators.base import Annotator

__all__ = ["annotator_class", "available_annotators", "describe_filters", "filters_lines", "REGISTRY"]

REGISTRY = Registry(
    "lenscap.filters",
    "annotator",
    Annotator,
    {
        "blur": "lenscap.filter.annotators.builtin:Blur",
        "uniform": "lenscap.filter.annotators.builtin:Uniform",
        "ocr": "lenscap.filter.annotators.builtin:TextArea",
        "faces": "lenscap.filter.annotators.builtin:Faces",
        "nsfw": "lenscap.filter.annotators.builtin:Nsfw",
        "clip": "lenscap.filter.annotators.clip:ClipScore",
        "aesthetic": "lenscap.filter.annotators.aesthetic:Aesthetic",
    },
)


def available_annotators() -> dict[str, str]:
    return REGISTRY.available()


def annotator_class(name: str) -> type[Annotator]:
    return REGISTRY.load(name)  # type: ignore[no-any-return]


def _summary(cls: type) -> str:
    """The first paragraph of the class's (or its module's) docstring, on one line."""
    doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip()
    return " ".join(doc.split("\n\n")[0].split())


def describe_filters() -> list[dict[str, Any]]:
    """Every installed annotator, by name: where it comes from, its score and threshold (flag,
    meaning, which side is dropped, default), the extra it needs, and whether it can run here.

    An annotator that cannot be imported (a broken plugin) is listed with its ``error``; one whose
    dependencies are missing has ``available`` false and says what is ``missing``. Nothing is loaded
    beyond the classes (no model)."""
    sources = REGISTRY.sources()
    out = []
    for name, target in sorted(available_annotators().items()):
        info: dict[str, Any] = {"name": name, "entry_point": target, "source": sources.get(name, "lenscap (built-in)")}
        try:
            cls = annotator_class(name)
        except Exception as e:  # noqa: BLE001 - a broken plugin is listed with its error, not fatal
            info |= {"available": False, "error": f"{type(e).__name__}: {e}"}
            out.append(info)
            continue
        try:
            missing = cls.unavailable()
        except Exception as e:  # noqa: BLE001 - a plugin's own check failing says it cannot run
            missing = f"{type(e).__name__}: {e}"
        info |= {
            "summary": _summary(cls),
            "columns": [{"name": c.name, "type": str(c.type)} for c in cls.columns],
            "score": cls.score,
            "direction": cls.direction(),
            "threshold_flag": cls.threshold_flag,
            "threshold_option": f"--threshold {name}=VALUE",
            "threshold_help": cls.threshold_help
            or f"{cls.direction()} the threshold: samples whose {cls.score} is "
            f"{'below' if cls.keep_above else 'above'} it are dropped",
            "default_threshold": cls.default_threshold,
            "extra": cls.extra,
            "needs": install_hint(cls.extra) if cls.extra else None,
            "cost_rank": cls.cost_rank,
            "available": missing is None,
        }
        if missing is not None:
            info["missing"] = missing
        out.append(info)
    return out


def filters_lines(found: list[dict[str, Any]]) -> list[str]:
    """``describe_filters()`` as the text ``lenscap filters`` prints (as ``lenscap backends`` does)."""
    lines = []
    for f in found:
        if "error" in f:
            lines.append(f"{f['name']}  ({f['source']})  cannot be loaded: {f['error']}")
            continue
        traits = [f"needs the {f['extra']} extra"] if f["extra"] else []
        if not f["available"]:
            traits.append(f"not available here: {f['missing']}")
        lines.append(f"{f['name']}  ({f['source']}{'; ' + '; '.join(traits) if traits else ''})")
        if f["summary"]:
            lines.append(f"    {f['summary']}")
        flags = " or ".join(
            x for x in (f"{f['threshold_flag']} VALUE" if f["threshold_flag"] else None, f["threshold_option"]) if x
        )
        default = (
            "no default: scores only, drops nothing without a threshold"
            if f["default_threshold"] is None
            else f"default {f['default_threshold']:g}"
        )
        columns = ", ".join(c["name"] for c in f["columns"])
        lines.append(f"    score {f['score']} ({f['direction']} the threshold); columns: {columns}")
        lines.append(f"    {flags}: {f['threshold_help']} [{default}]")
    return lines
