"""The CLI's contract with scripts and cron: one JSON object on stdout however a command ends, the same
field names and types across commands, money rounded, --log-file/--quiet/--json after the
subcommand, a log that ends each run with one line, and one vocabulary of flags in --help."""

from __future__ import annotations

import json
import re

import pytest
import typer.main

from lenscap.cli import ALIASES, app, money
from lenscap.core.progress import set_log_file
from tests.conftest import run_cli, run_cli_here

COMMANDS = typer.main.get_command(app).commands  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def no_log_file_after():
    yield
    set_log_file(None)  # in-process runs set it for the whole process


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, image_server):
    """A small dataset through download -> filter -> caption -> dedup -> shard, each command's --json kept."""
    root = tmp_path_factory.mktemp("contract")
    urls = root / "urls.txt"
    urls.write_text("".join(image_server.url(f"/ok/{i}.jpg") + "\n" for i in range(4)) + image_server.url("/missing.jpg") + "\n")
    steps = {
        "download": [
            "download",
            str(urls),
            str(root / "raw"),
            "--samples-per-shard",
            "3",
            "--processes",
            "1",
            "--threads",
            "4",
            "--timeout",
            "5",
        ],
        "filter": ["filter", str(root / "raw"), str(root / "filtered"), "--min-side", "16"],
        "caption": ["caption", str(root / "filtered"), str(root / "captioned"), "--backend", "describe", "--no-cache"],
        "dedup": ["dedup", str(root / "captioned"), str(root / "deduped")],
        "shard": ["shard", str(root / "deduped"), str(root / "export"), "--format", "parquet"],
    }
    out = {}
    for name, argv in steps.items():
        code, stdout, stderr = run_cli_here(*argv, "--json", "--quiet")
        assert code == 0, (name, stderr)
        lines = [line for line in stdout.splitlines() if line.strip()]
        assert len(lines) == 1, (name, stdout)
        out[name] = json.loads(lines[0])
    return root, out


def test_every_summary_has_the_same_core_fields_with_the_same_types(pipeline):
    _, summaries = pipeline
    for name, s in summaries.items():
        assert s["ok"] is True and s["exit_code"] == 0 and s["command"] == name, s
        assert isinstance(s["failed_shards"], dict), (name, s["failed_shards"])
        assert isinstance(s["samples"], int) and isinstance(s["out_dir"], str), name
    assert isinstance(summaries["caption"]["spent_usd"], (int, float))


def test_money_is_rounded_to_a_hundredth_of_a_cent():
    assert money(
        {"spent_usd": 0.05480200000000001, "cost": {"usd": 1.234567}, "n": 0.123456789, "stages": [{"spent_usd": 2.00004999}]}
    ) == {"spent_usd": 0.0548, "cost": {"usd": 1.2346}, "n": 0.123456789, "stages": [{"spent_usd": 2.0}]}


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["filter", "/nonexistent/in", "/tmp/x-out"], 2, "nonexistent"),
        (["filter", "a", "b", "--min-side", "big"], 2, "--min-side"),
        (["caption", "a", "b", "--no-such-flag"], 2, "no-such-flag"),
        (["estimate", "--images", "10", "--model", "no-such-model"], 2, "no-such-model"),
    ],
)
def test_a_failure_with_json_is_one_object_on_stdout(argv, code, message):
    rc, stdout, stderr = run_cli_here(*argv, "--json")
    assert rc == code
    [line] = [line for line in stdout.splitlines() if line.strip()]
    obj = json.loads(line)
    assert obj["ok"] is False and obj["exit_code"] == code and message in obj["error"]
    assert "\n" not in obj["error"] and "Traceback" not in stderr


def test_a_budget_stop_with_json_keeps_its_summary(tmp_path):
    import contextlib
    import io

    from lenscap.cli import fail

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert fail("error: --max-cost reached", 4, True, {"command": "caption", "spent_usd": 0.123456789}) == 4
    obj = json.loads(out.getvalue())
    assert obj == {"ok": False, "exit_code": 4, "command": "caption", "spent_usd": 0.1235, "error": "--max-cost reached"}


def test_log_file_quiet_and_json_work_after_the_subcommand_and_the_log_ends_with_one_line(pipeline, tmp_path):
    root, _ = pipeline
    log = tmp_path / "cron.log"
    res = run_cli("inspect", str(root / "captioned"), "--log-file", str(log), "--quiet", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["ok"] is True and res.stderr == ""
    last = log.read_text().splitlines()[-1]
    assert re.search(r"lenscap: inspect: exit 0 \(ok\); .*\d+ samples in .*captioned; \d+\.\d s$", last), last
    # before the subcommand, as before
    res = run_cli("--log-file", str(log), "filter", str(root / "raw"), str(tmp_path / "f"), "--min-side", "16", "--quiet")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert re.search(r"filter: exit 0 \(ok\); \d+ samples in ", log.read_text().splitlines()[-1])


def test_a_fatal_error_and_a_lock_refusal_reach_the_log(pipeline, tmp_path):
    root, _ = pipeline
    log = tmp_path / "cron.log"
    res = run_cli("filter", str(tmp_path / "missing"), str(tmp_path / "out"), "--log-file", str(log), "--quiet")
    assert res.returncode == 2
    text = log.read_text()
    assert "error:" in text and text.splitlines()[-1].endswith(tuple("0123456789s")) and "filter: exit 2 (usage error)" in text

    from lenscap.core.lock import output_lock

    out = tmp_path / "locked"
    with output_lock(out):
        res = run_cli("filter", str(root / "raw"), str(out), "--min-side", "16", "--log-file", str(log), "--overwrite")
    assert res.returncode == 5
    assert "exit 5 (locked by another run)" in log.read_text().splitlines()[-1]
    assert any("lock" in line.lower() for line in log.read_text().splitlines()[-3:])


def test_old_flag_names_still_work_hidden_and_say_the_new_name():
    for old_flag, new_flag in (flags[1:] for flags in ALIASES.values()):
        command = next(c for c in COMMANDS.values() if any(old_flag in p.opts and p.hidden for p in c.params))
        param = next(p for p in command.params if old_flag in p.opts and p.hidden)
        assert param.hidden and any(new_flag in p.opts for p in command.params), old_flag
    rc, stdout, stderr = run_cli_here("estimate", "--images", "1000", "--image-size", "800x600", "--json")
    assert rc == 0 and "--image-size is now --source-size" in stderr
    assert "--image-size" not in _help("estimate")
    # the old names that were flags of the old CLI, every one still there
    old = {"--min-image-size", "--max-aspect-ratio", "--retries", "--max-new-tokens", "--image-size"}
    assert old <= {flags[1] for flags in ALIASES.values()}


def _help(*names: str) -> str:
    from typer.testing import CliRunner

    return CliRunner().invoke(app, [*names, "--help"], terminal_width=200, env={"COLUMNS": "200"}).output


def test_help_shows_defaults_switches_plainly_and_an_example():
    for name, command in COMMANDS.items():
        subcommands = getattr(command, "commands", None)
        for path in [[name, sub] for sub in subcommands] if subcommands else [[name]]:
            text = _help(*path)
            assert "Example: lenscap " in text, path
            assert text.count("<bool>") <= 1, path  # Typer's own --help only
    text = _help("download")
    assert "--upscale" in text and "--no-upscale" in text and "[default: off]" in text
    for name in ("download", "filter", "dedup", "shard", "audit"):
        assert re.search(r"--processes .*\n?.*all cores", _help(name), re.S), name
    caption = _help("caption")
    assert "Model options" in caption and "Batch options" in caption and "Local model options" in caption
    assert "[default: gpt-4.1-mini" in caption and "[default: low]" in caption
    assert caption.count("see lenscap backends") == 0


def test_the_same_idea_has_the_same_flag_in_every_command():
    def options(name):
        return {o for p in COMMANDS[name].params if not p.hidden for o in p.opts}

    for flag in ("--min-side", "--max-aspect"):
        assert flag in options("download") and flag in options("filter")
    assert "--max-retries" in options("download") and "--max-retries" in options("caption")
    assert "--max-new-tokens" not in options("caption") and "--max-tokens" in options("caption")
    for name in COMMANDS:
        if name != "batch":
            assert {"--json", "--quiet", "--log-file"} <= options(name), name
    estimate_model = next(p for p in COMMANDS["estimate"].params if p.name == "model").default
    from lenscap.caption.backends import backend_class

    assert estimate_model == next(o.default for o in backend_class("openai").options if o.name == "model")


def test_python_dash_m_lenscap_runs_the_cli():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "lenscap", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("lenscap ")
