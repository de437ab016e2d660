"""Inputs and recipes refused up front, as one line and exit code 2: an input shard without a column a stage
reads (or with one of another type), user SQL past its time or memory limit, a recipe path outside the
recipe's directory, a recipe value of the wrong type."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli_here

from lenscap.api import ShardStage, run_stage
from lenscap.core.checksums import digest_stream
from lenscap.core.errors import DatasetError, UsageError
from lenscap.core.schema import Column
from lenscap.core.sql import SqlLimits, rows_where
from lenscap.demo.datasets import write_image_dataset
from lenscap.run.recipe import load_recipe

ENDLESS = "(SELECT sum(range) FROM range(100000000000)) > 0"


def reshaped(tmp_path: Path, name: str, change: Callable[[pa.Table], pa.Table]) -> Path:
    """A two-shard dataset whose shard 1's parquet is ``change``d, its stats saying the new size and
    checksums (so the shard is complete and undamaged: only its columns differ)."""
    path = tmp_path / name
    write_image_dataset(path, 4, per_shard=2, size=(64, 48))
    parquet, stats = path / "00001.parquet", path / "00001_stats.json"
    pq.write_table(change(pq.read_table(parquet)), parquet)
    recorded = json.loads(stats.read_text())
    with open(parquet, "rb") as f:
        digest = digest_stream(f)
    recorded["files"]["00001.parquet"] = digest.size
    recorded["head_sha256"]["00001.parquet"] = digest.head_sha256
    recorded["sha256"]["00001.parquet"] = digest.sha256
    stats.write_text(json.dumps(recorded))
    return path


def without(column: str) -> Callable[[pa.Table], pa.Table]:
    return lambda t: t.drop([column])


def as_text(column: str) -> Callable[[pa.Table], pa.Table]:
    return lambda t: t.set_column(t.column_names.index(column), column, t.column(column).cast(pa.string()))


def one_error(code: int, err: str) -> str:
    """The one line a usage error is, with exit code 2."""
    lines = [line for line in err.splitlines() if line.startswith("lenscap: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    return lines[0]


# -- each input shard's columns, checked before any work ---------------------------------------------------


@pytest.mark.parametrize(
    ("change", "args", "expected"),
    [
        (without("key"), ["filter"], """shard 00001's parquet has no column "key" (filter needs key: string"""),
        (as_text("width"), ["filter", "--min-side", "10"], """shard 00001's column "width" is string, filter needs an integer"""),
        (without("caption"), ["filter", "--caption-min-words", "1"], """shard 00001's parquet has no column "caption" """),
        (without("url"), ["filter", "--where", "url IS NOT NULL"], "filter rules cannot run on shard 00001"),
        (without("key"), ["dedup"], """shard 00001's parquet has no column "key" (dedup needs key: string)"""),
        (as_text("width"), ["shard"], """shard 00001's column "width" is string, shard 00000's is int64"""),
        (without("key"), ["audit", "--out"], """shard 00001's parquet has no column "key" """),
    ],
)
def test_a_shard_without_a_column_a_stage_reads_is_refused_before_the_output_is_made(tmp_path, change, args, expected):
    src, out = reshaped(tmp_path, "in", change), tmp_path / "out"
    command, *flags = args
    argv = [command, str(src), *flags, str(out)] if command == "audit" else [command, str(src), str(out), *flags]
    code, _, err = run_cli_here(*argv, "--processes", "1")
    assert expected.strip() in one_error(code, err)
    assert not out.exists()


def test_audit_reads_every_shard_s_columns_before_scanning(tmp_path):
    src = reshaped(tmp_path, "in", without("key"))
    code, _, err = run_cli_here("audit", str(src))
    assert """shard 00001's parquet has no column "key" (audit needs key: any, caption: string)""" in one_error(code, err)


def test_a_filter_whose_rules_read_no_column_of_another_type_still_runs(tmp_path):
    src = reshaped(tmp_path, "in", as_text("width"))  # no rule reads width: nothing to refuse
    code, _, err = run_cli_here("filter", str(src), str(tmp_path / "out"), "--processes", "1")
    assert code == 0, err


# -- user SQL under a time and a memory limit --------------------------------------------------------------


def test_where_is_stopped_at_its_time_limit_with_one_line_saying_how_to_raise_it(tmp_path, monkeypatch):
    src = write_image_dataset(tmp_path / "in", 4, per_shard=2, size=(64, 48)).location
    monkeypatch.setenv("LENSCAP_SQL_TIMEOUT", "1")
    for where in (ENDLESS, "(SELECT sum(range) FROM range(width * 100000000)) > 0"):  # on no rows; per shard
        started = time.monotonic()
        code, _, err = run_cli_here("filter", src, str(tmp_path / "out"), "--where", where, "--processes", "1")
        line = one_error(code, err)
        assert "stopped after 1 s, the time limit of user SQL per shard (LENSCAP_SQL_TIMEOUT=SECONDS raises it)" in line
        assert time.monotonic() - started < 30


def test_where_past_its_memory_limit_is_one_line(tmp_path, monkeypatch):
    src = write_image_dataset(tmp_path / "in", 2, size=(64, 48)).location
    monkeypatch.setenv("LENSCAP_SQL_MEMORY", "64MB")
    where = "(SELECT list(range) FROM range(1000000000))[1] >= 0"
    code, _, err = run_cli_here("filter", src, str(tmp_path / "out"), "--where", where, "--processes", "1")
    assert "needs more than 64MB, the memory limit of user SQL (LENSCAP_SQL_MEMORY=SIZE" in one_error(code, err)


def test_a_value_where_cannot_take_is_one_line_about_the_job_not_a_failed_shard(tmp_path):
    src = write_image_dataset(tmp_path / "in", 2, size=(64, 48)).location
    code, _, err = run_cli_here("filter", src, str(tmp_path / "out"), "--where", "CAST(caption AS INT) > 0", "--processes", "1")
    assert "filter rules on shard 00000 of" in one_error(code, err) and "Conversion Error" in err


def test_every_user_sql_helper_is_bounded_and_the_limits_are_checked(monkeypatch):
    table = pa.table({"key": ["a", "b"]})
    with pytest.raises(UsageError, match="--redo on shard 00000: stopped after 0.5 s"):
        rows_where(table, ENDLESS, "--redo on shard 00000", limits=SqlLimits(timeout_s=0.5))
    assert rows_where(table, "key = 'b'", "--where") == [("b",)]
    monkeypatch.setenv("LENSCAP_SQL_TIMEOUT", "soon")
    with pytest.raises(UsageError, match="LENSCAP_SQL_TIMEOUT takes a number of seconds above 0, not 'soon'"):
        SqlLimits.from_env()
    monkeypatch.setenv("LENSCAP_SQL_TIMEOUT", "5")
    monkeypatch.setenv("LENSCAP_SQL_MEMORY", "lots")
    with pytest.raises(UsageError, match="LENSCAP_SQL_MEMORY takes a size"):
        SqlLimits.from_env()


# -- recipes: paths stay in the recipe's directory, values are of their type ------------------------------

HEAD = 'input = "urls.csv"\nwork_dir = "work"\n\n[[stages]]\nrun = "download"\n'


def recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipes" / "r.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    (path.parent / "urls.csv").write_text("url\nhttp://example.invalid/a.jpg\n")
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            HEAD + '[[stages]]\nrun = "caption"\nbackend = "describe"\nprompt = "/etc/passwd"\n',
            "caption: --prompt '/etc/passwd' is outside",
        ),
        (HEAD.replace('"work"', '"../../../.."'), "work_dir '../../../..' is outside"),
        (HEAD.replace('"urls.csv"', '"../urls.csv"'), "input '../urls.csv' is outside"),
        (HEAD + '[[stages]]\nrun = "report"\nout = "../report.html"\n', "report: --out '../report.html' is outside"),
        (HEAD + '[[stages]]\nrun = "filter"\nblocklist = "etc/passwd"\n', "filter: --blocklist 'etc/passwd' is outside"),
        ('releases = "../../elsewhere"\n' + HEAD, "releases '../../elsewhere' is outside"),
        (
            HEAD + "samples_per_shard = [1, 2]\n",
            "download: Invalid value for '--samples-per-shard': [1, 2] is not a single integer",
        ),
        (
            HEAD + 'allow_private_network = "yes"\n',
            "download: Invalid value for '--allow-private-network': 'yes' is not a valid boolean",
        ),
        (HEAD.replace('"work"', '["work"]'), "work_dir must be a string, not ['work']"),
        (HEAD.replace('"urls.csv"', "3"), "input must be a string, not 3"),
    ],
)
def test_a_recipe_path_outside_its_directory_or_a_value_of_another_type_is_refused_before_anything_runs(
    tmp_path, monkeypatch, text, expected
):
    (tmp_path / "recipes" / "etc").mkdir(parents=True)
    (tmp_path / "recipes" / "etc" / "passwd").symlink_to("/etc/passwd")  # a symlink is followed: outside
    path = recipe(tmp_path, text)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli_here("run", str(path), "--quiet")
    assert expected in one_error(code, err)
    assert not (tmp_path / "recipes" / "work").exists()


def test_recipe_paths_are_taken_from_its_directory_and_the_command_line_s_are_the_user_s(tmp_path, monkeypatch):
    path = recipe(tmp_path, HEAD + '[[stages]]\nrun = "caption"\nbackend = "describe"\nprompt = "prompts/p.txt"\n')
    monkeypatch.chdir(tmp_path)  # not the recipe's directory
    loaded = load_recipe(str(path))
    here = tmp_path / "recipes"
    assert (loaded.input, loaded.work_dir) == (str(here / "urls.csv"), here / "work")
    assert loaded.stages[1].parsed([]).prompt == str(here / "prompts" / "p.txt")
    assert load_recipe(str(path), ["caption.prompt=short"]).stages[1].parsed([]).prompt == "short"
    given = load_recipe(str(path), ["caption.prompt=/etc/hostname"], work_dir="/tmp/elsewhere", input="/etc/urls.csv")
    assert (given.stages[1].parsed([]).prompt, str(given.work_dir), given.input) == (
        "/etc/hostname",
        "/tmp/elsewhere",
        "/etc/urls.csv",
    )
    no_cache = load_recipe(str(path), ["caption.cache=false"]).stages[1].parsed([])
    assert (no_cache.cache, no_cache.no_cache) == (None, True)
    recipe(tmp_path, HEAD + '[[stages]]\nrun = "caption"\nbackend = "describe"\ncache = false\n')
    assert load_recipe(str(path)).stages[1].parsed([]).no_cache  # not a path: --no-cache
    shipped = load_recipe("lens-recaption", input="urls.csv")  # a shipped recipe's paths: the current directory's
    assert shipped.work_dir == tmp_path / "lens-out"
    assert shipped.stages[[s.run for s in shipped.stages].index("caption")].parsed([]).prompt == "alt-aware"


class Shout(ShardStage):
    """A library user's stage that reads the caption: it says so, and is held to it."""

    name = "shout"
    needs = (*ShardStage.needs, Column("caption", "string"))

    def process(self, sample):
        sample.row["caption"] = sample.row["caption"].upper()
        return sample


def test_a_library_stage_declares_the_columns_it_reads_and_an_input_without_them_is_refused(tmp_path):
    src = reshaped(tmp_path, "in", without("caption"))
    with pytest.raises(
        DatasetError, match="""shard 00001's parquet has no column "caption" \\(shout needs key: string, caption: string\\)"""
    ):
        run_stage(Shout(), src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_shard_written_with_no_sample_and_no_columns_reads_nothing_and_is_not_refused(tmp_path):
    src = write_image_dataset(tmp_path / "in", 2, size=(64, 48))
    src.writer(1).commit({"stage": "download"})  # no schema given: a parquet without columns
    code, _, err = run_cli_here("filter", str(src.path), str(tmp_path / "out"), "--processes", "1")
    assert code == 0, err
