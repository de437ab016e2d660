"""A recipe: a whole pipeline in one TOML file, loaded and checked whole before its first stage runs.

A recipe names an input, a work directory and an ordered list of stages::

    input = "urls.csv"
    work_dir = "work"
    [[stages]]
    run = "download"          # a lenscap command: download, filter, caption, dedup, shard, report, audit
    samples_per_shard = 1000  # its options, as on the command line (underscores for dashes)
    [[stages]]
    run = "caption"
    backend = "openai"
    allow_empty = true        # the recipe's own key, not the command's (lenscap.run.pipeline)

Each stage's table is the command's options object (``lenscap.commands.OPTIONS``), checked by it as the
command line would check its flags: an unknown option, a value of the wrong type or a value no run
could mean is a ``UsageError`` naming the stage, before anything runs. ``lenscap.run.pipeline`` runs it.

**A recipe's paths stay in its directory.** A recipe may come from someone else: every path it names
(``input``, ``work_dir``, ``releases``, and each option that names a file or directory, ``Flag.path``:
a prompt file, a blocklist, a report's ``out``) is taken relative to the recipe's directory and, with
``..`` and symlinks resolved, must lie inside it (a shipped recipe's: inside the current directory);
``releases`` inside the work directory. Paths given on the command line (``--input``, ``--work-dir``,
``--set``) are the user's own, taken as the command line takes them, and not confined.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lenscap.commands import OPTIONS
from lenscap.core.errors import UsageError
from lenscap.core.options import Options, flag_name
from lenscap.core.storage import is_remote
from lenscap.run.options import RunOptions
from lenscap.run.release import BUILTINS

__all__ = ["SHIPPED", "COMMANDS", "DATASET_COMMANDS", "Recipe", "RecipeStage", "load_recipe", "command_line"]

SHIPPED = Path(__file__).parent.parent / "recipes"
COMMANDS = ("download", "filter", "caption", "dedup", "shard", "report", "audit")
# The commands that write a dataset: a recipe owns their output, and checks that they leave samples.
DATASET_COMMANDS = ("download", "filter", "caption", "dedup", "shard")
RELEASES = "@releases"  # a value that stands for every earlier release (against = "@releases")
_TOP_KEYS = {"description", "input", "work_dir", "releases", "stages"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class RecipeStage:
    run: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)  # the table as written (the stage record's command line)
    allow_empty: bool = False  # a stage that leaves 0 samples does not stop the run
    overridden: set[str] = field(default_factory=set)  # options given by --set: the user's, not confined
    paths: dict[str, Any] = field(default_factory=dict)  # the path options, from the recipe's directory

    def parsed(self, releases: list[Path]) -> Options:
        """The command's options object, with ``@releases`` standing for ``releases``."""
        values = {k: [str(r) for r in releases] if v == RELEASES else v for k, v in {**self.options, **self.paths}.items()}
        return OPTIONS[self.run].from_mapping(values)


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


def _locate(path_or_name: str) -> Path:
    """The recipe file ``path_or_name`` means, never a directory: a path to a file is that file; a plain
    name (no ``/``, no ``.toml``) is ``NAME.toml`` in the current directory, else the shipped recipe NAME.
    A recipe's work directory is named after it (``refresh`` works in ``./refresh/``), so a name that is
    also a directory here must still find its recipe: the directory is never read as one."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    plain = "/" not in path_or_name and os.sep not in path_or_name and path.suffix != ".toml"
    if plain:
        for candidate in (Path(f"{path_or_name}.toml"), SHIPPED / f"{path_or_name}.toml"):
            if candidate.is_file():
                return candidate
    shipped = ", ".join(p.stem for p in sorted(SHIPPED.glob("*.toml")))
    if path.is_dir() and plain:
        raise UsageError(
            f"recipe {path_or_name}: no {path_or_name}.toml here and no shipped recipe of that name "
            f"(./{path_or_name} is a directory, not a recipe; shipped recipes: {shipped})"
        )
    if path.is_dir():
        raise UsageError(f"recipe {path_or_name} is a directory, not a recipe file (shipped recipes: {shipped})")
    return path


def _read(path_or_name: str) -> tuple[Path, dict[str, Any]]:
    """A recipe file, or a shipped one by name (``demo``, ``lens-recaption``, ``refresh``), parsed."""
    path = _locate(path_or_name)
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
    return path, raw


def _stages(path: Path, raw: dict[str, Any]) -> list[RecipeStage]:
    entries = raw.get("stages") or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise UsageError(f'recipe {path}: stages must be [[stages]] tables (run = "download", ...), not {entries!r}')
    stages = []
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
    return stages


def _override(stages: list[RecipeStage], overrides: list[str]) -> None:
    """``--set STAGE.OPTION=VALUE`` (``STAGE.OPTION=`` removes it)."""
    names = [s.name for s in stages]
    for item in overrides:
        target, eq, value = item.partition("=")
        stage_name, dot, option = target.partition(".")
        if not (eq and dot and option):
            raise UsageError(f"--set takes STAGE.OPTION=VALUE, not {item!r}")
        stage = next((s for s in stages if s.name == stage_name), None)
        if stage is None:
            raise UsageError(f"--set {item}: the recipe has no stage {stage_name!r} (stages: {', '.join(names)})")
        name = option.replace("-", "_")
        stage.overridden.add(name)
        if value == "":
            stage.options.pop(name, None)
        else:
            stage.options[name] = _value(value)


def _check(path: Path, stages: list[RecipeStage]) -> None:
    """Every stage's own key (``allow_empty``) and its options, checked before the first stage runs."""
    for stage in stages:
        allow = stage.options.pop("allow_empty", False)
        if not isinstance(allow, bool):
            raise UsageError(f"recipe {path}, {stage.name}: allow_empty must be true or false, not {allow!r}")
        if allow and stage.run not in DATASET_COMMANDS:
            raise UsageError(
                f"recipe {path}, {stage.name}: allow_empty applies to stages that write a dataset "
                f"({', '.join(DATASET_COMMANDS)}), not {stage.run}"
            )
        stage.allow_empty = allow
        if stage.run in COMMANDS:
            try:
                stage.parsed([Path("r0")])
                stage.paths = _stage_paths(stage, _root(path))
            except UsageError as e:
                raise UsageError(f"recipe {path}, {stage.name}: {e}") from None


def _root(path: Path) -> Path:
    """The directory a recipe's paths are taken from and stay in: the recipe's own; a shipped recipe's, the
    current directory (its own is lenscap's)."""
    return Path.cwd() if path.parent.resolve() == SHIPPED.resolve() else path.parent.absolute()


def confined(text: str, root: Path, what: str) -> str:
    """``text``, a path a recipe names, taken from ``root``: a ``UsageError`` unless it lies inside ``root``
    once ``..`` and symlinks are resolved (a remote location is not a path here: it is returned as it is)."""
    if is_remote(text):
        return text
    full = root / text  # an absolute text stays itself
    inside = Path(os.path.realpath(full))
    if not inside.is_relative_to(os.path.realpath(root)):
        raise UsageError(
            f"{what} {text!r} is outside {root} (resolved: {inside}); a recipe's paths stay in its directory: "
            "give this one on the command line (--input, --work-dir, --set STAGE.OPTION=PATH) to use it"
        )
    return str(full)


def _stage_paths(stage: RecipeStage, root: Path) -> dict[str, Any]:
    """The stage's options that name files or directories, confined to ``root`` (``confined``); those given
    by --set, a preset's name (``Flag.keywords``), ``@releases`` and what is not text (``cache = false``:
    --no-cache) are left as they are."""
    out: dict[str, Any] = {}
    for name, flag in OPTIONS[stage.run].path_fields().items():
        value = stage.options.get(name)
        values = value if isinstance(value, list) else [value]
        if name in stage.overridden or value == RELEASES or not all(isinstance(v, str) for v in values):
            continue
        kept = [v if v in flag.keywords else confined(v, root, flag_name(name)) for v in values]
        out[name] = kept if isinstance(value, list) else kept[0]
    return out


def _text(path: Path, raw: dict[str, Any], key: str) -> str | None:
    """A top-level key's value: text, or a ``UsageError`` naming it."""
    value = raw.get(key)
    if value is not None and not isinstance(value, str):
        raise UsageError(f"recipe {path}: {key} must be a string, not {value!r}")
    return value


def load_recipe(
    path_or_name: str, overrides: list[str] | None = None, work_dir: str | None = None, input: str | None = None
) -> Recipe:
    """A recipe file, or a shipped one by name, with ``overrides`` (``STAGE.OPTION=VALUE``), checked whole."""
    path, raw = _read(path_or_name)
    own = {key: _text(path, raw, key) for key in ("input", "work_dir", "releases", "description")}
    stages = _stages(path, raw)
    _override(stages, overrides or [])
    _check(path, stages)
    root = _root(path)
    source = input if input is not None else _own_path(path, own["input"], root, "input")
    if not source:
        raise UsageError(f'recipe {path} names no input (add input = "..." or give --input)')
    RunOptions(work_dir=work_dir if work_dir is not None else own["work_dir"])  # its checks: a local path
    if work_dir is None:
        work_dir = _own_path(path, own["work_dir"] or path.stem, root, "work_dir")
    work = Path(work_dir)
    releases = _own_path(path, own["releases"], work, "releases")
    if any(s.run in BUILTINS for s in stages) and not releases:
        raise UsageError(f'recipe {path}: new-urls and release need releases = "DIR"')
    return Recipe(path, str(source), work, stages, Path(releases) if releases else None, own["description"] or "")


def _own_path(path: Path, text: str | None, root: Path, key: str) -> str | None:
    """A top-level path of the recipe, confined to ``root``; ``@demo`` is not a path."""
    if text is None or text.startswith("@demo"):
        return text
    try:
        return confined(text, root, key)
    except UsageError as e:
        raise UsageError(f"recipe {path}: {e}") from None


def command_line(command: str, arguments: list[str], options: dict[str, Any], releases: list[Path]) -> list[str]:
    """A stage as the command line that means the same (``filter IN OUT --min-side 256``): what the log
    shows and the stage's record holds, to tell on a rerun whether its options changed."""
    args = [command, *arguments]
    for key, value in options.items():
        flag = flag_name(key)
        if value == RELEASES:
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
