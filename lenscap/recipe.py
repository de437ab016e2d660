"""``lenscap run RECIPE``: a whole pipeline in one TOML file, resumable, lockable, schedulable.

A recipe names an input, a work directory and an ordered list of stages::

    input = "urls.csv"
    work_dir = "work"
    [[stages]]
    run = "download"          # a lenscap command: download, filter, caption, dedup, shard, report, audit
    samples_per_shard = 1000  # its options, as on the command line (underscores for dashes)
    [[stages]]
    run = "caption"
    backend = "openai"

Each stage writes ``WORK/<name>`` (``name`` defaults to ``run``) from the previous dataset, by running
the very command a user would type, so a recipe means exactly what its command lines mean. A stage
that finished is recorded (``WORK/.lenscap-run/``) with the command line it ran: a rerun skips it, and
goes on where the first stopped (each command resumes its own shards). A stage whose options changed
since it finished is refused, naming the directory to delete.

Two built-in steps make a release train for cron (``releases = "DIR"`` in the recipe): ``new-urls``
keeps the input URLs that no earlier release holds, and ``release`` moves the last dataset to
``DIR/NNNNN``. While a refresh runs, its stages live in ``WORK/current/``; ``against = "@releases"``
names every earlier release. ``input = "@demo"`` serves generated images on loopback for the run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lenscap.errors import UsageError
from lenscap.journal import atomic_write_json
from lenscap.lock import DirLock
from lenscap.progress import log
from lenscap.storage import require_local

__all__ = ["Recipe", "RecipeStage", "load_recipe", "run_recipe", "SHIPPED"]

SHIPPED = Path(__file__).parent / "recipes"
COMMANDS = ("download", "filter", "caption", "dedup", "shard", "report", "audit")
BUILTINS = ("new-urls", "release")
_TOP_KEYS = {"description", "input", "work_dir", "releases", "stages"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Stand-ins for a command's positional arguments when its options are checked before the run.
_PLACEHOLDERS = {"download": ["INPUT", "OUT"], "report": ["IN"], "audit": ["IN"]} | {c: ["IN", "OUT"] for c in ("filter", "caption", "dedup", "shard")}


@dataclass
class RecipeStage:
    run: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    path: Path
    input: str
    work_dir: Path
    stages: list[RecipeStage]
    releases: Path | None = None
    description: str = ""


def _value(text: str) -> Any:
    """A --set value: a TOML literal (3, 0.5, true, [1, 2], "x") or else the text itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_recipe(path_or_name: str, overrides: list[str] | None = None, work_dir: str | None = None,
                input: str | None = None) -> Recipe:  # noqa: A002 - the recipe's own word
    """A recipe file, or a shipped one by name (``demo``, ``lens-recaption``, ``refresh``)."""
    path = Path(path_or_name)
    if not path.exists() and (SHIPPED / f"{path_or_name}.toml").exists():
        path = SHIPPED / f"{path_or_name}.toml"
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        shipped = ", ".join(p.stem for p in sorted(SHIPPED.glob("*.toml")))
        raise UsageError(f"cannot read recipe {path_or_name}: {e.strerror} (shipped recipes: {shipped})") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"recipe {path}: {e}") from None
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise UsageError(f"recipe {path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_TOP_KEYS))})")
    stages = []
    entries = raw.get("stages") or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise UsageError(f"recipe {path}: stages must be [[stages]] tables (run = \"download\", ...), not {entries!r}")
    for n, entry in enumerate(entries, 1):
        entry = dict(entry)
        run = entry.pop("run", None)
        if run not in COMMANDS + BUILTINS:
            raise UsageError(f"recipe {path}, stage {n}: run must be one of {', '.join(COMMANDS + BUILTINS)}, not {run!r}")
        name = entry.pop("name", run)
        if not isinstance(name, str) or not _NAME_RE.match(name):
            # The name is a directory in the work directory: never a path that leaves it.
            raise UsageError(f"recipe {path}, stage {n}: name must be a plain name (letters, digits, . _ -), not {name!r}")
        stages.append(RecipeStage(run, name, entry))
    if not stages:
        raise UsageError(f"recipe {path} has no [[stages]]")
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise UsageError(f"recipe {path}: two stages are named {next(n for n in names if names.count(n) > 1)!r}; give one a name")
    for item in overrides or []:
        target, eq, value = item.partition("=")
        stage_name, dot, option = target.partition(".")
        if not (eq and dot and option):
            raise UsageError(f"--set takes STAGE.OPTION=VALUE, not {item!r}")
        stage = next((s for s in stages if s.name == stage_name), None)
        if stage is None:
            raise UsageError(f"--set {item}: the recipe has no stage {stage_name!r} (stages: {', '.join(names)})")
        if value == "":
            stage.options.pop(option.replace("-", "_"), None)  # STAGE.OPTION= removes it
        else:
            stage.options[option.replace("-", "_")] = _value(value)
    source = input if input is not None else raw.get("input")
    if not source:
        raise UsageError(f"recipe {path} names no input (add input = \"...\" or give --input)")
    releases = raw.get("releases")
    require_local(work_dir if work_dir is not None else raw.get("work_dir"), "a recipe's work directory")
    work = Path(work_dir if work_dir is not None else raw.get("work_dir") or path.stem)
    if any(s.run in BUILTINS for s in stages) and not releases:
        raise UsageError(f"recipe {path}: new-urls and release need releases = \"DIR\"")
    for stage in stages:  # every stage's options, checked before the first stage runs
        if stage.run in COMMANDS:
            try:
                _check_values(stage.run, _parse([stage.run, *_PLACEHOLDERS[stage.run], *_flags(stage.options, [])]))
            except UsageError as e:
                raise UsageError(f"recipe {path}, {stage.name}: {str(e).removeprefix(f'stage {stage.run}: ')}") from None
    return Recipe(path, str(source), work, stages, work / releases if releases else None, raw.get("description", ""))


def _flags(options: dict[str, Any], releases: list[Path]) -> list[str]:
    args: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value == "@releases":
            value = [str(r) for r in releases]
        if value is True:
            args.append(flag)
        elif value is False:
            args.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            for item in value:
                args += [flag, str(item)]
        else:
            args += [flag, str(value)]
    return args


def _invoke(argv: list[str]) -> tuple[int, dict[str, Any]]:
    """Run one lenscap command in this process: its flags parsed and checked as the command line
    does, then the command's own work (``lenscap.cli.OUTCOMES``, which calls ``lenscap.api``).
    Returns its exit code and its summary; notes for a person go to stderr, as the command says them."""
    from lenscap.cli import OUTCOMES

    outcome = OUTCOMES[argv[0]](**_parse(argv))
    for line in outcome.notes:
        print(line, file=sys.stderr)
    return outcome.exit_code, outcome.summary


def _parse(argv: list[str]) -> dict[str, Any]:
    """A command line's flags, parsed and checked as the command line does (names, types, choices)."""
    import typer.main

    from lenscap.cli import app

    name, args = argv[0], argv[1:]
    command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
    try:
        with command.make_context(name, list(args)) as ctx:
            flags = dict(ctx.params)
    except Exception as e:  # click's parse errors (an unknown option, a bad value): a recipe mistake
        if hasattr(e, "format_message"):
            raise UsageError(f"stage {name}: {e.format_message()}") from None
        raise
    # click gives a repeated option as a tuple, and () when absent; the command takes a list or None
    return {k: (list(v) or None) if isinstance(v, tuple) else v for k, v in flags.items() if k != "as_json"}


def _check_values(command: str, flags: dict[str, Any]) -> None:
    """The value checks a command makes before it touches anything, made for a recipe's stage before
    the first stage runs (names and types are the parser's)."""
    if command == "filter":
        from lenscap.stages.filter import FilterRules

        FilterRules(flags["min_side"], flags["max_aspect"], flags["min_bytes"], flags["caption_min_words"],
                    flags["caption_max_words"], flags["status"], flags["where"]).validate()
    elif command == "audit":
        from lenscap.audit import AuditOptions

        AuditOptions(target_words=flags["target_words"], script=flags["script"], sample=flags["sample"],
                     fail_on=flags["fail_on"]).validate()
    elif command == "download":
        from lenscap.stages.download import DownloadOptions

        DownloadOptions(**{k: flags[k] for k in ("samples_per_shard", "processes", "threads", "image_size", "resize_mode",
                                                 "min_image_size", "max_aspect_ratio", "max_pixels", "timeout", "retries")}
                        ).validate()


def _releases(recipe: Recipe) -> list[Path]:
    if recipe.releases is None or not recipe.releases.is_dir():
        return []
    return sorted(p for p in recipe.releases.iterdir() if p.is_dir() and p.name.isdigit())


def run_recipe(recipe: Recipe, quiet: bool = False) -> dict[str, Any]:
    """Run (or resume) every stage; returns the run's summary, with ``exit_code``."""
    work = recipe.work_dir
    work.mkdir(parents=True, exist_ok=True)
    with DirLock(work / ".lenscap-run" / "lock", str(work)):
        return _run(recipe, quiet)


def _run(recipe: Recipe, quiet: bool) -> dict[str, Any]:
    base = recipe.work_dir / "current" if recipe.releases is not None else recipe.work_dir
    records = base / ".lenscap-run"
    records.mkdir(parents=True, exist_ok=True)
    releases = _releases(recipe)
    demo_server = None
    summary: dict[str, Any] = {"command": "run", "recipe": str(recipe.path), "work_dir": str(recipe.work_dir), "stages": []}
    dataset: str | None = None  # the latest dataset directory, input of the next stage
    source = recipe.input
    try:
        if source.startswith("@demo"):
            from lenscap.demo.run import start_demo_input

            # Generated images on a new loopback port each run: their URLs change, so start afresh.
            shutil.rmtree(records, ignore_errors=True)
            for stage in recipe.stages:
                shutil.rmtree(base / stage.name, ignore_errors=True)
            records.mkdir(parents=True)
            count = source.partition(":")[2]
            demo_server, source = start_demo_input(base, int(count) if count.isdigit() else 100)
        for number, stage in enumerate(recipe.stages, 1):
            out = base / stage.name
            if dataset is None and stage.run not in ("download", "new-urls"):
                raise UsageError(f"recipe {recipe.path}: stage {stage.name!r} needs a dataset before it (start with download)")
            if stage.run == "new-urls":
                argv = ["new-urls", source, *[str(r) for r in releases]]
            elif stage.run == "release":
                argv = ["release", str(dataset)]
            elif stage.run == "download":
                argv = ["download", source, str(out), *_flags(stage.options, releases)]
                if demo_server is not None and "--allow-private-network" not in argv:
                    argv.append("--allow-private-network")  # the demo's own images, served on loopback
            elif stage.run == "report":
                argv = ["report", str(dataset), "--out", str(base / f"{stage.name}.html"), *_flags(stage.options, releases)]
            elif stage.run == "audit":  # a gate: its --fail-on stops the run (exit 6) before what follows
                argv = ["audit", str(dataset), *_flags(stage.options, releases)]
            else:
                argv = [stage.run, str(dataset), str(out), *_flags(stage.options, releases)]
            record_path = records / f"{number:02d}-{stage.name}.json"
            record = json.loads(record_path.read_text()) if record_path.exists() else None
            if record is not None and record["argv"] != argv:
                raise UsageError(f"stage {stage.name!r} ran with other options ({' '.join(record['argv'][3:]) or 'none'}); "
                                 f"to run it again, delete {out} and {record_path}")
            if record is not None:
                result = record["summary"]
                log(f"run: {stage.name}: done before, skipped", to_stderr=not quiet)
            else:
                log(f"run: {stage.name}: lenscap {' '.join(argv)}", to_stderr=not quiet)
                if stage.run == "new-urls":
                    code, result = 0, new_urls(source, releases, out)
                elif stage.run == "release":
                    code, result = 0, release(Path(str(dataset)), recipe, base)
                else:
                    code, result = _invoke(argv + (["--quiet"] if quiet else []))
                if code != 0:
                    summary["stages"].append({"stage": stage.name, "exit_code": code, "summary": result})
                    summary["exit_code"] = code
                    summary["stopped_at"] = stage.name
                    return summary
                if stage.run != "release":
                    atomic_write_json(record_path, {"argv": argv, "summary": result})
            summary["stages"].append({"stage": stage.name, "exit_code": 0, "summary": result})
            if stage.run == "new-urls":
                source = result["urls"]
                if result["new"] == 0:  # a quiet night for cron: no release, and no error
                    log("run: no new URLs since the last release; nothing to do", to_stderr=not quiet)
                    shutil.rmtree(base, ignore_errors=True)
                    summary.update(release=None, exit_code=0)
                    return summary
            elif stage.run in ("download", "filter", "caption", "dedup"):
                dataset = str(out)
            elif stage.run == "release":
                summary["release"] = result["release"]
    finally:
        if demo_server is not None:
            demo_server.__exit__(None, None, None)
    summary["exit_code"] = 0
    return summary


def new_urls(source: str, releases: list[Path], out: Path) -> dict[str, Any]:
    """Write ``out/urls.parquet``: the rows of ``source`` whose URL no earlier release holds."""
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lenscap.inputs import InputSpec, read_url_tables

    tables = list(read_url_tables(InputSpec(source)))
    table = pa.concat_tables(tables) if tables else pa.table({"url": pa.array([], pa.string())})
    out.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    try:
        con.register("new", table)
        files = [str(p) for r in releases for p in sorted(r.glob("*.parquet"))]
        if files:
            con.execute("CREATE TABLE old AS SELECT DISTINCT url FROM read_parquet(?, union_by_name = true)", [files])
            kept = con.execute("SELECT * FROM new ANTI JOIN old USING (url)").to_arrow_table()
        else:
            kept = table
    finally:
        con.close()
    tmp = out / ".urls.parquet.tmp"
    pq.write_table(kept, tmp)
    os.replace(tmp, out / "urls.parquet")
    return {"urls": str(out / "urls.parquet"), "input": table.num_rows, "new": kept.num_rows,
            "in_earlier_releases": table.num_rows - kept.num_rows, "releases": [str(r) for r in releases]}


def release(dataset: Path, recipe: Recipe, base: Path) -> dict[str, Any]:
    """Move ``dataset`` to the next ``releases/NNNNN`` and end this refresh (``WORK/current`` goes)."""
    assert recipe.releases is not None
    if dataset.exists():
        from lenscap.dataset import Dataset

        ds = Dataset.open(dataset)
        if ds.image_source() is not ds:  # its images are in this refresh's directories, which go below
            raise UsageError(f"release: {dataset} refers to the images of {ds.image_source().location}, which this "
                             "release removes; set copy_images = true on the stage before release")
    recipe.releases.mkdir(parents=True, exist_ok=True)
    intent = base / ".lenscap-run" / "release.json"
    if intent.exists():  # a release that a crash interrupted after choosing its number
        target = Path(json.loads(intent.read_text())["release"])
    else:
        existing = [int(p.name) for p in _releases(recipe)]
        target = recipe.releases / f"{(max(existing) + 1) if existing else 0:05d}"
        atomic_write_json(intent, {"release": str(target)})
    if dataset.exists():
        os.replace(dataset, target)
    shutil.rmtree(base)
    return {"release": str(target)}
