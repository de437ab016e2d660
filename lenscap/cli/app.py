"""The ``lenscap`` command: a thin Typer layer over ``lenscap.api``.

Each command is generated from its options object (``lenscap.commands.OPTIONS``, ``build.py``); its
callback calls the API with it and shows the result (``render.py``). Exit codes: docs/exit-codes.md
(0 done, 1 some shards failed or are damaged (verify), 2 usage error, 3 internal error, 4 --max-cost reached, 5 locked,
6 an audit rule broken, 7 the output holds 0 samples, 130 interrupted).
"""

from __future__ import annotations

import inspect
import json
import sys
from typing import Annotated, Any

import typer

from lenscap import __version__
from lenscap.caption.backends import describe_backends
from lenscap.cli import help_style, render
from lenscap.cli.build import Common, command_function, common_options
from lenscap.commands import OPTIONS
from lenscap.core.errors import UsageError
from lenscap.core.options import Options
from lenscap.core.progress import log, set_log_file
from lenscap.download.img2dataset_process import Img2datasetProcess
from lenscap.filter.annotators import describe_filters, filters_lines

__all__ = ["app", "build_app", "emit", "ALIASES", "last_summary", "money"]


help_style.apply()

# Hidden old flag names of every command (their parameter) -> the parameter that replaced them, and its flag.
ALIASES: dict[str, tuple[str, str, str]] = {old: v for cls in OPTIONS.values() for old, v in cls.old_names().items()}

# What the last command said on stdout with --json, or would have: the run's last log line sums it up.
last_summary: dict[str, Any] = {}


def money(value: Any) -> Any:
    """Money rounded to a hundredth of a cent, in every summary (float sums print 0.05480200000000001)."""
    if isinstance(value, dict):
        return {
            k: (round(v, 4) if isinstance(v, float) and (k.endswith("usd") or k == "usd") else money(v)) for k, v in value.items()
        }
    if isinstance(value, list):
        return [money(v) for v in value]
    return value


def emit(summary: dict[str, Any], as_json: bool) -> None:
    """The command's one JSON object: ``ok`` and ``exit_code`` first, money rounded."""
    code = int(summary.get("exit_code", 0))
    last_summary.clear()
    last_summary.update(
        {"ok": code == 0, "exit_code": code, **{k: v for k, v in money(summary).items() if k not in ("ok", "exit_code")}}
    )
    if as_json:
        print(json.dumps(last_summary, default=str), flush=True)


def _show(
    command: str,
    summary: dict[str, Any],
    options: Options,
    common: Common,
    advice: list[str] = (),  # type: ignore[assignment]
    verdict: str | None = None,
) -> None:
    """Emit the summary, show what a person reads, and exit with the summary's code. ``verdict``: why a
    run that wrote every shard still failed (too many samples failed), said even with --quiet."""
    emit(summary, common.as_json)
    if not common.as_json:
        shown = render.SHOWN[command](summary, options)
        for line in shown.stdout:
            print(line)
        if not common.quiet:
            for line in [*shown.lines, *advice]:
                print(line, file=sys.stderr)
        for line in (verdict or "").splitlines():  # last: why the run failed, and what to do
            log(line)
    raise typer.Exit(int(summary.get("exit_code", 0)))


def _api() -> Any:
    # Imported when a command runs, not when the CLI is built: --help, --version and a download's early
    # start of img2dataset (below) do not wait for every library the commands use.
    from lenscap import api

    return api


def _download(args: dict[str, Any], options: Any, common: Common) -> None:
    paths = args["paths"]
    if len(paths) == 2:
        source, out_dir = paths
    elif len(paths) == 1 and options.retry_failed:
        source, out_dir = None, paths[0]
    else:
        raise typer.BadParameter(
            "expected INPUT and OUT_DIR (or just OUT_DIR with --retry-failed)", param_hint="'[INPUT] OUT_DIR'"
        )
    # Started before the heavy imports, so that img2dataset's own imports overlap them.
    img2dataset = Img2datasetProcess() if source is not None else None
    result = _api().download(source, out_dir, options, quiet=common.quiet, img2dataset=img2dataset, given=common.given)
    _show("download", result.summary(), options, common, verdict=result.verdict)


def _dataset_command(name: str) -> Any:
    def run(args: dict[str, Any], options: Any, common: Common) -> None:
        result = getattr(_api(), name)(args["in_dir"], args["out_dir"], options, quiet=common.quiet)
        _show(name, result.summary(), options, common, result.advice, result.verdict)

    return run


def _audit(args: dict[str, Any], options: Any, common: Common) -> None:
    paths = args["paths"]
    if len(paths) > 2:
        raise UsageError(f"audit takes DIR or DIR_A DIR_B, not {len(paths)} directories")
    compare_with = paths[1] if len(paths) == 2 else None
    _show("audit", _api().audit(paths[0], options, compare_with=compare_with, quiet=common.quiet), options, common)


def _run(args: dict[str, Any], options: Any, common: Common) -> None:
    summary = _api().run(args["recipe"], options, quiet=common.quiet)
    # What this run spent, all stages together (each caption stage says its own).
    spent = [
        s["summary"]["spent_usd"]
        for s in summary["stages"]
        if not s.get("skipped") and isinstance((s.get("summary") or {}).get("spent_usd"), (int, float))
    ]
    if spent:
        summary["spent_usd"] = sum(spent)
    if "stopped_at" in summary:
        log(f"run stopped at {summary['stopped_at']} (exit {summary['exit_code']}); fix what it says and rerun to go on")
    _show("run", summary, options, common)


def _demo(args: dict[str, Any], options: Any, common: Common) -> None:
    from lenscap.demo.run import CAPTIONED_BY, run_demo  # as _api(): the whole library, when the command runs

    summary = run_demo(args["work_dir"], options, quiet=common.quiet)
    if not common.as_json and summary["exit_code"] == 0:
        render.demo_lines(summary, CAPTIONED_BY[summary["captioner"]])
    _show("demo", summary, options, common)


_RUNS = {
    "download": _download,
    "filter": _dataset_command("filter"),
    "caption": _dataset_command("caption"),
    "dedup": _dataset_command("dedup"),
    "shard": _dataset_command("shard"),
    "report": lambda args, options, common: _show("report", _api().report(args["path"], options), options, common),
    "audit": _audit,
    "estimate": lambda args, options, common: _show("estimate", _api().estimate(options), options, common),
    "inspect": lambda args, options, common: _show("inspect", _api().inspect(args["path"]), options, common),
    "verify": lambda args, options, common: _show(
        "verify", _api().verify(args["path"], options, quiet=common.quiet), options, common
    ),
    "run": _run,
    "demo": _demo,
}
# --help order: the pipeline, then what looks at it.
_ORDER = (
    "download",
    "caption",
    "filter",
    "backends",
    "filters",
    "batch",
    "dedup",
    "shard",
    "report",
    "audit",
    "estimate",
    "inspect",
    "verify",
    "run",
    "demo",
)


def _version(value: bool) -> None:
    if value:
        print(f"lenscap {__version__}")
        raise typer.Exit()


def _root(
    version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = None,
    log_file: Annotated[
        str | None,
        typer.Option(
            "--log-file",
            show_default=False,
            help="Also append timestamped progress and notes to this file, and one last line saying how the run ended (for cron).",
        ),
    ] = None,
) -> None:
    if log_file is not None:
        set_log_file(log_file)


def _listing(name: str, list_them: Any, lines: Any, help: str) -> Any:
    def callback(**given: Any) -> None:
        if given["log_file"] is not None:
            set_log_file(given["log_file"])
        found = list_them()
        emit({"command": name, name: found}, given["as_json"])
        if not given["as_json"]:
            for line in lines(found):
                print(line)

    return _with_common(callback, [], help)


def _with_common(callback: Any, params: list[Any], help: str) -> Any:
    params = [*params, *common_options()]
    callback.__signature__ = inspect.Signature(params)
    callback.__annotations__ = {p.name: p.annotation for p in params}
    callback.__doc__ = help
    return callback


def _batch_app() -> typer.Typer:
    batch = typer.Typer(
        help="Look after a caption batch job (openai-batch, anthropic-batch, gemini-batch, batch-files).", no_args_is_help=True
    )
    out_dir = inspect.Parameter(
        "out_dir",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=Annotated[str, typer.Argument(help="The output directory of a batch caption job.", metavar="OUT_DIR")],
    )

    def status(**given: Any) -> None:
        if given["log_file"] is not None:
            set_log_file(given["log_file"])
        from lenscap.caption.batch import batch_status  # as _api(): the library, when the command runs

        info = batch_status(given["out_dir"])
        emit({"command": "batch status", **info}, given["as_json"])
        if not given["as_json"]:
            print("\n".join(render.batch_status_lines(info)))

    def cancel(**given: Any) -> None:
        if given["log_file"] is not None:
            set_log_file(given["log_file"])
        from lenscap.caption.batch import cancel_batches  # as _api(): the library, when the command runs

        cancelled = cancel_batches(given["out_dir"])
        emit({"command": "batch cancel", "out_dir": given["out_dir"], "cancelled": cancelled}, given["as_json"])
        if not given["as_json"]:
            print(f"cancelled {len(cancelled)} batch(es): {', '.join(cancelled) or 'none running'}", file=sys.stderr)

    status_help = (
        "Files by state, the batch queue, requests answered and left, money spent, and an ETA from the rate of "
        "the last day's answers (from the job's state file: no network, instant at any scale)."
    )
    batch.command("status", epilog="Example: lenscap batch status data/captioned --json")(
        _with_common(status, [out_dir], status_help)
    )
    cancel_help = "Cancel the job's running batches. The next caption run merges what they finished (and submits the rest)."
    batch.command("cancel", epilog="Example: lenscap batch cancel data/captioned")(_with_common(cancel, [out_dir], cancel_help))
    return batch


def build_app(options: dict[str, type[Options]] | None = None) -> typer.Typer:
    """The ``lenscap`` Typer app, its commands generated from ``options`` (default: every command's)."""
    options = OPTIONS if options is None else options
    built = typer.Typer(
        name="lenscap",
        help="Build captioned, filtered, deduplicated, training-ready image-text datasets from URL lists.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )
    built.callback()(_root)
    for name in _ORDER:
        if name == "batch":
            built.add_typer(_batch_app(), name="batch")
        elif name == "backends":
            help = "List the installed caption backends: where each comes from, whether it needs a key, its options."
            built.command("backends", epilog="Example: lenscap backends --json")(
                _listing("backends", describe_backends, render.backends_lines, help)
            )
        elif name == "filters":
            help = "List the installed filters (annotators): where each comes from, what it scores, its threshold flag."
            built.command("filters", epilog="Example: lenscap filters --json")(
                _listing("filters", describe_filters, filters_lines, help)
            )
        else:
            cls = options[name]
            built.command(name, epilog=f"Example: {cls.example}")(command_function(cls, _RUNS[name]))
    return built


app = build_app()
