"""The docs: the MkDocs site builds with --strict, the README stays short, the generated CLI reference
lists every command and caption option with its default, and every lenscap command line in the README
(and in the docs' command pages) names a real command and only options it has."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
HOOK = ROOT / "docs" / "hooks" / "cli_reference.py"


def _hook():
    spec = importlib.util.spec_from_file_location("lenscap_docs_cli_reference", HOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _app():
    import typer

    import lenscap.cli

    return typer.main.get_command(lenscap.cli.app)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs", reason="mkdocs-material is in the test extras")
    pytest.importorskip("material", reason="mkdocs-material is in the test extras")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out), "-f", str(ROOT / "mkdocs.yml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_site_builds_strict(site):
    page = site / "reference" / "cli" / "index.html"
    assert page.exists()
    html = page.read_text()
    assert "lenscap caption" in html and "--max-cost" in html
    for name in ("concepts", "json", "exit-codes", "plugins", "internals", "dependencies", "benchmarks", "limits"):
        assert (site / name / "index.html").exists(), name


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; the limit is 300 (move material into docs/)"
    text = README.read_text()
    assert "python3 dev.py demo" in text and "python3 dev.py test" in text and "python3 dev.py docs" in text


@pytest.mark.parametrize(
    "argv, runs",
    [
        (["docs"], ["-m", "mkdocs", "serve"]),
        (["docs", "--build"], ["-m", "mkdocs", "build", "--strict"]),
        (["docs", "--build", "-d", "out"], ["-m", "mkdocs", "build", "--strict", "-d", "out"]),
        (["docs", "-a", "0.0.0.0:8001"], ["-m", "mkdocs", "serve", "-a", "0.0.0.0:8001"]),
    ],
)
def test_dev_docs_builds_or_serves_the_site_and_runs_no_test(monkeypatch, argv, runs):
    spec = importlib.util.spec_from_file_location("lenscap_dev_script", ROOT / "dev.py")
    dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev)
    installed, called = [], []
    monkeypatch.setattr(dev, "ensure_venv", installed.append)
    monkeypatch.setattr(dev.subprocess, "call", lambda cmd, cwd: called.append(cmd) or 0)
    assert dev.main(argv) == 0
    assert installed == ["docs"] and called == [[str(dev.PYTHON), *runs]]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("mkdocs-material") for r in extras["docs"])  # the extra dev.py docs installs builds the site


def _switch(param) -> bool:
    return bool(getattr(param, "is_flag", False)) and bool(getattr(param, "is_bool_flag", True))


def _expected_default(param) -> str:
    """The default as the reference must show it, from the live app (independent of the hook's code)."""
    if isinstance(getattr(param, "show_default", None), str):
        return param.show_default
    if _switch(param):
        if param.secondary_opts:
            return param.opts[-1] if param.default else param.secondary_opts[-1]
        return "on" if param.default else "off"
    if param.default in (None, (), []):
        return ""
    if isinstance(param.default, float) and param.default == float("inf"):
        return "no limit"
    return str(param.default)


def _row(markdown: str, section: str, flag: str) -> str:
    body = markdown.split(f"## `lenscap {section}`\n", 1)[1].split("\n## ", 1)[0]
    rows = [
        line
        for line in body.splitlines()
        if line.startswith("| `") and re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", line.split("|")[1])
    ]
    assert rows, f"{flag} of lenscap {section} is not in the CLI reference"
    return rows[0]


def test_cli_reference_lists_every_command_and_caption_default():
    markdown = _hook().render()
    app = _app()

    def walk(group, path):
        for name, command in group.commands.items():
            if getattr(command, "hidden", False):
                continue
            yield [*path, name], command
            if hasattr(command, "commands"):
                yield from walk(command, [*path, name])

    commands = list(walk(app, []))
    assert len(commands) >= 14
    for path, command in commands:
        name = " ".join(path)
        assert f"## `lenscap {name}`" in markdown, f"lenscap {name} is not in the CLI reference"
        section = markdown.split(f"## `lenscap {name}`\n", 1)[1].split("\n## ", 1)[0]
        shown = {o for p in command.params if not getattr(p, "hidden", False) for o in p.opts}
        for param in command.params:
            if getattr(param, "hidden", False):
                # Hidden aliases never appear as a row of their own.
                for opt in param.opts:
                    if opt.startswith("--") and opt not in shown:
                        assert not re.search(rf"^\| `{re.escape(opt)}[` ,/]", section, re.M), f"hidden {opt} of {name} is listed"
                continue
            if getattr(param, "param_type_name", "") == "argument":
                continue
            _row(markdown, name, param.opts[-1])

    caption = app.commands["caption"]
    visible = [p for p in caption.params if not getattr(p, "hidden", False) and getattr(p, "param_type_name", "") != "argument"]
    assert len(visible) > 20
    for param in visible:
        row = _row(markdown, "caption", param.opts[-1])
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
        default = _expected_default(param)
        if default:
            assert f"`{default}`" in cells[2], f"caption {param.opts[-1]}: default {default!r} missing from {row}"
        else:
            assert cells[2] == "", f"caption {param.opts[-1]} has no default but the reference shows {cells[2]!r}"
        for secondary in param.secondary_opts:
            assert secondary in cells[0]

    # caption's backend options default per backend: the openai backend's, from the backend itself.
    from lenscap.caption.backends import describe_backends

    openai = next(b for b in describe_backends() if b["name"] == "openai")
    backend_table = markdown.split("**Backend option defaults.**", 1)[1].split("\n## ", 1)[0]
    header = next(line for line in backend_table.splitlines() if line.startswith("| option |"))
    column = [c.strip() for c in header.split("|")[1:-1]].index("`openai`")
    for option in openai["options"]:
        if option["default"] in (None, []):
            continue
        row = next(line for line in backend_table.splitlines() if line.startswith(f"| `{option['flag']}` |"))
        assert f"`{option['default']}`" == [c.strip() for c in row.split("|")[1:-1]][column], row


def _command_lines(text: str) -> list[str]:
    """Every ``lenscap ...`` command line inside the fenced code blocks of a Markdown text."""
    lines: list[str] = []
    for lang, block in re.findall(r"^ *```([^\n]*)\n(.*?)^ *```", text, re.S | re.M):
        if lang.strip() not in ("", "sh", "bash", "shell", "console"):
            continue
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("#") or not re.search(r"(^|[\s|;&])(\.venv/bin/)?lenscap\s", line):
                continue
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:
                continue
            if any(t in ("lenscap", ".venv/bin/lenscap") for t in tokens):
                lines.append(line)
    return lines


def _check_command_line(line: str, app) -> None:
    tokens = shlex.split(line, comments=True)
    start = next(i for i, t in enumerate(tokens) if t in ("lenscap", ".venv/bin/lenscap"))
    args: list[str] = []
    for token in tokens[start + 1 :]:
        if token in ("|", "&&", ";", ">", "2>", "||"):
            break
        args.append(token)
    # Options before the command are the app's own (lenscap --log-file F run ...).
    root_opts = {o: p for p in app.params for o in p.opts}
    while args and args[0] in root_opts:
        param = root_opts[args.pop(0)]
        if not getattr(param, "is_flag", False):
            args.pop(0)
    assert args, f"no command in: {line}"
    command, path = app, []
    while hasattr(command, "commands"):
        name = args.pop(0)
        assert name in command.commands, f"lenscap {' '.join(path + [name])} is not a command: {line}"
        command, path = command.commands[name], [*path, name]
    visible = {o for p in command.params if not getattr(p, "hidden", False) for o in (*p.opts, *p.secondary_opts)}
    visible |= {"--help"}
    for arg in args:
        if arg.startswith("-") and arg != "-" and not re.fullmatch(r"-?[\d.]+", arg):
            flag = arg.split("=", 1)[0]
            assert flag in visible, f"lenscap {' '.join(path)} has no option {flag} (in: {line})"
    if "..." not in args and not any("..." in a for a in args):
        try:
            command.make_context(" ".join(["lenscap", *path]), list(args))
        except Exception as e:  # the fork's UsageError/BadParameter
            if type(e).__name__ not in ("Exit",):
                pytest.fail(f"{line}: {type(e).__name__}: {e}")


def test_readme_command_lines_are_real():
    app = _app()
    lines = _command_lines(README.read_text())
    assert len(lines) >= 8, lines
    joined = "\n".join(lines)
    for stage in ("estimate", "download", "filter", "dedup", "caption", "shard"):
        assert f"lenscap {stage} " in joined
    assert re.search(r"lenscap caption .*--max-cost", joined)
    for line in lines:
        _check_command_line(line, app)


def test_docs_command_lines_name_real_options():
    """The command pages' examples use today's flag names (not the hidden old ones)."""
    app = _app()
    pages = sorted((ROOT / "docs").rglob("*.md"))
    checked = 0
    for page in pages:
        for line in _command_lines(page.read_text()):
            try:
                _check_command_line(line, app)
            except AssertionError as e:
                raise AssertionError(f"{page.relative_to(ROOT)}: {e}") from None
            except pytest.fail.Exception as e:
                raise AssertionError(f"{page.relative_to(ROOT)}: {e}") from None
            checked += 1
    assert checked > 30


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


def _allowed_keywords(api, name: str) -> set[str] | None:
    """The keywords ``lenscap.api.<name>`` takes: its parameters and its options' fields (None: any,
    as a backend's options, which the backend it names checks)."""
    import dataclasses
    import inspect

    target = getattr(api, name)
    if isinstance(target, type):  # an options class
        return {f.name for f in dataclasses.fields(target)}
    params = inspect.signature(target).parameters
    allowed = {n for n, p in params.items() if p.kind is not p.VAR_KEYWORD}
    options = params.get("options")
    cls = getattr(api, str(options.annotation).split(" ")[0], None) if options is not None else None
    if options is not None and options.kind is not options.VAR_KEYWORD and dataclasses.is_dataclass(cls):
        return allowed | {f.name for f in dataclasses.fields(cls)}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return allowed


@pytest.mark.parametrize("page", ["api.md", "plugins.md"])
def test_library_examples_call_real_functions_with_real_options(page):
    """Every ``lc.X(...)`` / ``api.X(...)`` in the docs' Python examples is a function of ``lenscap.api``,
    and each keyword it passes is a parameter of that function or a field of its command's options."""
    import ast

    import lenscap.api as api

    checked = 0
    for block in _python_blocks(ROOT / "docs" / page):
        for node in ast.walk(ast.parse(block)):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if getattr(node.func.value, "id", None) not in ("lc", "api"):
                continue
            name = node.func.attr
            assert hasattr(api, name), f"{page}: lenscap.api has no {name}"
            allowed = _allowed_keywords(api, name)
            for kw in node.keywords:
                assert allowed is None or kw.arg in allowed, f"{page}: {name}(... {kw.arg}=...)"
            checked += 1
    assert checked >= 2
