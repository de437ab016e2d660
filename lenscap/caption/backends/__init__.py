"""Caption backends, found through the ``lenscap.backends`` entry-point group.

The built-in backends register through the same entry points as third-party ones (see
``pyproject.toml``), so a plugin package adds a backend without touching lenscap.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

from lenscap.caption.backends.base import CaptionBackend
from lenscap.core.registry import FLAGGED, Option, Registry

__all__ = ["available_backends", "backend_class", "describe_backends", "promoted", "REGISTRY"]

REGISTRY = Registry(
    "lenscap.backends",
    "backend",
    CaptionBackend,
    {
        "openai": "lenscap.caption.backends.openai_chat:OpenAIChatBackend",
        "openai-batch": "lenscap.caption.backends.openai_batch:OpenAIBatchBackend",
        "batch-files": "lenscap.caption.backends.openai_batch:BatchFilesBackend",
        "anthropic": "lenscap.caption.backends.anthropic_messages:AnthropicBackend",
        "anthropic-batch": "lenscap.caption.backends.anthropic_batch:AnthropicBatchBackend",
        "gemini": "lenscap.caption.backends.gemini:GeminiBackend",
        "gemini-batch": "lenscap.caption.backends.gemini_batch:GeminiBatchBackend",
        "describe": "lenscap.caption.backends.describe:DescribeBackend",
        "transformers": "lenscap.caption.backends.transformers_local:TransformersBackend",
        "vllm": "lenscap.caption.backends.vllm_local:VllmBackend",
    },
)


@functools.cache
def promoted() -> dict[str, tuple[Option, dict[str, Option]]]:
    """The built-in backends' options that are flags of ``lenscap caption`` (they have a ``panel``):
    name -> (the first backend's spec, {backend: its spec})."""
    out: dict[str, tuple[Option, dict[str, Option]]] = {}
    for name in REGISTRY.builtins:
        for spec in backend_class(name).options:
            if spec.panel is not None:
                out.setdefault(spec.name, (spec, {}))[1][name] = spec
    return out


FLAGGED.append(lambda name: name in promoted())


def available_backends() -> dict[str, str]:
    """Backend name -> ``module:Class``, built-ins included even when running from a source tree."""
    return REGISTRY.available()


def backend_class(name: str) -> type[CaptionBackend]:
    return REGISTRY.load(name)  # type: ignore[no-any-return]


def describe_backends() -> list[dict[str, Any]]:
    """Every installed backend: where it comes from, whether it needs a key, its options."""
    sources = REGISTRY.sources()
    out = []
    for name, target in sorted(available_backends().items()):
        info: dict[str, Any] = {"name": name, "entry_point": target, "source": sources.get(name, "lenscap (built-in)")}
        try:
            cls = backend_class(name)
        except Exception as e:  # noqa: BLE001 - a broken plugin is listed with its error, not fatal
            info["error"] = f"{type(e).__name__}: {e}"
        else:
            info |= {
                "needs_key": cls.needs_key,
                "priced": cls.priced,
                "batch": cls.runs_as_batch,
                "summary": (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().split("\n")[0],
                "options": [o.describe() for o in cls.options],
            }
        out.append(info)
    return out
