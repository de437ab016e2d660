"""Plugins as an author writes them from docs/plugins.md: the public import path (lenscap.plugin), the
contract the registry checks (a backend's model never empty, an annotator's columns and direction),
option values refused with the value shown, max_tokens as the one name of the output-token limit,
``describe_filters`` (``lenscap filters``), and the documented example packages installed and run
through the library API."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from conftest import run_cli
from PIL import Image
from test_caption import rows

from lenscap.core.errors import MissingDependency, UsageError
from lenscap.demo.datasets import write_image_dataset
from lenscap.demo.pictures import jpeg_bytes

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BUILTIN_FILTERS = ["aesthetic", "blur", "clip", "faces", "nsfw", "ocr", "uniform"]


def plugin_dist(
    root: Path,
    module: str,
    source: str,
    entry_points: dict[str, dict[str, str]],
    dist: str = "lenscap-test-plugin",
    version: str = "1.0",
) -> Path:
    """A package as pip would leave it installed in ``root``: the module and its ``.dist-info`` with
    the entry points. Put ``root`` on sys.path (or PYTHONPATH) and lenscap finds the plugins."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(
        "".join(
            f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in names.items()) + "\n"
            for group, names in entry_points.items()
        )
    )
    return root


# -- the public import path ------------------------------------------------------------------------


def test_lenscap_plugin_exposes_what_a_plugin_needs():
    import lenscap.plugin as plugin
    from lenscap.caption.backends import base as backends_base
    from lenscap.core.record import Sample
    from lenscap.core.registry import Registry  # the registry keeps its path
    from lenscap.filter.annotators import base as filters_base

    assert sorted(plugin.__all__) == sorted(set(plugin.__all__)) and all(hasattr(plugin, n) for n in plugin.__all__)
    for name in (
        "CaptionBackend",
        "CaptionRequest",
        "CaptionResult",
        "Option",
        "generated",
        "OK",
        "ERROR",
        "REFUSED",
        "TRUNCATED",
        "SKIPPED",
        "Annotator",
        "Sample",
        "BackendError",
        "MissingDependency",
        "UsageError",
    ):
        assert name in plugin.__all__, name
    # the same objects as their homes inside lenscap, which keep working
    assert plugin.CaptionBackend is backends_base.CaptionBackend and plugin.Option is backends_base.Option
    assert plugin.Annotator is filters_base.Annotator and plugin.Sample is Sample and Registry is not None
    assert (plugin.OK, plugin.ERROR, plugin.REFUSED, plugin.TRUNCATED, plugin.SKIPPED) == (
        "ok",
        "error",
        "refused",
        "truncated",
        "skipped",
    )
    assert (plugin.BACKENDS_GROUP, plugin.FILTERS_GROUP) == ("lenscap.backends", "lenscap.filters")


def test_the_docstring_examples_run():
    """The minimal backend and annotator in lenscap.plugin's docstring, executed as written."""
    import lenscap.plugin as plugin
    from lenscap.plugin import CaptionRequest, Sample

    blocks = re.findall(r"::\n\n((?:    .*\n|\n)+)", plugin.__doc__)
    assert len(blocks) == 2
    space: dict = {}
    for block in blocks:
        exec(compile(textwrap.dedent(block), "lenscap.plugin docstring", "exec"), space)  # noqa: S102 - our own docs
    shout = space["ShoutBackend"](word="HELLO")
    got = []
    shout.caption_all([CaptionRequest("k", b"", None, "describe")], got.append)
    assert [(r.key, r.status, r.caption) for r in got] == [("k", "ok", "HELLO")] and shout.model == "shout-1"
    assert space["ShoutBackend"].plugin_problems() == []
    bright = space["Brightness"](threshold=100)
    assert bright.plugin_problems() == [] and bright.direction() == "drop above"
    white = bright.annotate(Image.new("RGB", (8, 8), "white"), Sample("0"))
    assert white == {"bright_mean": 255.0} and bright.verdict(white) == "bright_mean 255 > 100"
    assert bright.verdict(bright.annotate(Image.new("RGB", (8, 8), "black"), Sample("1"))) is None


# -- a backend's model -----------------------------------------------------------------------------


def test_a_backend_without_a_model_records_its_name(tmp_path, monkeypatch):
    """Left out, ``model`` is the backend's name: the caption_model column is never empty."""
    plugin_dist(
        tmp_path / "site",
        "plain_backend_mod",
        """
        from lenscap.plugin import OK, CaptionBackend, CaptionResult

        class Plain(CaptionBackend):
            name = "plain"

            def caption_all(self, requests, on_result):
                for r in requests:
                    on_result(CaptionResult(r.key, OK, caption="a picture", cost_usd=0.0))
        """,
        {"lenscap.backends": {"plain": "plain_backend_mod:Plain"}},
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    from lenscap import api

    backend = api.backend("plain")
    assert backend.model == "plain" and backend.identity() == {"backend": "plain", "model": "plain"}
    backend.model = "plain-2"
    assert backend.model == "plain-2" and backend.identity()["model"] == "plain-2"
    src = write_image_dataset(tmp_path / "in", 2).path
    api.caption(src, tmp_path / "out", captioner=api.backend("plain"), prompt="short", no_cache=True)
    got = rows(tmp_path / "out")
    assert {(r["caption"], r["caption_backend"], r["caption_model"]) for r in got.values()} == {("a picture", "plain", "plain")}


def test_the_registry_refuses_a_plugin_that_breaks_the_contract(tmp_path, monkeypatch):
    plugin_dist(
        tmp_path / "site",
        "broken_plugins_mod",
        """
        import pyarrow as pa
        from lenscap.plugin import Annotator, CaptionBackend

        class Nameless(CaptionBackend):
            def caption_all(self, requests, on_result):
                pass

        class EmptyModel(CaptionBackend):
            name = "empty-model"
            model = ""

            def caption_all(self, requests, on_result):
                pass

        class NoScoreColumn(Annotator):
            name = "noscore"
            columns = (pa.field("a", pa.float64()),)
            score = "b"
            keep_above = "yes"

            def annotate(self, image, sample):
                return {}
        """,
        {
            "lenscap.backends": {
                "nameless": "broken_plugins_mod:Nameless",
                "empty-model": "broken_plugins_mod:EmptyModel",
                "missing": "no_such_module_here:Backend",
            },
            "lenscap.filters": {"noscore": "broken_plugins_mod:NoScoreColumn"},
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    from lenscap.caption.backends import backend_class, describe_backends
    from lenscap.filter.annotators import annotator_class

    with pytest.raises(UsageError, match=r"backend 'nameless' \(broken_plugins_mod:Nameless\) cannot be used: sets no name"):
        backend_class("nameless")
    with pytest.raises(UsageError, match="backend 'empty-model' .* sets model to something other than a model name"):
        backend_class("empty-model")
    with pytest.raises(
        UsageError, match=r"backend 'missing' \(no_such_module_here:Backend\) cannot be imported: ModuleNotFoundError"
    ):
        backend_class("missing")
    with pytest.raises(UsageError, match=r"score \('b'\) must name one of its columns; keep_above must be True"):
        annotator_class("noscore")
    listed = {b["name"]: b for b in describe_backends()}
    assert "sets no name" in listed["nameless"]["error"] and listed["nameless"]["source"] == "lenscap-test-plugin 1.0"
    assert listed["openai"]["source"] == "lenscap (built-in)" and "error" not in listed["openai"]


# -- option values ---------------------------------------------------------------------------------


def test_a_bad_option_value_is_shown_as_given():
    from lenscap.plugin import Option

    digits = Option("digits", int, 3, "Digits.")
    with pytest.raises(UsageError) as e:
        digits.parse("two")
    assert str(e.value) == "-O digits=two: digits takes an int, not 'two'"
    assert digits.parse(" 5 ") == 5 and digits.parse(7.0) == 7
    for value, shown in (
        (2.5, "-O digits=2.5: digits takes an int, not 2.5"),
        (True, "-O digits=True: digits takes an int, not True"),
    ):
        with pytest.raises(UsageError, match=re.escape(shown)):
            digits.parse(value)
    with pytest.raises(UsageError, match=re.escape("-O scale=big: scale takes a float, not 'big'")):
        Option("scale", float, 1.0, "").parse("big")
    with pytest.raises(UsageError, match=re.escape("-O upper=perhaps: upper takes true or false, not 'perhaps'")):
        Option("upper", bool, False, "").parse("perhaps")
    with pytest.raises(UsageError, match=re.escape("-O mode=loud: mode must be one of quiet, normal, not 'loud'")):
        Option("mode", str, "normal", "", choices=("quiet", "normal")).parse("loud")
    # an option that `caption` has a flag for is named by its flag
    with pytest.raises(UsageError, match=re.escape("--max-tokens takes an int, not 'lots'")):
        Option("max_tokens", int, 300, "").parse("lots")
    with pytest.raises(UsageError, match=re.escape("-O ocr=maybe: ocr must be one of auto, on, off, not 'maybe'")):
        from lenscap.caption.backends import backend_class

        backend_class("describe").from_options({"ocr": "maybe"})


def test_a_plugin_option_error_on_the_command_line(tmp_path):
    site = plugin_dist(
        tmp_path / "site",
        "digits_backend_mod",
        """
        from lenscap.plugin import OK, CaptionBackend, CaptionResult, Option

        class Digits(CaptionBackend):
            name = "digits"
            options = (Option("digits", int, 3, "How many digits."),)

            def __init__(self, digits=3):
                self.digits = digits

            def caption_all(self, requests, on_result):
                for r in requests:
                    on_result(CaptionResult(r.key, OK, caption="1" * self.digits, cost_usd=0.0))
        """,
        {"lenscap.backends": {"digits": "digits_backend_mod:Digits"}},
    )
    src = write_image_dataset(tmp_path / "in", 1).path
    env = {"PYTHONPATH": str(site), "LENSCAP_CACHE_DIR": str(tmp_path / "cache")}
    r = run_cli("caption", str(src), str(tmp_path / "out"), "--backend", "digits", "-O", "digits=two", env=env)
    assert r.returncode == 2 and "-O digits=two: digits takes an int, not 'two'" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    r = run_cli("caption", str(src), str(tmp_path / "out"), "--backend", "digits", "-O", "digits=5", "--quiet", env=env)
    assert r.returncode == 0, r.stderr
    assert rows(tmp_path / "out")["000000000"]["caption"] == "11111"
    assert rows(tmp_path / "out")["000000000"]["caption_model"] == "digits"


# -- max_tokens, the one name of the output-token limit ----------------------------------------------


def test_local_backends_take_max_tokens_and_the_old_name_for_now(tmp_path):
    from lenscap.caption.backends.base import OptionRenamed
    from lenscap.caption.backends.transformers_local import TransformersBackend
    from lenscap.caption.backends.vllm_local import VllmBackend

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for cls in (TransformersBackend, VllmBackend):
        names = [o.name for o in cls.options]
        assert "max_tokens" in names and "max_new_tokens" not in names
        assert cls.parse_options({"model": str(model_dir), "max_tokens": "7"})["max_tokens"] == 7
        with pytest.warns(OptionRenamed, match=f"backend '{cls.name}': option 'max-new-tokens' is now 'max-tokens'"):
            assert cls.parse_options({"model": str(model_dir), "max_new_tokens": "7"})["max_tokens"] == 7
        with pytest.warns(OptionRenamed), pytest.raises(UsageError, match="disagree; give max-tokens alone"):
            cls.parse_options({"max_new_tokens": "7", "max_tokens": 8})
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the same value under both names is no conflict, only the warning
            with pytest.raises(OptionRenamed):
                cls.parse_options({"max_new_tokens": "7", "max_tokens": 7})
        # from the library: the keyword's old name works, with the warning, and means the same
        backend = cls(model=str(model_dir), max_tokens=9)
        assert backend.max_tokens == 9 and backend.max_new_tokens == 9
        with pytest.warns(OptionRenamed, match="max_new_tokens= is now max_tokens="):
            old = cls(model=str(model_dir), max_new_tokens=9)
        assert old.identity() == backend.identity()
        assert backend.identity()["max_new_tokens"] == 9, "the cache key keeps its name: answers cached before stay valid"
        assert backend.parameters()["max_tokens"] == 9 and "max_new_tokens" not in backend.parameters()
        with pytest.warns(OptionRenamed), pytest.raises(UsageError, match="disagree"):
            cls(model=str(model_dir), max_tokens=5, max_new_tokens=9)
        with pytest.raises(UsageError, match="--max-tokens must be at least 1, not 0"):
            cls(model=str(model_dir), max_tokens=0)


def test_every_output_token_limit_is_called_max_tokens():
    from lenscap.caption.backends import backend_class

    for name in ("openai", "openai-batch", "batch-files", "transformers", "vllm"):
        assert "max_tokens" in {o.name for o in backend_class(name).options}, name


# -- lenscap filters -------------------------------------------------------------------------------


def test_describe_filters_lists_the_builtins(monkeypatch):
    from lenscap.filter.annotators import describe_filters, filters_lines

    found = {f["name"]: f for f in describe_filters()}
    assert sorted(found) == BUILTIN_FILTERS
    assert all(f["source"] == "lenscap (built-in)" and f["default_threshold"] is None for f in found.values())
    blur, uniform = found["blur"], found["uniform"]
    assert (blur["score"], blur["direction"], blur["threshold_flag"], blur["threshold_option"]) == (
        "blur_laplacian_var",
        "drop below",
        "--min-sharpness",
        "--threshold blur=VALUE",
    )
    assert blur["columns"] == [{"name": "blur_laplacian_var", "type": "double"}] and blur["available"] and blur["extra"] is None
    assert (uniform["direction"], uniform["threshold_flag"]) == ("drop above", "--max-uniformity")
    assert (found["ocr"]["extra"], found["ocr"]["needs"]) == ("ocr", "pip install 'lenscap-datasets[ocr]'")
    assert (found["nsfw"]["extra"], found["clip"]["extra"]) == ("nsfw", "local")
    flags = {f["name"]: f["threshold_flag"] for f in found.values()}
    assert flags == {
        "blur": "--min-sharpness",
        "uniform": "--max-uniformity",
        "ocr": "--max-text-area",
        "faces": "--max-faces",
        "nsfw": "--max-nsfw",
        "clip": "--min-clip-score",
        "aesthetic": "--min-aesthetic",
    }
    # an extra that is not installed: listed, not available, and why
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nudenet" else real(name, *a))
    nsfw = next(f for f in describe_filters() if f["name"] == "nsfw")
    assert not nsfw["available"] and "pip install 'lenscap-datasets[nsfw]'" in nsfw["missing"]
    text = "\n".join(filters_lines([nsfw, blur]))
    assert "nsfw  (lenscap (built-in); needs the nsfw extra; not available here: " in text
    assert "--min-sharpness VALUE or --threshold blur=VALUE: drop images whose Laplacian variance is below this" in text
    assert "score blur_laplacian_var (drop below the threshold)" in text


def test_describe_filters_lists_a_plugin_registered_by_entry_point(tmp_path, monkeypatch):
    plugin_dist(
        tmp_path / "site",
        "listed_filters_mod",
        '''
        import pyarrow as pa
        from lenscap.plugin import Annotator

        class Warmth(Annotator):
            """Red minus blue, on average."""

            name = "warmth"
            columns = (pa.field("warmth_mean", pa.float64()), pa.field("warmth_note", pa.string()))
            score = "warmth_mean"
            keep_above = True
            default_threshold = 0.0
            extra = "local"

            @classmethod
            def unavailable(cls):
                return "needs a warm day"

            def annotate(self, image, sample):
                return {}

        class Broken(Annotator):
            name = "broken"
            columns = (pa.field("x", pa.float64()),)
            score = "x"
            keep_above = False

            @classmethod
            def unavailable(cls):
                raise RuntimeError("cannot tell")

            def annotate(self, image, sample):
                return {}
        ''',
        {
            "lenscap.filters": {
                "warmth": "listed_filters_mod:Warmth",
                "broken": "listed_filters_mod:Broken",
                "gone": "listed_filters_gone:Gone",
            }
        },
        dist="lenscap-warmth",
        version="0.3",
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    from lenscap.filter.annotators import annotator_class, describe_filters, filters_lines

    found = {f["name"]: f for f in describe_filters()}
    assert sorted(found) == sorted([*BUILTIN_FILTERS, "warmth", "broken", "gone"])
    warmth = found["warmth"]
    assert warmth["source"] == "lenscap-warmth 0.3" and warmth["entry_point"] == "listed_filters_mod:Warmth"
    assert (warmth["summary"], warmth["score"], warmth["direction"], warmth["default_threshold"]) == (
        "Red minus blue, on average.",
        "warmth_mean",
        "drop below",
        0.0,
    )
    assert warmth["threshold_flag"] is None and warmth["threshold_option"] == "--threshold warmth=VALUE"
    assert warmth["threshold_help"] == "drop below the threshold: samples whose warmth_mean is below it are dropped"
    assert (warmth["available"], warmth["missing"]) == (False, "needs a warm day")
    assert found["broken"]["available"] is False and found["broken"]["missing"] == "RuntimeError: cannot tell"
    assert found["gone"]["available"] is False and "cannot be imported: ModuleNotFoundError" in found["gone"]["error"]
    warmth_class = annotator_class("warmth")
    with pytest.raises(MissingDependency, match="needs a warm day"):
        warmth_class()  # said when the job is built, before any work, not from every worker
    monkeypatch.setattr(warmth_class, "unavailable", classmethod(lambda cls: None))
    assert warmth_class().threshold == 0.0, "the default threshold applies when none is given"
    assert warmth_class(2.5).threshold == 2.5
    lines = filters_lines([found["warmth"], found["gone"]])
    assert lines[0] == "warmth  (lenscap-warmth 0.3; needs the local extra; not available here: needs a warm day)"
    assert lines[1] == "    Red minus blue, on average."
    assert lines[3] == (
        "    --threshold warmth=VALUE: drop below the threshold: samples whose warmth_mean is below it are dropped [default 0]"
    )
    assert lines[4].startswith("gone  (lenscap-warmth 0.3)  cannot be loaded: UsageError: ")
    json.dumps(describe_filters())  # --json can print it


def test_lenscap_filters_on_the_command_line(tmp_path):
    r = run_cli("filters", "--json")
    if r.returncode != 0 and "No such command" in r.stderr:
        pytest.skip("the filters command is not in this checkout's CLI yet")
    assert r.returncode == 0, r.stderr
    found = {f["name"]: f for f in json.loads(r.stdout)["filters"]}
    assert sorted(found) == BUILTIN_FILTERS
    text = run_cli("filters").stdout
    assert "blur  (lenscap (built-in))" in text and "--min-sharpness VALUE or --threshold blur=VALUE" in text


# -- the documented examples -----------------------------------------------------------------------

EXAMPLE_FILES = [
    "lenscap-echo-backend/pyproject.toml",
    "lenscap-echo-backend/lenscap_echo/__init__.py",
    "lenscap-redness-filter/pyproject.toml",
    "lenscap-redness-filter/lenscap_redness/__init__.py",
]


def test_the_docs_show_the_examples_as_they_are():
    """docs/plugins.md quotes the example packages whole: what it shows is what the tests run."""
    page = (ROOT / "docs" / "plugins.md").read_text()
    blocks = re.findall(r"```(?:python|toml)\n(.*?)```", page, re.DOTALL)
    for name in EXAMPLE_FILES:
        assert (EXAMPLES / name).read_text() in blocks, f"docs/plugins.md does not quote examples/{name} as it is"
    for name in ("lenscap-echo-backend", "lenscap-redness-filter"):
        assert "from lenscap.plugin import" in next((EXAMPLES / name).glob("*/__init__.py")).read_text()
    assert "lenscap.plugin" in page and "lenscap filters" in page and "lenscap backends" in page
    for target in re.findall(r"\]\(([^)]+)\)", page):  # links: pages of the docs site, or absolute URLs
        assert target.startswith("https://") or (ROOT / "docs" / target.split("#")[0]).is_file(), target


@pytest.fixture(scope="module")
def examples_site(tmp_path_factory) -> Path:
    """Both example packages, installed as a user installs them."""
    target = tmp_path_factory.mktemp("examples-site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(EXAMPLES / "lenscap-echo-backend"),
            str(EXAMPLES / "lenscap-redness-filter"),
        ],
        check=True,
        capture_output=True,
    )
    return target


def test_the_example_backend_captions_through_the_library(tmp_path, monkeypatch, examples_site):
    monkeypatch.syspath_prepend(str(examples_site))
    from lenscap import api
    from lenscap.caption.backends import describe_backends

    listed = {b["name"]: b for b in describe_backends()}
    assert listed["echo"]["source"] == "lenscap-echo-backend 0.1.0" and [o["name"] for o in listed["echo"]["options"]] == [
        "prefix",
        "upper",
    ]
    src = write_image_dataset(tmp_path / "in", 3, failed=lambda i: i == 2).path
    echo = api.backend("echo", prefix="Echo: ", upper="yes")
    result = api.caption(src, tmp_path / "out", captioner=echo, prompt="short", no_cache=True)
    assert result.counts["caption_status"] == {"ok": 2, "skipped": 1}
    got = rows(tmp_path / "out")
    assert got["000000000"]["caption"] == "ECHO: 320X240 IMAGE; ASKED: DESCRIBE THIS IMAGE IN"
    assert (got["000000000"]["caption_backend"], got["000000000"]["caption_model"]) == ("echo", "echo-1")
    with pytest.raises(UsageError, match=re.escape("-O upper=perhaps: upper takes true or false, not 'perhaps'")):
        api.backend("echo", upper="perhaps")


def test_the_example_annotator_filters_through_the_library(tmp_path, monkeypatch, examples_site):
    monkeypatch.syspath_prepend(str(examples_site))
    from lenscap import api
    from lenscap.filter.annotators import describe_filters

    redness = next(f for f in describe_filters() if f["name"] == "redness")
    assert (redness["source"], redness["direction"], redness["threshold_option"], redness["available"]) == (
        "lenscap-redness-filter 0.1.0",
        "drop above",
        "--threshold redness=VALUE",
        True,
    )
    colours = [(220, 20, 20), (20, 20, 220), (200, 190, 180)]
    src = write_image_dataset(tmp_path / "in", 3, image=lambda i: jpeg_bytes(Image.new("RGB", (100, 100), colours[i]))).path
    result = api.filter(src, tmp_path / "out", annotate="redness", threshold=["redness=0.5"])
    assert result.reasons == {"kept": 2, "redness": 1}
    got = rows(tmp_path / "out")
    assert (got["000000000"]["filter_status"], got["000000000"]["filter_reason"], got["000000000"]["filter_detail"]) == (
        "dropped",
        "redness",
        "redness_share 1 > 0.5",
    )
    assert got["000000001"]["filter_status"] == "kept" and got["000000001"]["redness_share"] == 0.0
    scores_only = api.filter(src, tmp_path / "scores", annotate="redness")
    assert scores_only.reasons == {"kept": 3} and rows(tmp_path / "scores")["000000000"]["redness_share"] == 1.0
    # built by the caller (a plugin's arguments of its own), besides what the options name
    from lenscap.core.errors import UsageError
    from lenscap.filter.annotators import annotator_class

    built = api.filter(src, tmp_path / "built", min_side=1, annotators=[annotator_class("redness")(0.5)])
    assert built.reasons == {"kept": 2, "redness": 1}
    with pytest.raises(UsageError, match="redness is both in the options and given built"):
        api.filter(src, tmp_path / "twice", annotate="redness", annotators=[annotator_class("redness")(0.5)])
