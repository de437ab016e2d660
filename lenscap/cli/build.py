"""A Typer command generated from a command's options object (``lenscap.core.options``).

Each field becomes an option with its flag, help, default, panel and metavar; each ``Argument`` an
argument; each hidden old name a hidden option whose value moves to its field with a note; every
command also takes ``--json``, ``--quiet`` and ``--log-file``. The command's callback builds the options
object from the parsed values (its checks run there) and hands it, with the arguments, to ``run``.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from typing import Annotated, Any

import typer

from lenscap.core.options import Executed, Flag, Options
from lenscap.core.progress import set_log_file

__all__ = ["Common", "command_function", "common_options", "JSON_HELP"]

JSON_HELP = 'Print one JSON object on stdout, on failure too ({"ok": false, "exit_code": N, "error": ...}).'


@dataclass(frozen=True)
class Common:
    """What every command takes the same way: ``--json``, ``--quiet``, ``--log-file``; and ``given``, the
    options' fields this command line set (a flag typed, even with its default value), for the commands
    that replay an earlier run's options for the others (``download --retry-failed``)."""

    as_json: bool = False
    quiet: bool = False
    log_file: str | None = None
    given: frozenset[str] = frozenset()


def common_options() -> list[inspect.Parameter]:
    """--json, --quiet and --log-file, after the subcommand (where cron lines put them)."""
    json_opt = typer.Option("--json", metavar="", show_default=False, help=JSON_HELP)
    quiet = typer.Option(
        "--quiet", "-q", metavar="", show_default=False, help="No progress output (notes on what went wrong still go to stderr)."
    )
    log_file = typer.Option(
        "--log-file",
        show_default=False,
        help="Also append timestamped progress and notes to this file, and one last line saying how the run ended (for cron).",
    )
    return [
        _param("as_json", Annotated[bool, json_opt], False),
        _param("quiet", Annotated[bool, quiet], False),
        _param("log_file", Annotated[str | None, log_file], None),
    ]


def _param(name: str, annotation: Any, default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _option(name: str, tp: Any, default: Any, flag: Flag) -> inspect.Parameter:
    names = list(flag.names) or [flag.name(name)]
    is_bool = tp in (bool, bool | None)
    if is_bool and not flag.switch and not flag.names:
        names = [f"{names[0]}/--no-{names[0][2:]}"]
    show_default = flag.show_default
    if is_bool and show_default is True:  # --upscale/--no-upscale [default: off], not [default: no-upscale]
        show_default = "on" if default else "off"
    info = typer.Option(
        *names,
        help=flag.help,
        show_default=show_default,
        rich_help_panel=flag.panel,
        metavar="" if is_bool else flag.metavar,
    )
    return _param(name, Annotated[tp, info], default)


def _old_names(cls: type[Options]) -> list[inspect.Parameter]:
    out = []
    types = cls.types()
    for old, (new, old_flag, new_flag) in cls.old_names().items():
        tp = types[new]
        optional = tp if type(None) in getattr(tp, "__args__", ()) else tp | None
        info = typer.Option(old_flag, hidden=True, help=f"Old name of {new_flag}.")
        out.append(_param(old, Annotated[optional, info], None))
    return out


def _arguments(cls: type[Options]) -> list[inspect.Parameter]:
    out = []
    for arg in cls.arguments:
        tp: Any = list[str] if arg.many else str
        info = typer.Argument(help=arg.help, show_default=arg.default is not ..., metavar=arg.metavar or arg.name.upper())
        default = inspect.Parameter.empty if arg.default is ... else arg.default
        out.append(
            inspect.Parameter(arg.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=Annotated[tp, info])
        )
    return out


def command_function(cls: type[Options], run: Callable[[dict[str, Any], Any, Common], None]) -> Callable[..., None]:
    """The callback Typer makes ``cls.command`` from: it builds the options object (old names moved to
    their new ones, with a note) and calls ``run(arguments, options, common)``."""
    types = cls.types()
    params = _arguments(cls)
    for f, flag in cls.flags():
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        params.append(_option(f.name, types[f.name], default, flag))
    params += _old_names(cls) + common_options() + [_param("lenscap_context", typer.Context)]
    arguments = {a.name for a in cls.arguments}
    old = cls.old_names()

    def callback(**given: Any) -> None:
        context = given.pop("lenscap_context")
        typed = {name for name in given if context.get_parameter_source(name).name == "COMMANDLINE"}
        typed = frozenset(old[name][0] if name in old else name for name in typed)
        common = Common(given.pop("as_json"), given.pop("quiet"), given.pop("log_file"), typed)
        if common.log_file is not None:
            set_log_file(common.log_file)  # first: what goes wrong from here on is in the log
        args = {name: given.pop(name) for name in arguments}
        for old_name, (new, old_flag, new_flag) in old.items():
            value = given.pop(old_name)
            if value is not None:
                print(f"lenscap: note: {old_flag} is now {new_flag} (the old name goes in the next release)", file=sys.stderr)
                given[new] = value
        # click gives a repeated option as a tuple, and () when absent; the field takes a list or None
        given = {k: (list(v) or None) if isinstance(v, tuple) else v for k, v in given.items()}
        options = cls(**given)
        if isinstance(options, Executed):  # the flag's default (all cores), not the library's (one process)
            options = options.with_default_processes()
        run(args, options, common)

    callback.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    callback.__annotations__ = {p.name: p.annotation for p in params}
    callback.__doc__ = cls.help
    callback.__name__ = cls.command
    return callback
