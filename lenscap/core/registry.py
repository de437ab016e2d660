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
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from lenscap.core.errors import UsageError

__all__ = ["Registry", "Option", "OptionRenamed", "FLAGGED"]

# Tests of whether a command has a flag of its own named after an option (``--max-tokens``): then a bad
# value is named by that flag, whichever backend's spec refuses it. Each registry of plugins whose
# options a command promotes adds one (``lenscap.caption.backends``).
FLAGGED: list[Callable[[str], bool]] = []


class OptionRenamed(FutureWarning):
    """An option given under its old name (``max_new_tokens``): it still works, for one release."""


@dataclass(frozen=True)
class Option:
    """One option a plugin (a caption backend, a filter annotator) accepts: ``-O name=value`` on the
    command line, ``name`` in recipes and a keyword of ``lenscap.api.backend``. Values from the command
    line arrive as strings and are parsed here; a value that does not parse is refused with a message
    that shows it.

    ``panel``: a built-in backend's option that is also a flag of ``lenscap caption`` (``--max-tokens``), shown in
    ``--help`` under that panel; its help, type and default come from here (the defaults of every
    built-in backend that has it). An annotator's options are flags of ``lenscap filter`` named after
    it (``--clip-model``). ``default_text``: what a default of None means ("the server's").
    ``deprecated_names``: old names still accepted (for one release), with an ``OptionRenamed`` warning.
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    repeated: bool = False
    deprecated_names: tuple[str, ...] = ()
    panel: str | None = None
    default_text: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, value: Any) -> Any:
        if self.repeated:
            values = value if isinstance(value, (list, tuple)) else [value]
            return [self._one(v) for v in values]
        return self._one(value)

    def _refuse(self, value: Any, problem: str) -> UsageError:
        """``--max-tokens takes an int, not 'lots'``; ``-O digits=two: digits takes an int, not 'two'``."""
        shown = value if isinstance(value, str) else repr(value)
        if self.panel is not None or any(is_flag(self.name) for is_flag in FLAGGED):
            return UsageError(f"{self.flag} {problem}, not {value!r}")
        return UsageError(f"-O {self.name}={shown}: {self.name} {problem}, not {value!r}")

    def _one(self, value: Any) -> Any:
        if value is None or isinstance(value, self.type) and not (self.type is int and isinstance(value, bool)):
            parsed = value
        elif self.type is bool:
            text = str(value).strip().lower()
            if text not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise self._refuse(value, "takes true or false")
            parsed = text in ("1", "true", "yes", "on")
        elif (
            self.type in (int, float)
            and isinstance(value, bool)  # True is no number of anything
            or self.type is int
            and isinstance(value, float)
            and not value.is_integer()
        ):  # 2.5 is no int (2.0 is)
            raise self._refuse(value, f"takes a{'n' if self.type is int else ''} {self.type.__name__}")
        else:
            try:
                parsed = self.type(value.strip() if isinstance(value, str) else value)
            except (TypeError, ValueError):
                raise self._refuse(value, f"takes a{'n' if self.type is int else ''} {self.type.__name__}") from None
        if self.choices is not None and parsed is not None and parsed not in self.choices:
            raise self._refuse(value, f"must be one of {', '.join(self.choices)}")
        return parsed

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "flag": self.flag,
            "type": self.type.__name__ + ("[]" if self.repeated else ""),
            "default": self.default,
            "default_text": self.default_text,
            "choices": list(self.choices) if self.choices else None,
            "help": self.help,
            "panel": self.panel,
            "deprecated_names": list(self.deprecated_names),
        }


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
            # A built-in is one of lenscap's own classes, whatever name lenscap was installed under.
            if dist is not None and ep.value != self.builtins.get(ep.name):
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
