"""``lenscap run RECIPE``: a recipe's stages in order, resumable, lockable, schedulable.

Each stage writes ``WORK/<name>`` (``name`` defaults to ``run``) from the previous dataset by calling
its command's function in ``lenscap.api`` with the stage's options object, so a recipe means exactly
what its command lines mean.

**A rerun never serves stale data.** A stage that finished is recorded (``WORK/.lenscap-run/NN-name.json``)
with its command line (its settings), the fingerprint of its input (the previous stage's output, or the
URL list) and the fingerprint of its output as written (``lenscap.run.fingerprint``). A rerun skips it
("up to date") only if all three still hold; otherwise it runs again, and so does every stage after it.
A stage that never finished (a killed run) runs again as it is, and its command resumes its own shards.

*Changed options rerun automatically*: the recipe owns ``WORK/<stage>``, so a stage that must run again
because its options, its input or its output changed runs with ``overwrite`` (its command would refuse
a directory that holds another job), and the log says why in one line::

    run: filter: options changed since the last run (--min-side 200 -> 256): running again; dedup, caption, shard rerun after it

Captions asked again cost nothing where the response cache (``$LENSCAP_CACHE_DIR``) already holds them.

**One line per stage** in the log (``lenscap.run.outcomes``); the run's summary lists ``stages``:
``{stage, exit_code, skipped, outcome, samples, summary}``.

**0 samples.** A stage that leaves no sample for the next logs ``run: WARNING: filter left 0 samples
(61 dropped: caption-min-words); stopping`` and the run ends with exit code 7, unless the stage says
``allow_empty = true``. A batch caption stage whose batches are still running is not recorded: the run
stops there with exit code 0, and the next run collects them and goes on.

Two built-in steps make a release train for cron (``lenscap.run.release``); ``input = "@demo"`` serves
generated images on loopback for the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lenscap.core.commits import atomic_write_json
from lenscap.core.errors import DatasetError, UsageError
from lenscap.core.lock import DirLock
from lenscap.core.options import Options
from lenscap.core.progress import log
from lenscap.core.result import EXIT_EMPTY, JobResult
from lenscap.demo.input import start_demo_input
from lenscap.run.fingerprint import changes, fingerprint, source_fingerprint
from lenscap.run.outcomes import outcome, samples_left, why_empty
from lenscap.run.recipe import DATASET_COMMANDS, Recipe, RecipeStage, command_line
from lenscap.run.release import BUILTINS, earlier_releases, new_urls, release

__all__ = ["run_recipe", "Command"]

# A command as a recipe calls it: (its positional arguments, its options, quiet) -> its result.
Command = Callable[[list[str], Options, bool], "JobResult | dict[str, Any]"]


def run_recipe(recipe: Recipe, commands: dict[str, Command], quiet: bool = False) -> dict[str, Any]:
    """Run (or resume) every stage, each by ``commands[stage.run]`` (``lenscap.api.COMMANDS``); returns
    the run's summary, with ``exit_code``."""
    work = recipe.work_dir
    work.mkdir(parents=True, exist_ok=True)
    with DirLock(work / ".lenscap-run" / "lock", str(work)):
        return _Run(recipe, commands, quiet).run()


@dataclasses.dataclass
class _Planned:
    """A stage about to run: its command line (for the log and the record), what it writes, and the call."""

    argv: list[str]
    output: Path | None
    paths: list[str] = dataclasses.field(default_factory=list)
    options: Options | None = None


class _Run:
    def __init__(self, recipe: Recipe, commands: dict[str, Command], quiet: bool) -> None:
        self.recipe, self.commands, self.quiet = recipe, commands, quiet
        self.base = recipe.work_dir / "current" if recipe.releases is not None else recipe.work_dir
        self.records = self.base / ".lenscap-run"
        self.releases = earlier_releases(recipe.releases)
        self.source = recipe.input
        self.summary: dict[str, Any] = {
            "command": "run",
            "recipe": str(recipe.path),
            "work_dir": str(recipe.work_dir),
            "stages": [],
        }
        self.dataset: str | None = None  # the latest dataset directory, input of the next stage
        self.dataset_stage: str | None = None  # the stage that wrote it
        self.upstream_fp: str | None = None  # the fingerprint of ``dataset`` as it is now
        self.live: int | None = None  # the samples ``dataset`` holds (None: no dataset yet)
        self.announced = False  # a stage that runs again said that everything after it does too
        self.demo = False

    def say(self, line: str, always: bool = False) -> None:
        log(f"run: {line}", to_stderr=always or not self.quiet)

    def run(self) -> dict[str, Any]:
        self.records.mkdir(parents=True, exist_ok=True)
        server = self._demo_input() if self.source.startswith("@demo") else None
        try:
            for number, stage in enumerate(self.recipe.stages, 1):
                if self._stage(number, stage):
                    return self.summary
        finally:
            if server is not None:
                server.__exit__(None, None, None)
        self.summary["exit_code"] = 0
        return self.summary

    def _demo_input(self) -> Any:
        """Generated images on a new loopback port each run: their URLs change, so start afresh."""
        shutil.rmtree(self.records, ignore_errors=True)
        for stage in self.recipe.stages:
            shutil.rmtree(self.base / stage.name, ignore_errors=True)
        self.records.mkdir(parents=True)
        count = self.source.partition(":")[2]
        server, self.source = start_demo_input(self.base, int(count) if count.isdigit() else 100)
        self.demo = True
        return server

    # -- one stage ----------------------------------------------------------------------------------

    def _stage(self, number: int, stage: RecipeStage) -> bool:
        """Run (or skip) one stage; True when the run stops there."""
        if self.dataset is None and stage.run not in ("download", "new-urls"):
            raise UsageError(f"recipe {self.recipe.path}: stage {stage.name!r} needs a dataset before it (start with download)")
        planned = self._plan(stage)
        input_fp = self._input_fingerprint(stage)
        record_path = self.records / f"{number:02d}-{stage.name}.json"
        record = _read_record(record_path)
        why, overwrite = _stale(record, planned.argv, input_fp, planned.output, self.dataset_stage)
        entry: dict[str, Any] = {"stage": stage.name, "exit_code": 0, "skipped": False}
        if record is not None and why is None:
            result = record["summary"]
            self.say(f"{stage.name}: up to date (skipped)")
            entry.update(
                skipped=True,
                outcome=record.get("outcome") or outcome(stage.run, planned.argv, result),
                samples=samples_left(stage.run, result),
                summary=result,
            )
        else:
            if why is not None:
                record_path.unlink(missing_ok=True)  # a kill from here on leaves the stage to run again
                self._say_why(number, stage, why)
            result = self._execute(stage, planned, overwrite and stage.run in DATASET_COMMANDS, entry)
            if self._stopped_by(stage, entry, result):
                return True
            if stage.run != "release":
                record = {"argv": planned.argv, "input": input_fp, "output": _fingerprint(planned.output)}
                atomic_write_json(record_path, record | {"outcome": entry["outcome"], "summary": result})
        self.summary["stages"].append(entry)
        return self._advance(stage, entry, result, planned.output)

    def _say_why(self, number: int, stage: RecipeStage, why: str) -> None:
        after = [s.name for s in self.recipe.stages[number:]]
        if not self.announced or not why.startswith("its input"):
            tail = f"; {', '.join(after)} rerun after it" if after else ""
            self.say(f"{stage.name}: {why}: running again{tail}")
            self.announced = True

    def _plan(self, stage: RecipeStage) -> _Planned:
        """The stage's command line, what it writes (a directory, a file, or None: an audit's gate), and
        the call that runs it."""
        out, dataset = self.base / stage.name, str(self.dataset)
        if stage.run == "new-urls":
            return _Planned(["new-urls", self.source, *[str(r) for r in self.releases]], out / "urls.parquet")
        if stage.run == "release":
            return _Planned(["release", dataset], None)
        options = stage.parsed(self.releases)
        table = stage.options
        if stage.run == "download":
            argv = command_line("download", [self.source, str(out)], table, self.releases)
            if self.demo and "--allow-private-network" not in argv:
                argv.append("--allow-private-network")  # the demo's own images, served on loopback
                options = dataclasses.replace(options, allow_private_network=True)  # type: ignore[call-arg]
            return _Planned(argv, out, [self.source, str(out)], options)
        if stage.run == "report":
            html = self.base / f"{stage.name}.html"
            argv = command_line("report", [dataset, "--out", str(html)], table, self.releases)
            if "out" not in table:
                options = dataclasses.replace(options, out=str(html))  # type: ignore[call-arg]
            return _Planned(argv, html, [dataset], options)
        if stage.run == "audit":  # a gate: its --fail-on stops the run (exit 6) before what follows
            return _Planned(command_line("audit", [dataset], table, self.releases), None, [dataset], options)
        return _Planned(command_line(stage.run, [dataset, str(out)], table, self.releases), out, [dataset, str(out)], options)

    def _input_fingerprint(self, stage: RecipeStage) -> str | None:
        if stage.run == "new-urls":
            text = f"{source_fingerprint(self.source)} {[r.name for r in self.releases]}"
            return hashlib.sha256(text.encode()).hexdigest()[:24]
        if stage.run == "download":
            return source_fingerprint(self.source)  # new-urls's list too: by its rows, not its file's time
        return self.upstream_fp

    def _execute(self, stage: RecipeStage, planned: _Planned, overwrite: bool, entry: dict[str, Any]) -> dict[str, Any]:
        """Run the stage; its summary. ``entry`` (the run summary's line for it) is filled in."""
        if stage.run in BUILTINS:
            self.say(f"{stage.name} (built-in step)")
        else:
            self.say(f"{stage.name}: lenscap {' '.join(planned.argv)}{' --overwrite' if overwrite else ''}")
        started = time.monotonic()
        if stage.run == "new-urls":
            result = new_urls(self.source, self.releases, self.base / stage.name)
        elif stage.run == "release":
            assert self.recipe.releases is not None
            result = release(Path(str(self.dataset)), self.recipe.releases, self.base)
        else:
            result = self._call(stage, planned, overwrite)
        line = outcome(stage.run, planned.argv, result)
        entry.update(exit_code=result.get("exit_code", 0), outcome=line, samples=samples_left(stage.run, result), summary=result)
        self.say(f"{stage.name}: {line}; {time.monotonic() - started:.1f} s")
        return result

    def _call(self, stage: RecipeStage, planned: _Planned, overwrite: bool) -> dict[str, Any]:
        assert planned.options is not None
        options = dataclasses.replace(planned.options, overwrite=True) if overwrite else planned.options  # type: ignore[call-arg]
        try:
            result = self.commands[stage.run](planned.paths, options, self.quiet)
        except DatasetError as e:
            # The recipe owns WORK/<stage>: another job's output there (options changed in a run that did
            # not finish) is replaced, as a changed option asks.
            if overwrite or stage.run not in DATASET_COMMANDS or "holds the output of" not in str(e):
                raise
            self.say(f"{stage.name}: {e}; the recipe owns {planned.output}: running again with --overwrite")
            result = self.commands[stage.run](planned.paths, dataclasses.replace(planned.options, overwrite=True), self.quiet)  # type: ignore[call-arg]
        return result.summary() if isinstance(result, JobResult) else result

    # -- after a stage ------------------------------------------------------------------------------

    def _stopped_by(self, stage: RecipeStage, entry: dict[str, Any], result: dict[str, Any]) -> bool:
        """Whether the stage just run stops the run: it failed, or its batches are still running."""
        code = entry["exit_code"]
        if code == EXIT_EMPTY and stage.run in DATASET_COMMANDS:
            code = 0  # the command finished, with nothing in its output: the recipe decides (allow_empty)
        if code != 0:
            self.summary["stages"].append(entry)
            self.summary.update(exit_code=code, stopped_at=stage.name, ended=f"stopped at {stage.name}: {entry['outcome']}")
            return True
        if result.get("complete") is False:  # a batch caption job with batches still running
            self.say(
                f"{stage.name}: not finished (batches still running); the run stops here: rerun it "
                f"(from cron, or with --set {stage.name}.wait=true) to collect them and go on",
                always=True,
            )
            self.summary["stages"].append(entry)
            self.summary.update(
                exit_code=0, pending=stage.name, ended=f"{stage.name}: batches still running; the next run goes on"
            )
            return True
        return False

    def _advance(self, stage: RecipeStage, entry: dict[str, Any], result: dict[str, Any], output: Path | None) -> bool:
        """Take the stage's output as the next stage's input; True when the run ends here."""
        if stage.run == "new-urls":
            self.source = result["urls"]
            if result["new"] == 0:  # a quiet night for cron: no release, and no error
                self.say("no new URLs since the last release; nothing to do")
                shutil.rmtree(self.base, ignore_errors=True)
                self.summary.update(release=None, exit_code=0, ended="no new URLs: nothing to release")
                return True
            self.dataset_stage, self.upstream_fp = stage.name, _fingerprint(output)
        elif stage.run in DATASET_COMMANDS:
            # Where an earlier stage was allowed to leave nothing, what follows it is empty too, and said once.
            if entry["samples"] == 0 and self.live != 0 and not stage.allow_empty:
                self.say(
                    f"WARNING: {stage.name} left 0 samples ({why_empty(stage.run, result)}); stopping "
                    f"(allow_empty = true on the stage lets a run go on)",
                    always=True,
                )
                self.summary.update(
                    exit_code=EXIT_EMPTY, stopped_at=stage.name, ended=f"stopped at {stage.name}: it left 0 samples"
                )
                return True
            if stage.run != "shard":
                self.live = entry["samples"]
                self.dataset, self.dataset_stage = str(self.base / stage.name), stage.name
                self.upstream_fp = fingerprint(self.base / stage.name)
        elif stage.run == "release":
            self.summary["release"] = result["release"]
            self.summary["ended"] = f"release {result['release']} written: {self.live or 0:,} new samples"
        return False


def _fingerprint(output: Path | None) -> str | None:
    return fingerprint(output) if output is not None else None


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        return None  # unreadable: the stage runs again


def _stale(
    record: dict[str, Any] | None, argv: list[str], input_fp: str | None, output: Path | None, upstream: str | None
) -> tuple[str | None, bool]:
    """Why a finished stage must run again (None: its record still holds), and whether what its output
    holds must go first (``overwrite``): not for a record written before fingerprints, whose stage runs
    again as it is (its command resumes, or refuses another job's output: then it is replaced)."""
    if record is None:
        return None, False
    if record.get("argv") != argv:
        return f"options changed since the last run ({changes(record.get('argv') or [], argv)})", True
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
