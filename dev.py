#!/usr/bin/env python3
"""Set up and run lenscap with nothing but Python 3.11+.

    python3 dev.py demo            create .venv, install lenscap, run the offline demo pipeline
    python3 dev.py test            create .venv, install lenscap with its test extras, run the whole test suite
    python3 dev.py docs            create .venv, install lenscap with its docs extra, serve the docs site
                                   at http://127.0.0.1:8000, rebuilt as you edit (no tests run)
    python3 dev.py docs --build    the same, but build the site into site/ once (--strict: a broken link fails)

Arguments after the command go to it (pytest's, or mkdocs serve's and build's). Installs only when
pyproject.toml changed since the last install of the same extras, so reruns start at once.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
# What the whole test suite needs, so nothing is skipped in CI.
TEST_EXTRAS = "test,local,semantic,ocr,ray,gemini,anthropic"
DOCS_EXTRAS = "docs"
# pytest-xdist workers for `test`: most tests wait on loopback servers and subprocesses, so three share
# two cores well (the whole suite: 16 min against 25 min serial on this project's 2-core machine).
# Given -n yourself (-n 0: serial), yours is used.
TEST_WORKERS = 3


def ensure_venv(extras: str) -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - this script is run by whatever python3 there is
        sys.exit(f"lenscap needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    if not PYTHON.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    spec = f".[{extras}]" if extras else "."
    # One stamp per set of extras: `docs` after `test` (whose extras hold the docs') installs nothing new.
    stamp = VENV / f".lenscap-install-{extras.replace(',', '-') or 'core'}"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + spec.encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return
    import tomllib  # here, after the version check: Python 3.10 has none

    name = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]
    print(f"installing {name}{'[' + extras + ']' if extras else ''} (this checkout) into {VENV}", flush=True)
    subprocess.run([str(PYTHON), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True, cwd=ROOT)
    # A .venv made before the distribution was renamed holds this checkout under the old name, lenscap
    # (the registry's lenscap is another project): taken out, so one distribution provides lenscap.
    if list(VENV.glob("lib*/*/site-packages/lenscap-[0-9]*.dist-info")) or list(
        VENV.glob("Lib/site-packages/lenscap-[0-9]*.dist-info")
    ):
        subprocess.run([str(PYTHON), "-m", "pip", "uninstall", "--quiet", "--yes", "lenscap"], check=True, cwd=ROOT)
    subprocess.run([str(PYTHON), "-m", "pip", "install", "--quiet", "-e", spec], check=True, cwd=ROOT)
    stamp.write_text(want)


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "help"
    if command == "demo":
        ensure_venv("")
        return subprocess.call([str(BIN / "lenscap"), "demo", *argv[1:]], cwd=ROOT)
    if command == "test":
        ensure_venv(TEST_EXTRAS)
        given = any(a.startswith(("-n", "--numprocesses")) for a in argv[1:])
        workers = [] if given else ["-n", str(TEST_WORKERS), "--dist", "loadgroup"]
        return subprocess.call([str(PYTHON), "-m", "pytest", *workers, *argv[1:]], cwd=ROOT)
    if command == "docs":
        ensure_venv(DOCS_EXTRAS)
        rest = argv[1:]
        action = ["build", "--strict"] if "--build" in rest else ["serve"]
        return subprocess.call([str(PYTHON), "-m", "mkdocs", *action, *(a for a in rest if a != "--build")], cwd=ROOT)
    print(__doc__)
    return 0 if command in ("help", "-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
