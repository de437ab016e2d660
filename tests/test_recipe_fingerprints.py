"""lenscap run never serves stale data: a stage is skipped only while its settings, its input's fingerprint
and its output's fingerprint are those it finished with; otherwise it runs again, and everything after it.
Also: one outcome line per stage, exit code 7 for a stage that leaves 0 samples (unless allow_empty), and
the shipped recipes (lens-recaption on a URL list without alt-text, refresh's order and crontab line)."""

from __future__ import annotations

import json
import shlex
import shutil
import tarfile
from pathlib import Path

import pytest
from conftest import run_cli_here

from lenscap.core.dataset import Dataset

RECIPE = """
input = "{urls}"
work_dir = "{work}"

[[stages]]
run = "download"
allow_private_network = true  # the test server is on loopback
samples_per_shard = 4
processes = 1
threads = 4
timeout = 3

[[stages]]
run = "filter"
min_side = 10

[[stages]]
run = "dedup"
processes = 1

[[stages]]
run = "caption"
backend = "describe"
cache = false          # the same provenance (caption_cached) in every run

[[stages]]
run = "shard"
samples_per_shard = 4
processes = 1
"""
STAGES = ["download", "filter", "dedup", "caption", "shard"]
# Six images, one URL that redirects to the first (a duplicate), and one image 100 x 80 pixels.
PATHS = [f"/ok/{i}.jpg" for i in range(6)] + ["/redirect", "/small.png"]


@pytest.fixture(autouse=True)
def _no_log_file_after():
    """Commands run in this process: a --log-file given to one is not kept for the next test."""
    from lenscap.core.progress import set_log_file

    yield
    set_log_file(None)


def setup(tmp_path: Path, server, paths: list[str] = PATHS) -> Path:
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\n" + "".join(f"{server.url(p)},alt text of {p}\n" for p in paths))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE.format(urls=urls, work=tmp_path / "work"))
    return recipe


def run(recipe: Path | str, log: Path, *args: str) -> tuple[int, dict, str]:
    """``lenscap --log-file LOG run RECIPE ARGS --json --quiet`` in this process: exit code, summary, and
    what this run added to the log file."""
    before = log.read_text() if log.exists() else ""
    code, out, err = run_cli_here("--log-file", str(log), "run", str(recipe), *args, "--json", "--quiet")
    assert "Traceback" not in err, err
    return code, json.loads(out), log.read_text()[len(before) :]


def files(path: Path) -> dict[str, int]:
    """Every file a run writes (not a command's private state, nor the run's lock), with its mtime."""
    return {
        str(p.relative_to(path)): p.stat().st_mtime_ns
        for p in sorted(path.rglob("*"))
        if p.is_file()
        and not any(part.startswith(".lenscap") and part != ".lenscap-run" for part in p.parts)
        and p.name != "lock"
    }


def rows(path: Path) -> dict[str, dict]:
    ds = Dataset(path)
    return {r["key"]: r for i in ds.completed_ids() for r in ds.read_table(i).to_pylist()}


def tars(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.tar"))}


def test_unchanged_rerun_skips_and_a_deleted_stage_is_rebuilt_with_all_after_it(tmp_path, image_server):
    recipe, log, work = setup(tmp_path, image_server), tmp_path / "run.log", tmp_path / "work"
    code, first, text = run(recipe, log)
    assert code == 0, text
    assert [s["stage"] for s in first["stages"]] == STAGES and not any(s["skipped"] for s in first["stages"])
    assert [s["samples"] for s in first["stages"]] == [8, 8, 7, 7, 7]
    # one outcome line per stage, in the log file, built from the command's summary
    for s in first["stages"]:
        assert f"run: {s['stage']}: {s['outcome']}; " in text, (s, text)
    assert "run: download: 8 URLs, 8 downloaded, 0 failed; " in text
    assert "run: filter: 8 in, 8 kept, 0 dropped; " in text
    assert "run: dedup: 8 in, 1 duplicates removed (1 exact), 7 kept; " in text
    assert "run: caption: 7 ok, 1 skipped; $0.0000; " in text
    assert "run: shard: 7 samples in 2 webdataset shards" in text
    clean_rows, clean_tars, written = rows(work / "dedup"), tars(work / "shard"), files(work)

    # (c) nothing changed: every stage up to date, nothing written again
    code, second, text = run(recipe, log)
    assert code == 0, text
    assert all(s["skipped"] for s in second["stages"]) and text.count("up to date (skipped)") == 5
    assert [s["outcome"] for s in second["stages"]] == [s["outcome"] for s in first["stages"]]
    assert [s["samples"] for s in second["stages"]] == [8, 8, 7, 7, 7]
    assert "lenscap filter" not in text and files(work) == written

    # (a) the filter's output deleted: the record is not trusted over the disk; it and all after it run again
    shutil.rmtree(work / "filter")
    code, third, text = run(recipe, log)
    assert code == 0, text
    assert [s["skipped"] for s in third["stages"]] == [True, False, False, False, False]
    assert (
        f"run: filter: {work / 'filter'} is gone since the last run: running again; dedup, caption, shard rerun after it" in text
    )
    assert (work / "filter" / "lenscap.json").exists()
    assert rows(work / "dedup") == clean_rows
    assert tars(work / "shard") == clean_tars
    # and the rebuilt pipeline is up to date in its turn
    code, fourth, text = run(recipe, log)
    assert code == 0 and all(s["skipped"] for s in fourth["stages"]), text


def test_a_changed_option_reruns_the_stage_and_what_follows_and_zero_samples_stop_the_run(tmp_path, image_server):
    recipe, log, work = setup(tmp_path, image_server), tmp_path / "run.log", tmp_path / "work"
    code, first, text = run(recipe, log)
    assert code == 0, text
    assert first["stages"][-1]["summary"]["samples"] == 7

    # (b) a filter option changed: filter, dedup, caption and shard run again (with --overwrite: the recipe
    # owns its work directory); the export holds what the new filter kept, nothing from before
    code, second, text = run(recipe, log, "--set", "filter.min_side=200")
    assert code == 0, text
    assert (
        "run: filter: options changed since the last run (--min-side 10 -> 200): running again; "
        "dedup, caption, shard rerun after it"
    ) in text
    assert [s["skipped"] for s in second["stages"]] == [True, False, False, False, False]
    assert "run: filter: 8 in, 7 kept, 1 dropped (1 min-side); " in text
    assert [s["samples"] for s in second["stages"]] == [8, 7, 6, 6, 6]
    exported = [r for r in rows(work / "dedup").values() if r["dedup_status"] in ("unique", "kept")]
    assert len(exported) == 6 and not any(r["url"].endswith("/small.png") for r in exported)
    members = 0
    for path in (work / "shard").glob("*.tar"):
        with tarfile.open(path) as tar:
            members += len(tar.getmembers())
    assert members == 6 * 3  # KEY.jpg, KEY.txt, KEY.json
    assert not any(r["url"].endswith("/small.png") for r in rows(work / "caption").values() if r["caption_status"] == "ok")

    # (e) a filter that keeps nothing: a warning, the run stops, exit code 7
    code, third, text = run(recipe, log, "--set", "filter.min_side=5000")
    assert code == 7 and third["exit_code"] == 7 and third["stopped_at"] == "filter", text
    assert "run: WARNING: filter left 0 samples (8 dropped: min-side); stopping" in text
    assert [s["stage"] for s in third["stages"]] == ["download", "filter"] and third["stages"][1]["samples"] == 0
    # the same again: the filter is up to date, and still left nothing
    code, _, text = run(recipe, log, "--set", "filter.min_side=5000")
    assert code == 7 and "run: filter: up to date (skipped)" in text and "WARNING: filter left 0 samples" in text
    # allowed: the run goes on; the stages after it hold nothing either, and are not stopped for it again
    code, fourth, text = run(recipe, log, "--set", "filter.min_side=5000", "--set", "filter.allow_empty=true")
    assert code == 0 and fourth["exit_code"] == 0, text
    assert [s["samples"] for s in fourth["stages"]] == [8, 0, 0, 0, 0] and "WARNING" not in text
    assert [s["skipped"] for s in fourth["stages"]] == [True, True, False, False, False]


def test_allow_empty_is_checked_like_any_other_key(tmp_path, image_server):
    recipe = setup(tmp_path, image_server)
    for bad, message in (
        (["--set", "filter.allow_empty=3"], "allow_empty must be true or false, not 3"),
        (["--set", "nosuch.allow_empty=true"], "no stage 'nosuch'"),
    ):
        code, _, err = run_cli_here("run", str(recipe), *bad, "--quiet")
        assert code == 2 and message in err, err
    text = recipe.read_text() + '\n[[stages]]\nrun = "report"\nallow_empty = true\n'
    recipe.write_text(text)
    code, _, err = run_cli_here("run", str(recipe), "--quiet")
    assert code == 2 and "allow_empty applies to stages that write a dataset" in err, err
    assert not (tmp_path / "work" / "download").exists()


def test_lens_recaption_keeps_samples_of_a_url_list_without_alt_text(tmp_path, image_server):
    """(d) the shipped recipe on plain URLs: its filter's alt-text rule applies only where there is alt-text."""
    urls = tmp_path / "urls.txt"
    urls.write_text("".join(f"{image_server.url(p)}\n" for p in PATHS[:4]))
    log = tmp_path / "run.log"
    code, summary, text = run(
        "lens-recaption",
        log,
        "--input",
        str(urls),
        "--work-dir",
        str(tmp_path / "lens"),
        "--set",
        "download.allow_private_network=true",
        "--set",
        "download.processes=1",
        "--set",
        "download.threads=4",
        "--set",
        "caption.backend=describe",
        "--set",
        "caption.model=",
        "--set",
        "caption.detail=",
        "--set",
        "caption.max_cost=",
        "--set",
        "filter.min_sharpness=",  # two of the test's generated scenes are blurry to the recipe's blur rule
        "--set",
        "audit.fail_on=",
        "--set",
        "shard.target_size=",
        "--set",
        "shard.samples_per_shard=2",
        "--set",
        "report.sample=2",
    )
    assert code == 0, text
    by_stage = {s["stage"]: s for s in summary["stages"]}
    assert by_stage["download"]["samples"] == 4 and by_stage["filter"]["samples"] == 4, by_stage["filter"]["outcome"]
    assert by_stage["caption"]["samples"] == 4 and by_stage["shard"]["summary"]["samples"] == 4
    assert "run: filter: 4 in, 4 kept, 0 dropped; " in text
    # where there is alt-text, the recipe's filter still drops a one-word one (DataComp's rule)
    from lenscap.run.recipe import load_recipe

    where = next(s for s in load_recipe("lens-recaption").stages if s.run == "filter").options["where"]
    import duckdb

    kept = duckdb.sql(f"SELECT caption FROM (VALUES (NULL), (''), ('logo'), ('a red bus')) t(caption) WHERE {where}").fetchall()
    assert kept == [(None,), ("",), ("a red bus",)]


def test_shipped_recipes_say_what_they_do():
    """(f) refresh dedups against the releases before captioning, and the caption (the last dataset before
    release) holds its images; its crontab line and lens-recaption's estimate line parse with the real CLI."""
    import typer.main
    from test_cron import documented_line

    from lenscap.cli import app
    from lenscap.run.recipe import SHIPPED, load_recipe

    refresh = load_recipe("refresh")
    assert [s.run for s in refresh.stages] == ["new-urls", "download", "filter", "dedup", "caption", "release"]
    assert refresh.stages[3].options["against"] == "@releases" and refresh.stages[4].options["copy_images"] is True

    group = typer.main.get_command(app)

    def parse(line: str) -> None:
        argv = shlex.split(line)
        assert argv[0] == "lenscap"
        with group.make_context("lenscap", argv[1:]) as ctx:  # raises on an unknown or misplaced option
            protected = getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])  # the subcommand
            name, command, rest = group.resolve_command(ctx, [*protected, *ctx.args])
            with command.make_context(name, rest, parent=ctx) as sub:
                return sub.params

    cron = next(line for line in (SHIPPED / "refresh.toml").read_text().splitlines() if "17 3 * * *" in line)
    assert cron.removeprefix("#").strip() == documented_line()  # the line tests/test_cron.py runs
    params = parse("lenscap " + cron.split("/bin/lenscap ", 1)[1])
    assert params["input"] == "urls.txt" and params["quiet"] is True
    text = (SHIPPED / "lens-recaption.toml").read_text()
    estimate = next(line for line in text.splitlines() if "lenscap estimate" in line).lstrip("# ")
    caption = next(s for s in load_recipe("lens-recaption").stages if s.run == "caption")
    params = parse(estimate)
    assert params["prompt"] == caption.options["prompt"] == "alt-aware" and params["model"] == caption.options["model"]
    assert params["detail"] == caption.options["detail"] and params["batch"] is True
