"""lenscap run: recipes end to end, resume after SIGKILL, --set, the refresh train, locks, logs, the demo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import run_cli

from lenscap.core.dataset import Dataset

RECIPE = """
input = "{urls}"
work_dir = "{work}"

[[stages]]
run = "download"
allow_private_network = true  # the test server is on loopback
samples_per_shard = 3
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
run = "shard"
samples_per_shard = 2
processes = 1

[[stages]]
run = "report"
sample = 4
"""


def write_urls(path: Path, server, paths: list[str]) -> Path:
    path.write_text("url,caption\n" + "".join(f"{server.url(p)},alt text of {p}\n" for p in paths))
    return path


def write_recipe(tmp_path: Path, urls: Path, work: Path, name: str = "recipe.toml") -> Path:
    recipe = tmp_path / name
    recipe.write_text(RECIPE.format(urls=urls, work=work))
    return recipe


def rows(path: Path) -> dict[str, dict]:
    """Every row but ``image_offset``: two downloads place the same image at different offsets."""
    ds = Dataset(path)
    return {
        r["key"]: {k: v for k, v in r.items() if k != "image_offset"}
        for i in ds.completed_ids()
        for r in ds.read_table(i).to_pylist()
    }


def tars(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.tar"))}


OK_PATHS = [f"/ok/{i}.jpg" for i in range(8)] + ["/redirect", "/html.jpg", "/truncated.jpg", "/nope.jpg"]


def test_recipe_runs_every_stage_and_a_rerun_skips_them(tmp_path, image_server):
    urls = write_urls(tmp_path / "urls.csv", image_server, OK_PATHS)
    recipe = write_recipe(tmp_path, urls, tmp_path / "work")
    r = run_cli("run", str(recipe), "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert [s["stage"] for s in summary["stages"]] == ["download", "filter", "dedup", "shard", "report"]
    assert summary["stages"][0]["summary"]["status"]["success"] == 9
    dedup = summary["stages"][2]["summary"]
    assert dedup["duplicates"] == 1  # /redirect serves /ok/0.jpg's bytes
    shard = summary["stages"][3]["summary"]
    assert shard["samples"] == 8 and shard["shards"] == 4
    assert (tmp_path / "work" / "report.html").exists()
    assert Dataset(tmp_path / "work" / "dedup").read_manifest()["history"][-3:] == [
        {**h, "stage": s}
        for h, s in zip(
            Dataset(tmp_path / "work" / "dedup").read_manifest()["history"][-3:], ["download", "filter", "dedup"], strict=True
        )
    ]
    before = tars(tmp_path / "work" / "shard")
    r = run_cli("run", str(recipe), "--json")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("up to date (skipped)") == 5
    assert tars(tmp_path / "work" / "shard") == before


def test_set_overrides_and_changed_options(tmp_path, image_server):
    urls = write_urls(tmp_path / "urls.csv", image_server, OK_PATHS[:4])
    recipe = write_recipe(tmp_path, urls, tmp_path / "work")
    r = run_cli("run", str(recipe), "--set", "filter.min_side=5000", "--json", "--quiet")
    assert r.returncode == 7, r.stderr  # a filter that keeps nothing stops the run: the output holds 0 samples
    summary = json.loads(r.stdout)
    assert summary["stopped_at"] == "filter" and summary["stages"][1]["summary"]["kept"] == 0
    assert "WARNING: filter left 0 samples (4 dropped: min-side); stopping" in r.stderr
    # the recipe's own min_side differs from the finished stage's: the filter and all after it run again
    r = run_cli("run", str(recipe), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert [s["skipped"] for s in summary["stages"]] == [True, False, False, False, False]
    assert (
        "run: filter: options changed since the last run (--min-side 5000 -> 10): running again; dedup, shard, report "
        "rerun after it" in r.stderr
    )
    assert summary["stages"][1]["summary"]["kept"] == 4 and summary["stages"][3]["summary"]["samples"] == 4
    for bad, message in (
        (["--set", "filter.min_side"], "--set takes STAGE.OPTION=VALUE"),
        (["--set", "nosuch.x=1"], "the recipe has no stage 'nosuch'"),
        (["--set", "filter.bogus=1"], "No such option: --bogus"),
    ):
        r = run_cli("run", str(recipe), "--work-dir", str(tmp_path / "other"), *bad, "--quiet")
        assert r.returncode == 2 and message in r.stderr, (bad, r.stderr)
    r = run_cli("run", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "cannot read recipe" in r.stderr and "demo, lens-recaption, refresh" in r.stderr


def test_a_recipe_name_means_a_file_never_a_directory(tmp_path, monkeypatch):
    """The refresh recipe works in ./refresh/: the next night, ``lenscap run refresh`` must still find the
    recipe. A plain name is NAME.toml here, else the shipped recipe; a path to a directory is one line."""
    from conftest import run_cli_here

    from lenscap.run.recipe import SHIPPED, load_recipe

    monkeypatch.chdir(tmp_path)
    (tmp_path / "refresh").mkdir()
    assert load_recipe("refresh").path == SHIPPED / "refresh.toml"
    (tmp_path / "refresh.toml").write_text(
        (SHIPPED / "refresh.toml").read_text().replace("description = ", "description = 'mine' # ")
    )
    own = load_recipe("refresh")
    assert own.path.resolve() == tmp_path / "refresh.toml" and own.description == "mine"
    assert own.work_dir == tmp_path / "refresh"
    assert load_recipe(str(SHIPPED / "refresh.toml")).description != "mine"  # a path is that file
    (tmp_path / "data").mkdir()
    for name, message in (
        ("refresh/", "recipe refresh/ is a directory, not a recipe file"),
        (str(tmp_path / "data"), f"recipe {tmp_path / 'data'} is a directory, not a recipe file"),
        ("data", "recipe data: no data.toml here and no shipped recipe of that name (./data is a directory, not a recipe;"),
    ):
        code, out, err = run_cli_here("run", name, "--quiet")
        assert code == 2 and err.startswith(f"lenscap: error: {message}") and err.count("\n") == 1, err


def test_sigkill_then_rerun_matches_an_uninterrupted_run(tmp_path, image_server):
    urls = write_urls(tmp_path / "urls.csv", image_server, OK_PATHS)
    clean = write_recipe(tmp_path, urls, tmp_path / "clean", "clean.toml")
    assert run_cli("run", str(clean), "--quiet").returncode == 0
    recipe = write_recipe(tmp_path, urls, tmp_path / "work")
    for wait_for in ("02-filter.json", "04-shard.json"):
        proc = subprocess.Popen([sys.executable, "-m", "lenscap.cli", "run", str(recipe), "--quiet"], start_new_session=True)
        marker = tmp_path / "work" / ".lenscap-run" / wait_for
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and not marker.exists():
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    r = run_cli("run", str(recipe), "--quiet")
    assert r.returncode == 0, r.stderr
    assert rows(tmp_path / "work" / "dedup") == {k: v for k, v in rows(tmp_path / "clean" / "dedup").items()}
    assert tars(tmp_path / "work" / "shard") == tars(tmp_path / "clean" / "shard")


def test_refresh_twice_adds_only_new_images(tmp_path, image_server):
    work = tmp_path / "refresh"
    urls = tmp_path / "urls.csv"
    common = [
        "--input",
        str(urls),
        "--work-dir",
        str(work),
        "--set",
        "caption.backend=describe",
        "--set",
        "caption.model=",
        "--set",
        "caption.max_cost=",
        "--set",
        "download.threads=4",
        "--set",
        "download.allow_private_network=true",
        "--json",
        "--quiet",
    ]
    write_urls(urls, image_server, OK_PATHS[:4])
    r = run_cli("run", "refresh", *common, env={"LENSCAP_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    assert first["release"] == str(work / "releases" / "00000") and not (work / "current").exists()
    assert first["stages"][0]["summary"]["new"] == 4
    # the list grows: four new images, and a new URL whose image is already released (/redirect -> /ok/0.jpg)
    write_urls(urls, image_server, OK_PATHS[:8] + ["/redirect"])
    r = run_cli("run", "refresh", *common, env={"LENSCAP_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    second = json.loads(r.stdout)
    assert second["release"] == str(work / "releases" / "00001")
    assert second["stages"][0]["summary"] | {"urls": None, "releases": None} == {
        "urls": None,
        "releases": None,
        "input": 9,
        "new": 5,
        "in_earlier_releases": 4,
    }
    release = rows(work / "releases" / "00001")
    urls_in = {r["url"].rsplit("/", 2)[-2] + "/" + r["url"].rsplit("/", 1)[-1] for r in release.values()}
    assert urls_in == {
        "ok/4.jpg",
        "ok/5.jpg",
        "ok/6.jpg",
        "ok/7.jpg",
        f"{image_server.url('/redirect').rsplit('/', 2)[-2]}/redirect",
    }
    dup = next(r for r in release.values() if r["url"].endswith("/redirect"))
    assert dup["dedup_status"] == "duplicate" and dup["dup_in"] == str(work / "releases" / "00000")
    with tarfile.open(next((work / "releases" / "00001").glob("*.tar"))) as tar:
        assert all(not m.name.startswith(dup["key"]) for m in tar)
    # the same list again: nothing new, no release, no error (cron stays quiet)
    r = run_cli("run", "refresh", *common, env={"LENSCAP_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    third = json.loads(r.stdout)
    assert third["release"] is None and third["stages"][0]["summary"]["new"] == 0
    assert sorted(p.name for p in (work / "releases").iterdir()) == ["00000", "00001"] and not (work / "current").exists()


def test_a_second_run_is_locked_out_and_logs_go_to_a_file(tmp_path, image_server):
    urls = write_urls(tmp_path / "urls.csv", image_server, OK_PATHS[:3])
    recipe = write_recipe(tmp_path, urls, tmp_path / "work")
    hold = (
        "import sys, time\nfrom lenscap.core.lock import DirLock\nwith DirLock(sys.argv[1], 'x'):\n"
        "    print('held', flush=True)\n    time.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(tmp_path / "work" / ".lenscap-run" / "lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        r = run_cli("run", str(recipe), "--quiet")
        assert r.returncode == 5 and f"pid {holder.pid}" in r.stderr
    finally:
        holder.kill()
        holder.wait()
    log = tmp_path / "run.log"
    r = run_cli("--log-file", str(log), "run", str(recipe), "--quiet")
    assert r.returncode == 0, r.stderr
    text = log.read_text()
    assert "run: download: lenscap download" in text and "run: report" in text and "shards to do" in text
    assert "taking over the lock" in r.stderr and r.stderr.count("\n") == 1  # --quiet: only that note


@pytest.mark.parametrize("recipe", ["demo", "lens-recaption", "refresh"])
def test_shipped_recipes_give_their_commands_valid_flags(recipe):
    import typer.main

    from lenscap.cli import app
    from lenscap.run.recipe import COMMANDS, command_line, load_recipe

    commands = typer.main.get_command(app).commands
    loaded = load_recipe(recipe)
    assert loaded.input and loaded.stages
    for stage in loaded.stages:
        if stage.run in COMMANDS:  # parse the stage's command line as the command would, without running it
            arguments = [a.name.upper() for a in commands[stage.run].params if type(a).__name__.endswith("Argument")]
            argv = command_line(stage.run, arguments, stage.options, [Path("r0")])
            commands[stage.run].make_context(stage.run, argv[1:])
    with pytest.raises(Exception, match="No such option: --no-such-flag"):  # the check above can fail
        commands["filter"].make_context("filter", ["IN", "OUT", "--no-such-flag", "1"])


def test_a_recipe_is_checked_whole_before_its_first_stage_runs(tmp_path, image_server):
    """A typo in the last stage, a value of the wrong type, stages that are not tables and a stage name
    that is a path: each is exit 2 before anything runs or is written."""
    from conftest import run_cli_here

    urls = write_urls(tmp_path / "urls.csv", image_server, OK_PATHS[:2])
    work = tmp_path / "work"
    good = RECIPE.format(urls=urls, work=work)
    cases = {
        good.replace("sample = 4", "sampel = 4"): "report: No such option: --sampel",
        good.replace("min_side = 10", 'min_side = "big"'): "filter: Invalid value for '--min-side'",
        good.replace("min_side = 10", "min_side = 10\nmax_aspect = -1"): "filter: --max-aspect is a ratio",
        good.replace("min_side = 10", 'where = "width > 0) OR (true"'): "filter: --where must be one SQL expression",
        good.replace("timeout = 3", "timeout = 0"): "download: --timeout must be at least 1 second",
        good.replace("min_side = 10", 'min_side = 10\nannotate = "sparkle"'): "filter: unknown annotator 'sparkle'",
        good.replace("min_side = 10", 'min_side = 10\nthreshold = ["blur"]'): "filter: --threshold takes NAME=NUMBER",
        f'input = "{urls}"\nwork_dir = "{work}"\nstages = "download"\n': "stages must be [[stages]] tables",
        good.replace('run = "filter"', 'run = "filter"\nname = "../../escaped"'): "name must be a plain name",
    }
    for text, message in cases.items():
        recipe = tmp_path / "recipe.toml"
        recipe.write_text(text)
        code, _, err = run_cli_here("run", str(recipe), "--quiet")
        assert code == 2 and message in err and "Traceback" not in err, (message, err)
        assert not work.exists() and not (tmp_path.parent / "escaped").exists()  # nothing ran, nothing was written
