"""Entry-point registries: built-ins and third-party packages found the same way.

A registry maps names to ``module:Class`` targets: the built-ins listed here (so a source checkout
without installed metadata still works) merged with the package entry points of one group
(``lenscap.backends``, ``lenscap.filters``). Loading a name imports its class and checks it: a
subclass of the registry's base, and whatever the base's ``plugin_problems()`` finds wrong.

This module is lenscap's machinery. What a plugin imports (the base classes, ``Option``, the
outcome statuses) is in ``lenscap.plugin``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from lenscap.core.errors import UsageError

__all__ = ["Registry"]


class Registry:
    def __init__(self, group: str, kind: str, base: type, builtins: dict[str, str]) -> None:
        self.group, self.kind, self.base, self.builtins = group, kind, base, builtins

    def available(self) -> dict[str, str]:
        """Name -> ``module:Class``."""
        found = dict(self.builtins)
        for ep in entry_points(group=self.group):
            found[ep.name] = ep.value
        return found

    def sources(self) -> dict[str, str]:
        """Name -> where it comes from: lenscap itself, or a package and its version."""
        out = {name: "lenscap (built-in)" for name in self.builtins}
        for ep in entry_points(group=self.group):
            dist = getattr(ep, "dist", None)
            if dist is not None and dist.metadata["Name"] != "lenscap":
                out[ep.name] = f"{dist.metadata['Name']} {dist.version}"
        return out

    def load(self, name: str) -> Any:
        known = self.available()
        if name not in known:
            raise UsageError(f"unknown {self.kind} {name!r}; installed {self.kind}s: {', '.join(sorted(known))}")
        module, _, attr = known[name].partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:  # a broken or half-installed plugin: one line, not a traceback
            raise UsageError(f"{self.kind} {name!r} ({known[name]}) cannot be imported: {type(e).__name__}: {e}") from None
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise UsageError(f"{self.kind} {name!r} ({known[name]}) is not a {self.base.__name__}")
        problems = cls.plugin_problems() if hasattr(cls, "plugin_problems") else []
        if problems:
            raise UsageError(f"{self.kind} {name!r} ({known[name]}) cannot be used: {'; '.join(problems)}")
        return cls
