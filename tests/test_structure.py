"""The shape of the code, held by tests (docs/internals.md, "The shape"): options declared once, one job
driver, one dataset type over fsspec, a thin CLI, recipes over the library, no import cycles.

Everything here reads the source with ``ast`` (nothing is imported), except the two checks that need a
running interpreter: what importing the recipe runner pulls in, and a field added to an options class
reaching every way a user gives it."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "lenscap"


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"


@cache
def modules() -> dict[str, Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        out[name] = Module(name, path, ast.parse(path.read_text(), str(path)))
    return out


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """Imports under ``if TYPE_CHECKING:`` run for the type checker only: not an import at run time."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            found.update(id(n) for n in ast.walk(node))
    return found


def _parents(tree: ast.Module) -> dict[int, ast.AST]:
    return {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _in_function(node: ast.AST, parents: dict[int, ast.AST]) -> bool:
    up = parents.get(id(node))
    while up is not None:
        if isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return True
        up = parents.get(id(up))
    return False


def _imported(module: Module, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The lenscap modules an import statement loads (a name imported from a package may be a module)."""
    known = modules()
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            here = module.name.split(".")
            if not module.is_package:
                here.pop()
            here = here[: len(here) - (node.level - 1)]
            base = ".".join([*here, *([node.module] if node.module else [])])
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    out = []
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target:
            out.append(target)
    return out


@cache
def import_graph() -> dict[str, set[str]]:
    """lenscap module -> the lenscap modules it imports at run time, inside functions too."""
    graph: dict[str, set[str]] = {}
    for module in modules().values():
        skip = _type_checking_nodes(module.tree)
        edges = set()
        for node in ast.walk(module.tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skip:
                edges.update(t for t in _imported(module, node) if t != module.name)
        graph[module.name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_counting_imports_inside_functions():
    assert _cycles(import_graph()) == []


def test_imports_inside_functions_are_of_heavy_or_optional_packages_only():
    """An import inside a function hides a dependency (and, of lenscap, a cycle): only heavy or optional
    third-party packages are imported where they are used, each run of such imports saying why in a
    comment; the CLI imports the library when a command runs."""
    heavy = {
        "duckdb",
        "torch",
        "transformers",
        "openai",
        "anthropic",
        "ray",
        "vllm",
        "cv2",
        "rapidocr_onnxruntime",
        "nudenet",
        "rich",
        "faiss",
    }
    heavy |= {"huggingface_hub"}  # transformers' hub client (the local extra): the aesthetic weights by id
    heavy |= {"google", "httpx"}  # google-genai (the gemini backends) and the HTTP client they hand it
    wrong = []
    for module in modules().values():
        parents = _parents(module.tree)
        lines = module.path.read_text().splitlines()
        for node in ast.walk(module.tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or not _in_function(node, parents):
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            where = f"{module.name}:{node.lineno} {ast.unparse(node)}"
            for name in names:
                top = name.split(".")[0]
                if top == "lenscap" and module.name.startswith("lenscap.cli"):
                    continue
                if top not in heavy:
                    wrong.append(where)
            # the comment: on this import, or on the first of the imports just above it
            first = node.lineno - 1
            while first > 0 and lines[first - 1].strip().startswith(("import ", "from ")):
                first -= 1
            if not any("#" in lines[i] for i in range(first - 1, node.end_lineno)):
                wrong.append(f"{where}: no comment says why it is imported here")
    assert wrong == []


def test_only_the_job_driver_hands_tasks_to_an_executor():
    callers = set()
    for module in modules().values():
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "run":
                receiver = ast.unparse(node.func.value)
                if receiver.split(".")[-1].lower().endswith("executor"):
                    callers.add(module.name)
    assert callers == {"lenscap.core.job"}


def test_no_function_is_longer_than_80_lines():
    long = [
        f"{module.name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for module in modules().values()
        for node in ast.walk(module.tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80
    ]
    assert long == []


def test_the_cli_is_thin():
    lines = sum(len(m.path.read_text().splitlines()) for m in modules().values() if m.name.startswith("lenscap.cli"))
    assert lines < 900, f"lenscap/cli/ has {lines} lines: job logic belongs in the library"


def test_one_place_tells_a_local_dataset_from_a_remote_one():
    """``lenscap.core.dataset`` (with its ``commits``, ``storage`` and ``image_source`` parts) is where a
    dataset is local or remote; elsewhere a branch on it is one of these few, each with its reason."""
    allowed = {
        "lenscap.download.command": 2,  # a remote output's claim lives on this machine only: where it is missing
        "lenscap.core.options": 1,  # the one refusal of a remote location where a flag needs a local one
        "lenscap.caption.batch": 1,  # a batch job's SQLite state and files need a local output
    }
    found: Counter[str] = Counter()
    for module in modules().values():
        if module.name in ("lenscap.core.dataset", "lenscap.core.commits", "lenscap.core.storage", "lenscap.core.image_source"):
            continue
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Attribute) and node.attr == "remote" and isinstance(node.ctx, ast.Load):
                parent = _parents(module.tree).get(id(node))
                if not (isinstance(parent, ast.Call) and parent.func is node):  # Ray's f.remote(...) is a call
                    found[module.name] += 1
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "require_local":
                found[module.name] += 1
    assert dict(found) == allowed


def _run(code: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_recipes_run_on_the_library_without_the_cli():
    """A recipe calls ``lenscap.api``: the runner works (and imports) without the CLI or Typer."""
    graph = import_graph()
    reached, todo = set(), ["lenscap.run.pipeline", "lenscap.run.recipe", "lenscap.api"]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(graph.get(name, ()))
    assert not {m for m in reached if m.startswith("lenscap.cli")}
    proc = _run(
        """
        import sys, lenscap.run.pipeline, lenscap.run.recipe, lenscap.api
        print(sorted(m for m in sys.modules if m == "typer" or m.startswith(("typer.", "click", "lenscap.cli"))))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_a_field_added_to_an_options_class_reaches_help_reference_recipes_and_the_api(tmp_path):
    """One line in ``ShardOptions`` and nothing else: the new option is a flag in ``--help`` and the CLI
    reference, a key a recipe may set (and a wrong value refused naming the flag), and a keyword of
    ``lenscap.api.shard`` that arrives in the options object."""
    copy = tmp_path / "src"
    shutil.copytree(PACKAGE, copy / "lenscap", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "docs" / "hooks", copy / "hooks")
    options = copy / "lenscap" / "shard" / "options.py"
    source = options.read_text()
    anchor = "    seed: int = option("
    assert anchor in source
    added = '    row_group_mb: int = option(64, "Parquet row groups of this many MiB (a field added by a test).")\n'
    options.write_text(source.replace(anchor, added + anchor, 1))
    recipe = tmp_path / "r.toml"
    recipe.write_text('input = "urls.txt"\nwork_dir = "w"\n\n[[stages]]\nrun = "shard"\nrow_group_mb = 3\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('input = "urls.txt"\nwork_dir = "w"\n\n[[stages]]\nrun = "shard"\nrow_group_mb = "many"\n')
    proc = _run(
        f"""
        import json, sys
        from typer.testing import CliRunner
        from lenscap.cli import app
        import lenscap.api as api
        from lenscap.core.errors import UsageError
        from lenscap.run.recipe import load_recipe
        sys.path.insert(0, "hooks")
        import cli_reference

        out = {{}}
        help = CliRunner().invoke(app, ["shard", "--help"], env={{"COLUMNS": "200"}})
        out["help"] = "--row-group-mb" in help.output
        page = cli_reference.render()
        section = page[page.index("## `lenscap shard`"):]
        out["reference"] = "--row-group-mb" in section
        out["recipe"] = load_recipe({str(recipe)!r}).stages[0].parsed([]).row_group_mb
        try:
            load_recipe({str(bad)!r}).stages[0].parsed([])
            out["refused"] = None
        except UsageError as e:
            out["refused"] = str(e)
        seen = {{}}
        api.run_shard = lambda src, dst, options, **kw: seen.setdefault("options", options)
        api.shard("in", "out", row_group_mb=5)
        out["api"] = seen["options"].row_group_mb
        print(json.dumps(out))
        """,
        env={"PYTHONPATH": str(copy)},
        cwd=copy,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["help"] and got["reference"]
    assert got["recipe"] == 3 and got["api"] == 5
    assert got["refused"] is not None and ("row_group_mb" in got["refused"] or "--row-group-mb" in got["refused"])
