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
    allow_empty = true        # the recipe's own key, not the command's: see "0 samples" below

Each stage writes ``WORK/<name>`` (``name`` defaults to ``run``) from the previous dataset, by running
the very command a user would type, so a recipe means exactly what its command lines mean.

**A rerun never serves stale data.** A stage that finished is recorded (``WORK/.lenscap-run/NN-name.json``)
with its command line (its settings), the fingerprint of its input (the previous stage's output, or the
URL list) and the fingerprint of its output as written (``fingerprint``: the names, sizes and times of
the files of a directory, never their bytes). A rerun skips it ("up to date") only if all three still
hold: same settings, an input whose fingerprint is the one it was built from, and an output still there
unchanged. Otherwise it runs again, and so does every stage after it (their input has changed). A stage
that never finished (a killed run) runs again as it is, and its command resumes its own shards.

*Changed options rerun automatically*: the recipe owns ``WORK/<stage>``, so a stage that must run again
because its options, its input or its output changed runs with ``--overwrite`` (its command would refuse
a directory that holds another job), and the log says why in one line::

    run: filter: options changed since the last run (--min-side 200 -> 256): running again; dedup, caption, shard rerun after it

Captions asked again cost nothing where the response cache (``$LENSCAP_CACHE_DIR``) already holds
them. A dataset directory written again has a new manifest id, so what was built from it is stale even
where its rows are the same: it runs again too.

**One line per stage.** After each stage the log (stderr and ``--log-file``) says what it did, e.g.
``run: filter: 61 in, 0 kept, 61 dropped (caption-min-words 61); 2.1 s``; a skipped stage says
``run: filter: up to date (skipped)``. The run's JSON summary lists ``stages``: ``{stage, exit_code,
skipped, outcome, samples, summary}``.

**0 samples.** A stage that leaves no sample for the next (a download with no success, a filter that
kept none, a dedup that left none, a caption stage with no ``ok`` caption, an export of nothing) logs
``run: WARNING: filter left 0 samples (61 dropped: caption-min-words); stopping`` and the run ends with
exit code 7, unless the stage says ``allow_empty = true`` (a boolean; only on those five commands);
then the run goes on, and the stages after it, whose input holds nothing, are not stopped for it again.
A batch caption stage whose batches are still running (``openai-batch`` without ``wait``) is not
recorded: the run stops there with exit code 0, and the next run collects them and goes on.

Two built-in steps make a release train for cron (``releases = "DIR"`` in the recipe): ``new-urls``
keeps the input URLs that no earlier release holds, and ``release`` moves the last dataset to
``DIR/NNNNN``. While a refresh runs, its stages live in ``WORK/current/``; ``against = "@releases"``
names every earlier release. A refresh with no new URL ends with exit code 0 and no release.
``input = "@demo"`` serves generated images on loopback for the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lenscap.core.commits import atomic_write_json
from lenscap.core.errors import UsageError
from lenscap.core.lock import DirLock
from lenscap.core.progress import log
from lenscap.core.result import EXIT_EMPTY
from lenscap.core.storage import require_local

__all__ = ["SHIPPED", "Recipe", "RecipeStage", "fingerprint", "load_recipe", "run_recipe"]

SHIPPED = Path(__file__).parent.parent / "recipes"
COMMANDS = ("download", "filter", "caption", "dedup", "shard", "report", "audit")
BUILTINS = ("new-urls", "release")
# The commands that write a dataset: a recipe owns their output, and checks that they leave samples.
DATASET_COMMANDS = ("download", "filter", "caption", "dedup", "shard")
_TOP_KEYS = {"description", "input", "work_dir", "releases", "stages"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Stand-ins for a command's positional arguments when its options are checked before the run.
_PLACEHOLDERS = {"download": ["INPUT", "OUT"], "report": ["IN"], "audit": ["IN"]} | {
    c: ["IN", "OUT"] for c in ("filter", "caption", "dedup", "shard")
}


@dataclass
class RecipeStage:
    run: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    allow_empty: bool = False  # a stage that leaves 0 samples does not stop the run


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


def load_recipe(
    path_or_name: str, overrides: list[str] | None = None, work_dir: str | None = None, input: str | None = None
) -> Recipe:
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
        raise UsageError(f'recipe {path}: stages must be [[stages]] tables (run = "download", ...), not {entries!r}')
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
    for stage in stages:  # the recipe's own key: read here, never passed to the command
        allow = stage.options.pop("allow_empty", False)
        if not isinstance(allow, bool):
            raise UsageError(f"recipe {path}, {stage.name}: allow_empty must be true or false, not {allow!r}")
        if allow and stage.run not in DATASET_COMMANDS:
            raise UsageError(
                f"recipe {path}, {stage.name}: allow_empty applies to stages that write a dataset "
                f"({', '.join(DATASET_COMMANDS)}), not {stage.run}"
            )
        stage.allow_empty = allow
    source = input if input is not None else raw.get("input")
    if not source:
        raise UsageError(f'recipe {path} names no input (add input = "..." or give --input)')
    releases = raw.get("releases")
    require_local(work_dir if work_dir is not None else raw.get("work_dir"), "a recipe's work directory")
    work = Path(work_dir if work_dir is not None else raw.get("work_dir") or path.stem)
    if any(s.run in BUILTINS for s in stages) and not releases:
        raise UsageError(f'recipe {path}: new-urls and release need releases = "DIR"')
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
    Returns its exit code and its summary; notes for a person go to stderr (and the log file), as the
    command says them."""
    from lenscap.cli import OUTCOMES

    outcome = OUTCOMES[argv[0]](**_parse(argv))
    for line in outcome.notes:
        print(line, file=sys.stderr)
        log(line.removeprefix("lenscap: "), to_stderr=False)
    return outcome.exit_code, outcome.summary


def _parse(argv: list[str]) -> dict[str, Any]:
    """A command line's flags, parsed and checked as the command line does (names, types, choices), as
    the command's outcome function takes them: without the flags every command handles alike (--json,
    --log-file), and a hidden old flag name's value under the name that replaced it."""
    import typer.main

    from lenscap import cli  # noqa

    name, args = argv[0], argv[1:]
    command = typer.main.get_command(cli.app).commands[name]  # type: ignore[attr-defined]
    try:
        with command.make_context(name, list(args)) as ctx:
            flags = dict(ctx.params)
    except Exception as e:  # click's parse errors (an unknown option, a bad value): a recipe mistake
        if hasattr(e, "format_message"):
            raise UsageError(f"stage {name}: {e.format_message()}") from None
        raise
    # click gives a repeated option as a tuple, and () when absent; the command takes a list or None
    flags = {k: (list(v) or None) if isinstance(v, tuple) else v for k, v in flags.items() if k not in ("as_json", "log_file")}
    return cli.under_new_names(flags)  # no note: a stage is parsed twice (checked on load, then run)


def _check_values(command: str, flags: dict[str, Any]) -> None:
    """The value checks a command makes before it touches anything, made for a recipe's stage before
    the first stage runs (names and types are the parser's)."""
    if command == "filter":
        from lenscap.filter.stage import FilterRules

        FilterRules(
            flags["min_side"],
            flags["max_aspect"],
            flags["min_bytes"],
            flags["caption_min_words"],
            flags["caption_max_words"],
            flags["status"],
            flags["where"],
        ).validate()
    elif command == "audit":
        from lenscap.audit import AuditOptions

        AuditOptions(
            target_words=flags["target_words"], script=flags["script"], sample=flags["sample"], fail_on=flags["fail_on"]
        ).validate()
    elif command == "download":
        from lenscap.cli import download_options

        download_options(**flags).validate()


def _releases(recipe: Recipe) -> list[Path]:
    if recipe.releases is None or not recipe.releases.is_dir():
        return []
    return sorted(p for p in recipe.releases.iterdir() if p.is_dir() and p.name.isdigit())


# -- fingerprints: what a stage's record is checked against on a rerun ---------------------------------


def fingerprint(path: str | os.PathLike[str]) -> str | None:
    """What identifies the content of ``path`` cheaply, without reading it: a digest of the relative
    name, size and modification time (ns) of every file (a dataset directory: its shards' ``.tar`` /
    ``.parquet`` / ``_stats.json``, its ``lenscap.json``, a report); names starting with a dot (a
    command's private ``.lenscap/`` state: lock, claim, journals) are left out. None if nothing is there.

    A directory written again (deleted and rebuilt, ``--overwrite``, a shard replaced) has another
    fingerprint even where its content is the same: a rebuilt dataset has a new manifest ``id``, which
    the datasets referring to its images check, so what was built from it is stale either way."""
    root = Path(path)
    try:
        st = root.stat()
    except OSError:
        return None
    digest = hashlib.sha256()
    if not root.is_dir():
        digest.update(f"{st.st_size} {st.st_mtime_ns}".encode())
        return digest.hexdigest()[:24]
    files = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            try:
                fst = os.stat(full)
            except OSError:  # removed while listed: another fingerprint than a whole directory's
                continue
            digest.update(f"{os.path.relpath(full, root)}\0{fst.st_size}\0{fst.st_mtime_ns}\n".encode())
            files += 1
    digest.update(f"files {files}".encode())
    return digest.hexdigest()[:24]


_HASHED_LIST_BYTES = 1 << 30  # a URL list file up to this size is known by its content, a larger one by its size and time


def _file_digest(path: str) -> str | None:
    """A URL list file's fingerprint: a digest of its bytes (rewritten with the same rows, it is the same
    list, and nothing is downloaded again); above ``_HASHED_LIST_BYTES``, its size and time."""
    try:
        size = os.path.getsize(path)
        if size > _HASHED_LIST_BYTES:
            return fingerprint(path)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()[:24]
    except OSError:
        return None


def _source_fingerprint(source: str) -> str:
    """A URL list's fingerprint: its local files' names and contents (``_file_digest``); a remote one
    by its location."""
    from lenscap.core.storage import is_remote

    if source == "-" or is_remote(source):
        return hashlib.sha256(source.encode()).hexdigest()[:24]
    try:
        from lenscap.download.inputs import resolve_input_files

        files = resolve_input_files(source)
    except Exception:  # noqa: BLE001 - an unreadable input is the download's to report
        files = [source]
    return hashlib.sha256("\n".join(f"{f}\0{_file_digest(f)}" for f in files).encode()).hexdigest()[:24]


def _option_pairs(argv: list[str]) -> dict[str, list[str]]:
    """A command line's flags, as flag -> values ("" for a flag without a value), positionals under ""."""
    out: dict[str, list[str]] = {}
    key = ""
    for token in argv:
        if token.startswith("--"):
            key = token
            out.setdefault(key, [])
        elif key:
            out[key].append(token)
            key = ""
        else:
            out.setdefault("", []).append(token)
    return out


def _shown(values: list[str] | None) -> str:
    return "(not set)" if values is None else " ".join(v for v in values if v) or "(set)"


def _changes(old: list[str], new: list[str]) -> str:
    """What differs between two command lines, for a person: ``--min-side 200 -> 256``."""
    before, after = _option_pairs(old[1:]), _option_pairs(new[1:])
    parts = []
    for flag in [*before, *(f for f in after if f not in before)]:
        a, b = before.get(flag), after.get(flag)
        if a == b:
            continue
        parts.append(f"{flag or 'arguments'} {_shown(a)} -> {_shown(b)}")
    return "; ".join(parts) or "the command line"


# -- one line per stage: what it did ------------------------------------------------------------------


def _counted(counts: dict[str, int], skip: tuple[str, ...] = ()) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]) if k not in skip and n)


def _samples(run: str, result: dict[str, Any]) -> int | None:
    """The samples a stage leaves for the next: downloaded, kept, not duplicates, captioned, exported."""
    if run == "download":
        return int((result.get("status") or {}).get("success", 0))
    if run == "filter":
        return int(result.get("kept", 0))
    if run == "dedup":
        outcome = (result.get("counts") or {}).get("dedup_status") or {}
        return sum(int(outcome.get(k, 0)) for k in ("unique", "kept", "error"))
    if run == "caption":
        return int((result.get("caption_status") or {}).get("ok", 0))
    if run == "shard":
        return int(result.get("samples", 0))
    if run == "new-urls":
        return int(result.get("new", 0))
    return None


def _outcome(run: str, argv: list[str], result: dict[str, Any]) -> str:
    """A stage's outcome in one line, from its command's summary."""
    if run == "download":
        status = result.get("status") or {}
        ok = status.get("success", 0)
        failed = _counted(status, ("success",))
        return f"{result.get('samples', 0)} URLs, {ok} downloaded, {sum(status.values()) - ok} failed" + (
            f" ({failed})" if failed else ""
        )
    if run == "filter":
        reasons = dict(result.get("reasons") or {})
        kept, errors = reasons.pop("kept", result.get("kept", 0)), reasons.pop("error", 0)
        dropped = sum(reasons.values())
        line = f"{kept + dropped + errors} in, {kept} kept, {dropped} dropped" + (f" ({_counted(reasons)})" if dropped else "")
        return line + (f", {errors} unreadable" if errors else "")
    if run == "dedup":
        outcome = (result.get("counts") or {}).get("dedup_status") or {}
        kept = _samples(run, result) or 0
        dups = int(outcome.get("duplicate", 0))
        verb = "marked" if "--mark-only" in argv else "removed"
        reasons = _counted(result.get("duplicates_by_reason") or {})
        return f"{kept + dups} in, {dups} duplicates {verb}" + (f" ({reasons})" if reasons else "") + f", {kept} kept"
    if run == "caption":
        status = _counted(result.get("caption_status") or {}) or "0 ok"
        spent = f"${float(result.get('spent_usd') or 0):.4f}" if result.get("cost_known", True) else "cost unknown"
        pending = "; batches still running" if result.get("complete") is False else ""
        return f"{status}; {spent}{pending}"
    if run == "shard":
        left = _counted(result.get("left_out") or {})
        return (
            f"{result.get('samples', 0)} samples in {result.get('shards', 0)} {result.get('format', '')} shards "
            f"({int(result.get('bytes') or 0):,} bytes)" + (f"; left out: {left}" if left else "")
        )
    if run == "report":
        return f"{result.get('html')}"
    if run == "audit":
        rules, broken = result.get("rules") or [], result.get("failed_rules") or []
        return f"{len(rules)} rules, {len(broken)} broken" + (f" ({', '.join(broken)})" if broken else "")
    if run == "new-urls":
        return f"{result.get('input', 0)} URLs, {result.get('new', 0)} new, {result.get('in_earlier_releases', 0)} in earlier releases"
    if run == "release":
        return f"released as {result.get('release')}"
    return ""


def _why_empty(run: str, result: dict[str, Any]) -> str:
    """What took every sample: ``61 dropped: caption-min-words``."""
    if run == "download":
        failed = _counted((result.get("status") or {}), ("success",))
        return f"{result.get('samples', 0)} URLs: {failed or 'none downloaded'}"
    if run == "filter":
        reasons = {k: v for k, v in (result.get("reasons") or {}).items() if k != "kept"}
        return f"{sum(reasons.values())} dropped: {', '.join(k for k, _ in sorted(reasons.items(), key=lambda kv: -kv[1])) or 'none'}"
    if run == "dedup":
        return f"{int(((result.get('counts') or {}).get('dedup_status') or {}).get('duplicate', 0))} duplicates"
    if run == "caption":
        return _counted(result.get("caption_status") or {}) or "nothing to caption"
    if run == "shard":
        return f"left out: {_counted(result.get('left_out') or {}) or 'nothing'}"
    return ""


# -- the run ----------------------------------------------------------------------------------------------


def run_recipe(recipe: Recipe, quiet: bool = False) -> dict[str, Any]:
    """Run (or resume) every stage; returns the run's summary, with ``exit_code``."""
    work = recipe.work_dir
    work.mkdir(parents=True, exist_ok=True)
    with DirLock(work / ".lenscap-run" / "lock", str(work)):
        return _run(recipe, quiet)


def _argv(
    stage: RecipeStage, base: Path, dataset: str | None, source: str, releases: list[Path], demo: bool
) -> tuple[list[str], Path | None]:
    """The stage's command line, and what it writes (a directory, a file, or None: an audit's gate)."""
    out = base / stage.name
    if stage.run == "new-urls":
        return ["new-urls", source, *[str(r) for r in releases]], out / "urls.parquet"
    if stage.run == "release":
        return ["release", str(dataset)], None
    if stage.run == "download":
        argv = ["download", source, str(out), *_flags(stage.options, releases)]
        if demo and "--allow-private-network" not in argv:
            argv.append("--allow-private-network")  # the demo's own images, served on loopback
        return argv, out
    if stage.run == "report":
        return [
            "report",
            str(dataset),
            "--out",
            str(base / f"{stage.name}.html"),
            *_flags(stage.options, releases),
        ], base / f"{stage.name}.html"
    if stage.run == "audit":  # a gate: its --fail-on stops the run (exit 6) before what follows
        return ["audit", str(dataset), *_flags(stage.options, releases)], None
    return [stage.run, str(dataset), str(out), *_flags(stage.options, releases)], out


def _stale(
    record: dict[str, Any] | None, argv: list[str], input_fp: str | None, output: Path | None, upstream: str | None
) -> tuple[str | None, bool]:
    """Why a finished stage must run again (None: its record still holds), and whether what its output
    holds must go first (``--overwrite``): not for a record written before fingerprints, whose stage
    runs again as it is (its command resumes, or refuses another job's output: then it is replaced)."""
    if record is None:
        return None, False
    if record.get("argv") != argv:
        return f"options changed since the last run ({_changes(record.get('argv') or [], argv)})", True
    if "input" not in record or "output" not in record:
        return "its record predates fingerprints, so it is checked by running it", False
    if record["input"] != input_fp:
        return f"its input ({upstream or 'the URL list'}) changed since the last run", True
    if output is not None:
        now = fingerprint(output)
        if now is None:
            return f"{output} is gone since the last run", True
        if now != record["output"]:
            return f"{output} changed since the last run", True
    return None, False


def _run(recipe: Recipe, quiet: bool) -> dict[str, Any]:
    from lenscap.core.errors import DatasetError

    base = recipe.work_dir / "current" if recipe.releases is not None else recipe.work_dir
    records = base / ".lenscap-run"
    records.mkdir(parents=True, exist_ok=True)
    releases = _releases(recipe)
    demo_server = None
    summary: dict[str, Any] = {"command": "run", "recipe": str(recipe.path), "work_dir": str(recipe.work_dir), "stages": []}
    dataset: str | None = None  # the latest dataset directory, input of the next stage
    dataset_stage: str | None = None  # the stage that wrote it
    source = recipe.input
    say = not quiet
    try:
        if source.startswith("@demo"):
            from lenscap.demo.command import start_demo_input

            # Generated images on a new loopback port each run: their URLs change, so start afresh.
            shutil.rmtree(records, ignore_errors=True)
            for stage in recipe.stages:
                shutil.rmtree(base / stage.name, ignore_errors=True)
            records.mkdir(parents=True)
            count = source.partition(":")[2]
            demo_server, source = start_demo_input(base, int(count) if count.isdigit() else 100)
        upstream_fp: str | None = None  # the fingerprint of ``dataset`` as it is now
        live: int | None = None  # the samples ``dataset`` holds (None: no dataset yet)
        announced = False  # a stage that runs again said that everything after it does too
        for number, stage in enumerate(recipe.stages, 1):
            if dataset is None and stage.run not in ("download", "new-urls"):
                raise UsageError(f"recipe {recipe.path}: stage {stage.name!r} needs a dataset before it (start with download)")
            argv, output = _argv(stage, base, dataset, source, releases, demo_server is not None)
            if stage.run == "new-urls":
                input_fp = hashlib.sha256(f"{_source_fingerprint(source)} {[r.name for r in releases]}".encode()).hexdigest()[:24]
            elif stage.run == "download":
                input_fp = _source_fingerprint(source)  # new-urls's list too: by its rows, not its file's time
            else:
                input_fp = upstream_fp
            record_path = records / f"{number:02d}-{stage.name}.json"
            try:
                record = json.loads(record_path.read_text()) if record_path.exists() else None
            except (OSError, ValueError):
                record = None  # unreadable: the stage runs again
            why, overwrite = _stale(record, argv, input_fp, output, dataset_stage)
            entry: dict[str, Any] = {"stage": stage.name, "exit_code": 0, "skipped": False}
            if record is not None and why is None:
                result = record["summary"]
                log(f"run: {stage.name}: up to date (skipped)", to_stderr=say)
                entry.update(
                    skipped=True,
                    outcome=record.get("outcome") or _outcome(stage.run, argv, result),
                    samples=_samples(stage.run, result),
                    summary=result,
                )
            else:
                overwrite = overwrite and stage.run in DATASET_COMMANDS
                if why is not None:
                    record_path.unlink(missing_ok=True)  # a kill from here on leaves the stage to run again
                    after = [s.name for s in recipe.stages[number:]]
                    if not announced or not why.startswith("its input"):
                        tail = f"; {', '.join(after)} rerun after it" if after else ""
                        log(f"run: {stage.name}: {why}: running again{tail}", to_stderr=say)
                        announced = True
                if stage.run in BUILTINS:
                    log(f"run: {stage.name} (built-in step)", to_stderr=say)
                else:
                    log(f"run: {stage.name}: lenscap {' '.join(argv)}{' --overwrite' if overwrite else ''}", to_stderr=say)
                started = time.monotonic()
                if stage.run == "new-urls":
                    code, result = 0, new_urls(source, releases, base / stage.name)
                elif stage.run == "release":
                    code, result = 0, release(Path(str(dataset)), recipe, base)
                else:
                    extra = ["--quiet"] if quiet else []
                    try:
                        code, result = _invoke(argv + extra + (["--overwrite"] if overwrite else []))
                    except DatasetError as e:
                        # The recipe owns WORK/<stage>: another job's output there (options changed in a run
                        # that did not finish) is replaced, as a changed option asks.
                        if overwrite or stage.run not in DATASET_COMMANDS or "holds the output of" not in str(e):
                            raise
                        log(f"run: {stage.name}: {e}; the recipe owns {output}: running again with --overwrite", to_stderr=say)
                        code, result = _invoke(argv + extra + ["--overwrite"])
                seconds = time.monotonic() - started
                outcome = _outcome(stage.run, argv, result)
                entry.update(exit_code=code, outcome=outcome, samples=_samples(stage.run, result), summary=result)
                if code == EXIT_EMPTY and stage.run in DATASET_COMMANDS:
                    code = 0  # the command finished, with nothing in its output: the recipe decides below (allow_empty)
                log(f"run: {stage.name}: {outcome}; {seconds:.1f} s", to_stderr=say)
                if code != 0:
                    summary["stages"].append(entry)
                    summary["exit_code"] = code
                    summary["stopped_at"] = stage.name
                    return summary
                if result.get("complete") is False:  # a batch caption job with batches still running
                    log(
                        f"run: {stage.name}: not finished (batches still running); the run stops here: rerun it "
                        f"(from cron, or with --set {stage.name}.wait=true) to collect them and go on",
                        to_stderr=True,
                    )
                    summary["stages"].append(entry)
                    summary.update(exit_code=0, pending=stage.name)
                    return summary
                if stage.run != "release":
                    atomic_write_json(
                        record_path,
                        {
                            "argv": argv,
                            "input": input_fp,
                            "output": fingerprint(output) if output is not None else None,
                            "outcome": outcome,
                            "summary": result,
                        },
                    )
            summary["stages"].append(entry)
            if stage.run == "new-urls":
                source = result["urls"]
                if result["new"] == 0:  # a quiet night for cron: no release, and no error
                    log("run: no new URLs since the last release; nothing to do", to_stderr=say)
                    shutil.rmtree(base, ignore_errors=True)
                    summary.update(release=None, exit_code=0)
                    return summary
                dataset_stage, upstream_fp = stage.name, fingerprint(output) if output is not None else None
            elif stage.run in DATASET_COMMANDS:
                # Where an earlier stage was allowed to leave nothing, what follows it is empty too, and said once.
                if entry["samples"] == 0 and live != 0 and not stage.allow_empty:
                    log(
                        f"run: WARNING: {stage.name} left 0 samples ({_why_empty(stage.run, result)}); stopping "
                        f"(allow_empty = true on the stage lets a run go on)",
                        to_stderr=True,
                    )
                    summary.update(exit_code=EXIT_EMPTY, stopped_at=stage.name)
                    return summary
                if stage.run != "shard":
                    live = entry["samples"]
                    dataset, dataset_stage = str(base / stage.name), stage.name
                    upstream_fp = fingerprint(base / stage.name)
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

    from lenscap.download.inputs import InputSpec, read_url_tables

    tables = list(read_url_tables(InputSpec(source)))
    table = pa.concat_tables(tables) if tables else pa.table({"url": pa.array([], pa.string())})
    out.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    try:
        con.register("new", table)
        files = [str(p) for r in releases for p in sorted(r.glob("*.parquet"))]
        if files:
            con.execute("CREATE TABLE old AS SELECT DISTINCT url FROM read_parquet(?, union_by_name = true)", [files])
            kept = con.sql("SELECT * FROM new ANTI JOIN old USING (url)").to_arrow_table()
        else:
            kept = table
    finally:
        con.close()
    tmp = out / ".urls.parquet.tmp"
    pq.write_table(kept, tmp)
    os.replace(tmp, out / "urls.parquet")
    return {
        "urls": str(out / "urls.parquet"),
        "input": table.num_rows,
        "new": kept.num_rows,
        "in_earlier_releases": table.num_rows - kept.num_rows,
        "releases": [str(r) for r in releases],
    }


def release(dataset: Path, recipe: Recipe, base: Path) -> dict[str, Any]:
    """Move ``dataset`` to the next ``releases/NNNNN`` and end this refresh (``WORK/current`` goes)."""
    assert recipe.releases is not None
    if dataset.exists():
        from lenscap.core.dataset import Dataset

        ds = Dataset.open(dataset)
        if ds.image_source() is not ds:  # its images are in this refresh's directories, which go below
            raise UsageError(
                f"release: {dataset} refers to the images of {ds.image_source().location}, which this "
                "release removes; set copy_images = true on the stage before release"
            )
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
