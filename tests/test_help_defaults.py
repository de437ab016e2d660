"""``--help`` is true: every default it shows is the value the code uses when the flag is not given.

Each command's ``--help`` is rendered as a person sees it (one wide line per option) and every
``[default: ...]`` in it is read back and compared with what the code does: a field's default, the
library function that resolves a default given in words (the cache directory, the report's path), and,
for caption's backend flags, each built-in backend's own default, as the backend parses it when the
flag is left out. A default given in words that no check below knows fails the test, so a new one
comes with its check.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import re
import warnings
from pathlib import Path

import pytest
import typer.main
from conftest import run_cli_here

from lenscap.audit.measures import PRESET_WORDS
from lenscap.caption.backends import REGISTRY as BACKENDS
from lenscap.caption.backends import backend_class
from lenscap.caption.cache import default_cache_dir
from lenscap.caption.options import BACKEND_FLAGS, CaptionOptions
from lenscap.cli import app
from lenscap.commands import OPTIONS
from lenscap.core.options import Executed, all_cores
from lenscap.core.registry import OptionRenamed
from lenscap.dedup.options import DedupOptions
from lenscap.dedup.semantic import cluster_count
from lenscap.download.host_policy import HostPolicy
from lenscap.download.inputs import CAPTION_COLUMN_GUESSES, URL_COLUMN_GUESSES
from lenscap.download.options import DownloadOptions
from lenscap.estimate.options import EstimateOptions
from lenscap.filter.annotators import REGISTRY as FILTERS
from lenscap.filter.annotators import annotator_class
from lenscap.report.options import ReportOptions

COMMON = {"as_json", "quiet", "log_file", "help", "version"}  # no default to show: flags, or nothing


def _commands() -> list[list[str]]:
    def walk(group, path):
        yield path
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                yield from walk(command, [*path, name])
            elif not getattr(command, "hidden", False):
                yield [*path, name]

    return list(walk(typer.main.get_command(app), []))


COMMANDS = _commands()


@pytest.fixture(scope="module")
def helps():
    """Every command's --help as printed, wide enough that no option's row wraps."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "4000"
    try:
        out = {}
        for path in COMMANDS:
            code, stdout, stderr = run_cli_here(*path, "--help")
            assert code == 0, stderr
            out[" ".join(path)] = stdout
        return out
    finally:
        if old is None:
            os.environ.pop("COLUMNS")
        else:
            os.environ["COLUMNS"] = old


def _rows(text: str) -> dict[str, str]:
    """Each option's row, by its first flag (continuation lines joined)."""
    rows: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        cells = line.strip().strip("│").strip()
        match = re.match(r"(--[\w-]+|-\w)", cells)
        if line.strip().startswith("│") and match:
            current = match.group(1)
            rows[current] = cells
        elif line.strip().startswith("│") and current is not None and cells:
            rows[current] += " " + cells
        elif not line.strip().startswith("│"):
            current = None
    return rows


def _shown(row: str) -> str | None:
    found = re.findall(r"\[default: (.*?)\](?=\s*$|\s+\S)", row)
    return found[-1] if found else None


def _per_backend(text: str, backends: list[str]) -> dict[str, str]:
    """``300; transformers, vllm: 256`` -> each backend's default as shown."""
    first, *rest = text.split("; ")
    named = {}
    for part in rest:
        names, _, value = part.partition(": ")
        named |= {name: value for name in names.split(", ")}
    assert set(named) <= set(backends), f"{text!r} names backends that do not take the option"
    return {b: named.get(b, first) for b in backends}


# -- what the code does when a flag is left out ------------------------------------------------------


def _backend_default(backend: str, name: str) -> str:
    """What ``backend`` takes for option ``name`` when it is not given, as --help should say it."""
    cls = backend_class(backend)
    spec = next(o for o in cls.options if o.name == name)
    value = cls.parse_options({})[name]
    return spec.default_text if value in (None, []) else str(value)


def _cache_dir_text(monkeypatch) -> str:
    """default_cache_dir() probed: which variable it reads first, then which, then its own path."""
    said = []
    monkeypatch.setenv("LENSCAP_CACHE_DIR", "/probe/a")
    monkeypatch.setenv("XDG_CACHE_HOME", "/probe/x")
    if str(default_cache_dir()) == "/probe/a":
        said.append("$LENSCAP_CACHE_DIR")
    monkeypatch.delenv("LENSCAP_CACHE_DIR")
    if str(default_cache_dir()) == "/probe/x/lenscap":
        said.append("$XDG_CACHE_HOME/lenscap")
    monkeypatch.delenv("XDG_CACHE_HOME")
    said.append(str(default_cache_dir()).replace(os.path.expanduser("~"), "~", 1))
    return ", else ".join(said)


def _target_words(shown: str) -> None:
    """audit with no --target-words: each preset's length (PRESET_WORDS), none for other prompts."""
    listed = dict(re.findall(r"([\w-]+) (\d+)", shown))
    assert {p: int(n) for p, n in listed.items()} == PRESET_WORDS, shown
    assert "none for other prompts" in shown


def _worded(command: str, field: str, shown: str, monkeypatch) -> None:
    """A default given in words, checked against the code that resolves it."""
    cls = OPTIONS[command]
    default = next(f for f in dataclasses.fields(cls) if f.name == field).default
    if shown == "no limit":
        assert default is None or (isinstance(default, float) and math.isinf(default)), f"{command} {field}"
    elif shown in ("on", "off"):
        assert default is (shown == "on"), f"{command} {field}"
    elif field == "processes" and command != "caption":
        assert issubclass(cls, Executed) and shown == "all cores"
        assert cls().with_default_processes().processes == all_cores()
    elif (command, field) == ("caption", "processes"):
        backends = list(BACKENDS.builtins)
        for backend, text in _per_backend(shown, backends).items():
            used = CaptionOptions(backend=backend).default_processes()
            assert text == str(used) or (text == "all cores" and used == all_cores()), f"{backend}: {text!r}, uses {used}"
    elif (command, field) == ("caption", "cache"):
        assert shown == _cache_dir_text(monkeypatch)
    elif (command, field) == ("report", "out"):
        assert ReportOptions().out_path("DIR") == shown
    elif (command, field) == ("audit", "target_words"):
        _target_words(shown)
    elif (command, field) in (("download", "per_host_rps"), ("download", "per_host_concurrency")):
        public, private = DownloadOptions().host_policy("").limits("example.com"), HostPolicy("").limits("127.0.0.1")
        used = public[0] if field == "per_host_rps" else public[1]
        assert default is None and private == (0, 0), f"{command} {field}"
        assert shown == f"{used:g}, none for a private address", f"download --{field}: shown {shown!r}, uses {used!r}"
    elif (command, field) == ("estimate", "compare_model"):
        out = json.loads(run_cli_here("estimate", "--images", "10", "--compare", "--json")[1])
        assert ", ".join(dict.fromkeys(r["model"] for r in out["compare"])) == shown
    elif (command, field) == ("dedup", "max_distance"):
        assert str(DedupOptions().distance) == shown
    elif (command, field) == ("dedup", "embed_model"):
        assert DedupOptions(semantic=True).model == shown
    elif (command, field) == ("dedup", "semantic_threshold"):
        assert str(DedupOptions(semantic=True).threshold) == shown
    elif (command, field) == ("dedup", "clusters"):
        per = int(shown.removeprefix("one per ").removesuffix(" images").replace(",", ""))
        assert [cluster_count(n, None) for n in (1, per, per + 1, 10 * per)] == [1, 1, 2, 10], shown
    elif command == "filter" and field.split("_", 1)[0] in FILTERS.builtins:
        annotator, option = field.split("_", 1)
        used = getattr(annotator_class(annotator)(None), option)  # built as filter builds it: the option left out
        assert str(used) == shown, f"filter --{field}: shown {shown!r}, the annotator uses {used!r}"
    else:
        pytest.fail(f"{command} --{field.replace('_', '-')} shows [default: {shown}]: add how to check it here")


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(p) or "lenscap" for p in COMMANDS])
def test_every_default_help_shows_is_the_one_the_code_uses(path, helps, monkeypatch):
    name = " ".join(path)
    command = typer.main.get_command(app)
    for part in path:
        command = command.commands[part]
    rows = _rows(helps[name])
    cls = OPTIONS.get(name)
    fields = {f.name: (f, flag) for f, flag in cls.flags()} if cls else {}
    for param in command.params:
        if getattr(param, "hidden", False) or getattr(param, "param_type_name", "") == "argument":
            continue
        row = rows.get(param.opts[0]) or next((rows[o] for o in param.opts if o in rows), None)
        assert row is not None, f"lenscap {name} --help has no row for {param.opts}"
        shown = _shown(row)
        if param.name in COMMON:
            assert shown is None, f"lenscap {name} {param.opts[0]} shows a default: {row}"
            continue
        f, flag = fields[param.name]
        if param.name in BACKEND_FLAGS and name == "caption":
            continue  # each backend's own: test_caption_backend_flags_show_each_backends_default
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if shown is None:
            # Nothing shown: only a flag, or an option whose default is "not given" (None).
            assert flag.switch or default is None, f"lenscap {name} {param.opts[0]} hides its default {default!r}"
        elif flag.show_default is True and not isinstance(default, bool):
            assert shown == str(default), f"lenscap {name} {param.opts[0]}: shown {shown!r}, the code uses {default!r}"
        else:
            _worded(name, param.name, shown, monkeypatch)


def test_caption_backend_flags_show_each_backends_default(helps):
    rows = _rows(helps["caption"])
    for name in BACKEND_FLAGS:
        flag = "--" + name.replace("_", "-")
        takers = [b for b in BACKENDS.builtins if any(o.name == name for o in backend_class(b).options)]
        shown = _shown(rows[flag])
        expected = {b: _backend_default(b, name) for b in takers}
        if backend_class(takers[0]).options and next(o for o in backend_class(takers[0]).options if o.name == name).type is bool:
            assert shown is None and all(v == "False" for v in expected.values()), f"{flag}: {rows[flag]}"
            continue
        if all(v is None for v in expected.values()):  # none has a default (--prices: the built-in table)
            assert shown is None, f"caption {flag}: shown {shown!r}, no backend has a default"
            continue
        assert shown is not None, f"caption {flag} shows no default; the backends use {expected}"
        assert _per_backend(shown, takers) == expected, f"caption {flag}: shown {shown!r}, the backends use {expected}"


@pytest.fixture(scope="module")
def listed_backends():
    code, out, err = run_cli_here("backends", "--json")
    assert code == 0, err
    return {b["name"]: b for b in json.loads(out)["backends"]}


@pytest.mark.parametrize("backend", list(BACKENDS.builtins))
def test_a_backend_uses_the_defaults_lenscap_backends_lists(backend, listed_backends):
    """``lenscap backends`` lists each option's default: the backend built from no options (as caption
    builds it) and the backend made directly (the library's keywords) use that value, not another copy."""
    cls = backend_class(backend)
    parsed = cls.parse_options({})
    params = inspect.signature(cls.__init__).parameters
    for listed in listed_backends[backend]["options"]:
        name, default = listed["name"], listed["default"]
        assert parsed[name] == default, f"{backend}: {name} is {parsed[name]!r} when not given, {default!r} as listed"
        param = params.get(name)
        if param is None or param.default is inspect.Parameter.empty:
            continue
        assert param.default == default or (param.default is None and default in (None, [])), (
            f"{backend}: {name} defaults to {param.default!r} when built directly, {default!r} as listed"
        )


def test_download_help_names_the_columns_it_looks_for(helps):
    """--url-col and --caption-col say their default in their help: the columns the reader tries, in order."""
    rows = _rows(helps["download"])
    for flag, guesses in (("--url-col", URL_COLUMN_GUESSES), ("--caption-col", CAPTION_COLUMN_GUESSES)):
        said = re.search(r"\(default: (.*?), whichever exists\)", rows[flag]).group(1)
        assert re.split(r", | or ", said) == list(guesses), f"{flag}: {said!r}, the reader tries {guesses}"


def test_estimate_defaults_are_captions():
    """estimate left at its defaults prices the run caption would make at its own (openai-batch's)."""
    batch = {o.name: o.default for o in backend_class("openai-batch").options}
    estimate = EstimateOptions(images="1")
    for name in ("model", "detail", "max_side", "max_requests_per_file", "max_file_mib"):
        assert getattr(estimate, name) == batch[name], name
    assert estimate.prompt == CaptionOptions().prompt


def test_help_types_no_flag_and_writes_usage_lines_one_way(helps):
    for name, text in helps.items():
        assert "<bool>" not in text, f"lenscap {name} --help types a flag <bool>"
        usage = next(line.strip() for line in text.splitlines() if "Usage:" in line)
        assert not re.search(r"[{}]", usage), f"lenscap {name}: {usage}"
        arguments = usage.split("[OPTIONS]", 1)[1].split()
        assert all(re.fullmatch(r"\[?[A-Z_]+\]?(\.\.\.)?|COMMAND|\[ARGS\]\.\.\.", a) for a in arguments), usage
    assert re.search(r"Usage: .*\bcaption \[OPTIONS\] IN_DIR OUT_DIR", helps["caption"])


# -- one unit, and options that do not go together say so ------------------------------------------------


def test_batch_file_size_is_mib_everywhere_and_the_old_flag_still_works():
    """The flag says the unit it counts (--max-file-mib, 1,048,576 bytes); --max-file-mb is its old name."""
    code, out, err = run_cli_here("estimate", "--images", "800M", "--batch", "--max-file-mb", "100", "--json")
    assert code == 0, err
    assert "--max-file-mb is now --max-file-mib" in err
    assert '"max_file_mib": 100.0' in out
    assert CaptionOptions.from_mapping({"max_file_mb": 100}).max_file_mib == 100  # a recipe's old key
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend = backend_class("batch-files").from_options({"max_file_mb": "100", "model": "m"})
    assert backend.batch.max_file_bytes == 100 * 1024 * 1024
    assert any(issubclass(w.category, OptionRenamed) for w in caught)
    for path in (["caption"], ["estimate"]):
        code, out, _ = run_cli_here(*path, "--help")
        words = " ".join(out.split())
        assert "--max-file-mib" in words and "MiB" in words and "--max-file-mb " not in words and " MB " not in words


def test_shard_help_says_min_shards_is_not_used_with_samples_per_shard(helps):
    assert "Not used with --samples-per-shard" in _rows(helps["shard"])["--min-shards"]


def test_audit_help_shows_its_example_once(helps):
    text = " ".join(helps["audit"].split())
    example = OPTIONS["audit"].example.removeprefix("lenscap audit data/captioned --fail-on ")
    assert text.count(example) == 1, text


def test_each_command_page_names_its_arguments_as_help_does(helps):
    """docs/commands/X.md's "Usage: `lenscap X ...`" starts with the arguments of X's --help usage line."""
    pages = Path(__file__).resolve().parents[1] / "docs" / "commands"
    for name, text in helps.items():
        page = pages / f"{name}.md"
        if not name or " " in name or not page.exists():
            continue
        usage = next(line.strip() for line in text.splitlines() if "Usage:" in line)
        arguments = usage.split("[OPTIONS]", 1)[1].strip()
        if arguments.startswith("COMMAND"):
            continue  # a group (batch): its page names its subcommands'
        documented = re.search(rf"Usage: `lenscap {name}( [^`]*)?`", page.read_text())
        assert documented, f"{page.name} has no Usage: `lenscap {name} ...`"
        assert (documented.group(1) or "").strip().startswith(arguments), f"{page.name}: {documented.group(0)}, --help: {usage}"
