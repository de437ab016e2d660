"""MkDocs hook: the CLI reference page, generated from the Typer app at build time.

Registered under ``hooks:`` in mkdocs.yml. On every build (and every reload of ``mkdocs serve``) it
walks the click command that ``typer.main.get_command(lenscap.cli.app)`` returns and adds the page
``reference/cli.md`` as a generated file: every command (``batch``'s subcommands included), its help,
and every visible parameter with its flags (``--x / --no-x`` for switches), type, default and help,
grouped by ``rich_help_panel`` when one is set. Hidden commands and hidden parameters (the old flag
names kept as aliases) are left out. Nothing is written into docs/, so the page cannot drift from
the code. ``render()`` returns the page's Markdown; tests/test_docs.py calls it too.

Typer 0.29 builds its commands on its own fork of click (``typer._click``), so this reads only the
attributes both share: ``commands``, ``params``, ``opts``, ``secondary_opts``, ``hidden``,
``default``, ``help``, ``rich_help_panel``, ``display_type(ctx)``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

PAGE = "reference/cli.md"


def _cell(text: str) -> str:
    """Text that is safe inside one Markdown table cell."""
    text = " ".join(str(text).split())
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")


def _code(text: str) -> str:
    text = str(text).replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def is_switch(param: Any) -> bool:
    return bool(getattr(param, "is_flag", False)) and bool(getattr(param, "is_bool_flag", True))


def is_argument(param: Any) -> bool:
    return getattr(param, "param_type_name", "") == "argument" or type(param).__name__.endswith("Argument")


def flags(param: Any) -> str:
    """The flags as typed: ``-q, --quiet``; ``--upscale / --no-upscale``."""
    if is_argument(param):
        return param.name.upper()
    opts = sorted(param.opts, key=lambda o: (o.startswith("--"), o))
    text = ", ".join(opts)
    if param.secondary_opts:
        text += " / " + ", ".join(param.secondary_opts)
    return text


def default_text(param: Any) -> str:
    """The default as the reference shows it ("" when there is none)."""
    shown = getattr(param, "show_default", None)
    if isinstance(shown, str):
        return shown
    default = param.default
    if callable(default):
        default = default()
    if is_switch(param):
        if param.secondary_opts:
            return (param.opts if default else param.secondary_opts)[-1]
        return "on" if default else "off"
    if default is None or default == () or default == []:
        return ""
    if isinstance(default, float) and math.isinf(default):
        return "no limit"
    if isinstance(default, (list, tuple)):
        return ", ".join(str(d) for d in default)
    return str(getattr(default, "value", default))


def type_text(param: Any, ctx: Any) -> str:
    if is_switch(param):
        return "flag"
    try:
        shown = param.display_type(ctx)
    except TypeError:
        shown = param.display_type()
    except Exception:  # pragma: no cover - a type the fork cannot name
        shown = ""
    shown = str(shown or "").strip().strip("<>")
    if getattr(param, "multiple", False) and shown.startswith("list[") and shown.endswith("]"):
        shown = shown[5:-1] + ", repeatable"
    return shown


def _help(command: Any) -> str:
    return inspect.cleandoc(command.help or "").replace("\b\n", "")


def _walk(group: Any, path: list[str]) -> list[tuple[list[str], Any]]:
    found = []
    for name, command in group.commands.items():
        if getattr(command, "hidden", False):
            continue
        found.append((path + [name], command))
        if hasattr(command, "commands"):
            found.extend(_walk(command, path + [name]))
    return found


def _params_table(params: list[Any], ctx: Any, arguments: bool) -> list[str]:
    head = "| argument | type | help |" if arguments else "| option | type | default | help |"
    lines = [head, "| --- | --- | --- |" if arguments else "| --- | --- | --- | --- |"]
    for p in params:
        help_text = _cell(getattr(p, "help", None) or "")
        if arguments:
            need = "required" if p.required else "optional"
            lines.append(f"| {_code(flags(p))} | {_cell(type_text(p, ctx))} | {help_text} ({need}) |")
        else:
            default = default_text(p)
            shown = _code(default) if default else ""
            lines.append(f"| {_code(flags(p))} | {_cell(type_text(p, ctx))} | {shown} | {help_text} |")
    return lines


def _usage(command: Any, path: list[str]) -> str:
    ctx = command.make_context(" ".join(["lenscap", *path]), [], resilient_parsing=True)
    pieces = command.collect_usage_pieces(ctx)
    return " ".join(["lenscap", *path, *[str(p) for p in pieces]])


def _command_section(path: list[str], command: Any) -> list[str]:
    name = " ".join(path)
    out = [f"## `lenscap {name}`", ""]
    is_group = hasattr(command, "commands")
    if not is_group:
        try:
            out += ["```text", _usage(command, path), "```", ""]
        except Exception:  # pragma: no cover - usage is a nicety
            pass
    text = _help(command)
    if text:
        out += [text, ""]
    epilog = inspect.cleandoc(getattr(command, "epilog", None) or "")
    if epilog:
        out += [epilog, ""]
    if is_group:
        subs = [n for n, c in command.commands.items() if not getattr(c, "hidden", False)]
        out += ["Subcommands: " + ", ".join(f"[`{name} {s}`](#lenscap-{'-'.join(path)}-{s})" for s in subs) + ".", ""]
        return out
    ctx = command.make_context(" ".join(["lenscap", *path]), [], resilient_parsing=True)
    visible = [p for p in command.params if not getattr(p, "hidden", False)]
    arguments = [p for p in visible if is_argument(p)]
    options = [p for p in visible if not is_argument(p)]
    if arguments:
        out += ["**Arguments**", "", *_params_table(arguments, ctx, True), ""]
    panels: dict[str, list[Any]] = {}
    for p in options:
        panel = getattr(p, "rich_help_panel", None)
        panels.setdefault(panel if isinstance(panel, str) and panel else "Options", []).append(p)
    for panel, params in panels.items():
        out += [f"**{panel}**", "", *_params_table(params, ctx, False), ""]
    if path == ["caption"]:
        out += _backend_defaults({o for p in visible for o in p.opts})
    return out


def _backend_defaults(caption_flags: set[str]) -> list[str]:
    """caption's backend options default per backend (the flags' own default is the backend's)."""
    try:
        from lenscap.caption.backends import describe_backends

        found = [b for b in describe_backends() if "error" not in b and "built-in" in b.get("source", "")]
    except Exception:  # pragma: no cover - the table is an extra
        return []
    if not found:
        return []
    names = [b["name"] for b in found]
    by_flag: dict[str, dict[str, str]] = {}
    for b in found:
        for o in b["options"]:
            key = o["flag"] if o["flag"] in caption_flags else f"-O {o['name']}=..."
            value = o["default"]
            by_flag.setdefault(key, {})[b["name"]] = "" if value in (None, []) else str(value)
    lines = [
        "**Backend option defaults.** A backend option left unset takes its backend's default "
        "(`lenscap backends` lists them, plugins' too; any option can be given as `-O NAME=VALUE`). "
        "The built-in backends' defaults (blank: no default; the server's own, or none needed; "
        "— : not an option of that backend; `-O NAME=...`: an option with no flag of its own):",
        "",
        "| option | " + " | ".join(f"`{n}`" for n in names) + " |",
        "| --- | " + " | ".join("---" for _ in names) + " |",
    ]
    for key in sorted(by_flag, key=lambda k: (k.startswith("-O"), k)):
        row = by_flag[key]
        cells = [(_code(row[n]) if row[n] else "") if n in row else "—" for n in names]
        lines.append(f"| {_code(key)} | " + " | ".join(cells) + " |")
    return lines + [""]


def render(app: Any = None) -> str:
    """The page for ``app`` (a Typer app; by default lenscap's own)."""
    import typer

    import lenscap.cli

    root = typer.main.get_command(app if app is not None else lenscap.cli.app)
    commands = _walk(root, [])
    out = [
        "# CLI reference",
        "",
        "<!-- Generated by docs/hooks/cli_reference.py from the Typer app at build time: do not edit. -->",
        "",
        "This page is generated from the command-line app itself each time the docs are built, so every "
        "flag, type and default here is the one `lenscap` has. `lenscap COMMAND --help` prints the same. "
        "Old flag names kept as hidden aliases still work but are not listed.",
        "",
        "Commands: " + ", ".join(f"[`{' '.join(p)}`](#lenscap-{'-'.join(p)})" for p, _ in commands) + ".",
        "",
        "## `lenscap` (global options)",
        "",
        _help(root),
        "",
        "Global options go before the command (`lenscap --log-file F run ...`).",
        "",
    ]
    ctx = root.make_context("lenscap", [], resilient_parsing=True)
    globals_ = [p for p in root.params if not getattr(p, "hidden", False)]
    out += _params_table(globals_, ctx, False) + [""]
    for path, command in commands:
        out += _command_section(path, command)
    return "\n".join(out).rstrip() + "\n"


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    existing = files.get_file_from_path(PAGE)
    if existing is not None:
        files.remove(existing)
    files.append(File.generated(config, PAGE, content=render()))
    return files
