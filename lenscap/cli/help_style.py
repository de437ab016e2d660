"""How ``--help`` reads where Typer 0.29's own rendering is untrue or mixes styles: it types every flag
``<bool>`` (``--help true`` is refused), puts a default in words in parentheses, and writes usage lines'
arguments three ways (``{in_dir}``, ``[work_dir]``, ``{[INPUT] OUT_DIR}...``). ``apply()`` patches the
three once: ``Usage: lenscap caption [OPTIONS] IN_DIR OUT_DIR``, ``--help`` untyped, ``[default: all cores]``.
"""

from __future__ import annotations

from typing import Any

import typer.core

__all__ = ["apply"]


def apply() -> None:
    core = typer.core
    if getattr(core.TyperArgument._usage_display_name, "lenscap", False):
        return  # applied already
    get_default_string = core._get_default_string  # type: ignore[attr-defined]
    display_type_rich = core.TyperOption.display_type_rich

    def plain_default(obj: Any, *, ctx: Any, show_default_is_str: bool, default_value: Any) -> str:
        text = get_default_string(obj, ctx=ctx, show_default_is_str=show_default_is_str, default_value=default_value)
        return text[1:-1] if show_default_is_str and text.startswith("(") and text.endswith(")") else text

    def untyped_flag(self: Any, ctx: Any) -> str | None:
        # A flag takes no value: no type to show (Typer's own --help and --version were <bool>).
        if self.metavar is None and getattr(self, "is_flag", False) and getattr(self, "is_bool_flag", False):
            return ""
        return display_type_rich(self, ctx)

    def usage_name(self: Any) -> str:
        # As the Arguments panel names it (IN_DIR, [WORK_DIR]), or a metavar that spells out how the
        # values are given ([INPUT] OUT_DIR, DIR [DIR_B]) as written.
        name = self.display_name_raw
        if " " in name:
            return name
        return (name if self.required else f"[{name}]") + ("..." if self.nargs != 1 else "")

    usage_name.lenscap = True  # type: ignore[attr-defined]
    core._get_default_string = plain_default  # type: ignore[attr-defined]
    core.TyperOption.display_type_rich = untyped_flag  # type: ignore[method-assign]
    core.TyperArgument._usage_display_name = usage_name  # type: ignore[method-assign]
