"""A benchmark that needs a package of an extra (Ray, imagehash, moto) says so in one line before any
work, skips that part and runs the rest: it never crashes minutes in on the import."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

from lenscap.core.install import install_hint

BENCH = Path(__file__).resolve().parent.parent / "bench"
# Packages of lenscap's extras that a benchmark may use (the core's are always there).
OPTIONAL = {
    "ray",
    "imagehash",
    "moto",
    "s3fs",
    "gcsfs",
    "torch",
    "transformers",
    "rapidocr_onnxruntime",
    "nudenet",
    "datasets",
    "faiss",
}


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_a_bench_imports_an_extra_only_after_checking_for_it(script):
    tree = ast.parse((BENCH / script).read_text())
    top = _imports(ast.Module(body=[n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)], type_ignores=[]))
    assert not top & OPTIONAL, f"bench/{script} imports {top & OPTIONAL} before it can say they are missing"
    checked = {
        a.value
        for call in ast.walk(tree)
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "missing"
        for a in call.args[2:]
        if isinstance(a, ast.Constant)
    }
    assert _imports(tree) & OPTIONAL <= checked, f"bench/{script} imports {_imports(tree) & OPTIONAL - checked} unchecked"


def _bench(name: str, monkeypatch, hidden: set[str]):
    """bench/NAME.py as a module, with ``hidden`` packages looking uninstalled to its checks."""
    monkeypatch.syspath_prepend(str(BENCH))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in hidden else find_spec(n, *a))
    spec = importlib.util.spec_from_file_location(f"lenscap_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cluster_ratelimit_without_ray_says_so_and_stops(monkeypatch, capsys):
    bench = _bench("cluster_ratelimit", monkeypatch, {"ray"})
    monkeypatch.setattr(sys, "argv", ["cluster_ratelimit.py"])
    bench.main()
    assert capsys.readouterr().out == f"skipped this benchmark (a local Ray cluster): it needs ray ({install_hint('ray')})\n"


def test_dedup_without_ray_or_imagehash_says_so_first_and_runs_the_search(monkeypatch, capsys):
    bench = _bench("dedup", monkeypatch, {"ray", "imagehash"})
    monkeypatch.setattr(sys, "argv", ["dedup.py", "--images", "2", "--small", "40000", "--large", "60000"])
    bench.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [
        f"skipped 1. hashing against imagehash: it needs imagehash ({install_hint('test')})",
        f"skipped 3. the split search on Ray at 60,000: it needs ray ({install_hint('ray')})",
    ]
    assert any(line.startswith("search 60,000 hashes") for line in lines)  # the part it could run, ran
    assert not any("Ray, local cluster" in line for line in lines)
