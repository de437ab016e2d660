"""The crontab line of docs/commands/run.md, as it is written there, run in cron's environment for three
nights: two with new URLs, one with none. Only its two placeholder paths are replaced."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from lenscap.run.recipe import SHIPPED
from lenscap.testing.fake_openai import FakeOpenAI, FakeSettings

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "commands" / "run.md"
MARK = "<!-- the crontab line: tests/test_cron.py runs this block as it is, in cron's environment -->"
PROJECT, VENV = "/data/refresh", "/opt/lenscap/.venv"  # the line's placeholders
KEY = "sk-cron-LEAKCHECK-0123456789"


def documented_line() -> str:
    """The one line of the fenced block after MARK."""
    found = re.search(re.escape(MARK) + r"\n```\n(.*?)\n```", PAGE.read_text(), re.S)
    assert found, f"{PAGE} has no crontab block after {MARK}"
    assert "\n" not in found.group(1)
    return found.group(1)


def installed_lenscap(venv: Path) -> Path:
    """What ``pip install`` puts in ``VENV/bin/lenscap``: a script that runs ``lenscap.cli:main`` with the
    venv's Python; here the checkout under test stands for the installed package (for its subprocesses too)."""
    script = venv / "bin" / "lenscap"
    script.parent.mkdir(parents=True)
    script.write_text(
        f"#!{sys.executable}\nimport os, sys\nsys.path.insert(0, {str(ROOT)!r})\nos.environ['PYTHONPATH'] = {str(ROOT)!r}\n"
        "from lenscap.cli import main\nsys.exit(main())\n"
    )
    script.chmod(0o755)
    return script


def write_urls(path: Path, server, paths: list[str]) -> None:
    path.write_text("".join(f"{server.url(p)}\n" for p in paths))


def own_refresh_recipe(project: Path, fake: FakeOpenAI) -> None:
    """The shipped refresh recipe, copied as the docs say and edited for this test's servers: its images are
    on loopback (which a download refuses unless allowed), its captioner is the fake OpenAI server."""
    text = (SHIPPED / "refresh.toml").read_text()
    text = text.replace('run = "download"\n', 'run = "download"\nallow_private_network = true\nthreads = 4\n')
    text = text.replace('run = "caption"\n', f'run = "caption"\nbase_url = ["{fake.base_url}"]\n')
    (project / "refresh.toml").write_text(text)


def test_the_documented_crontab_line_runs_night_after_night(tmp_path, image_server):
    line = documented_line()
    minute, hour, *_, command = line.split(None, 5)
    assert (minute, hour) == ("17", "3")
    project, home, venv = tmp_path / "project", tmp_path / "home", tmp_path / "venv"
    command = command.replace(PROJECT, str(project)).replace(VENV, str(venv))
    assert "/data/" not in command and "/opt/" not in command, command
    installed_lenscap(venv)
    project.mkdir()
    key_file = home / ".config" / "lenscap" / "openai-key"
    key_file.parent.mkdir(parents=True)
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    urls = project / "urls.txt"
    log = project / "refresh.log"

    def night() -> str:
        """One firing: cron's environment, the line run by sh; the log's last line."""
        r = subprocess.run(
            ["/usr/bin/env", "-i", f"HOME={home}", "PATH=/usr/bin:/bin", "sh", "-c", command],
            capture_output=True,
            text=True,
            timeout=150,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout == r.stderr == ""  # cron mails what a run prints: nothing on a night that went well
        return log.read_text().splitlines()[-1]

    released = re.escape(str(project / "refresh" / "releases"))
    with FakeOpenAI(FakeSettings(api_key=KEY)) as fake:  # a key from anywhere but the file is refused
        own_refresh_recipe(project, fake)  # ./refresh.toml: the shipped recipe would refuse loopback images
        write_urls(urls, image_server, [f"/ok/{i}.jpg" for i in range(4)])
        first = night()
        assert re.search(rf" lenscap: run: exit 0 \(ok\); release {released}/00000 written: 4 new samples; ", first), first
        # the night's work is in ./refresh/, the directory the recipe's name also names
        assert (project / "refresh").is_dir() and not (project / "refresh" / "current").exists()
        write_urls(urls, image_server, [f"/ok/{i}.jpg" for i in range(7)])
        second = night()
        assert re.search(rf" lenscap: run: exit 0 \(ok\); release {released}/00001 written: 3 new samples; ", second), second
        assert sorted(fake.stats()["image_successes"].values()) == [1] * 7  # each image captioned once in two nights
        third = night()
    assert re.search(r" lenscap: run: exit 0 \(ok\); no new URLs: nothing to release; \d", third), third
    assert sorted(p.name for p in (project / "refresh" / "releases").iterdir()) == ["00000", "00001"]
    assert (home / ".cache" / "lenscap" / "captions.sqlite").exists()  # the response cache, where the docs say
    for f in [*project.rglob("*"), *home.rglob("*")]:
        if f.is_file() and f != key_file:
            assert KEY.encode() not in f.read_bytes(), f"the API key leaked into {f}"
