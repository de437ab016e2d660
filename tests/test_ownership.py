"""Images written once, and a stage that owns its output.

One pipeline run (download -> filter -> caption -> dedup -> shard on 120 images) is shared by the
module: the stage directories hold rows only, and the export equals the one a --copy-images chain
writes. Then the hostile cases: another input or other settings into an output, output = input,
a directory lenscap did not make, two commands on one output, an input with an incomplete shard,
and an image source that went missing or was replaced.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli, run_cli_here

from lenscap.core.dataset import Dataset
from lenscap.core.lock import output_lock
from lenscap.demo.datasets import write_image_dataset


def ok(*args: str) -> str:
    code, out, err = run_cli_here(*args, *([] if args[0] == "inspect" else ["--quiet"]))
    assert code == 0, err
    return out


def refused(*args: str, code: int = 2) -> str:
    got, _, err = run_cli_here(*args, "--quiet")
    assert got == code, err
    assert "Traceback" not in err
    return err


def tree_bytes(path: Path, suffix: str = "") -> int:
    return sum(p.stat().st_size for p in path.rglob(f"*{suffix}") if p.is_file())


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    work = tmp_path_factory.mktemp("pipeline")
    ok(
        "run",
        "demo",
        "--input",
        "@demo:120",
        "--work-dir",
        str(work),
        "--set",
        "dedup.processes=1",
        "--set",
        "caption.no_cache=true",
        # What is tested is where images are kept, not the captions: reading text (OCR, about a second
        # an image here) would be most of the module's time.
        "--set",
        'caption.option=["ocr=off"]',
    )
    return work


def test_stage_directories_hold_rows_only_and_the_export_equals_copy_images(pipeline, tmp_path):
    download = tree_bytes(pipeline / "download")
    for stage in ("filter", "dedup", "caption"):
        assert not list((pipeline / stage).glob("*.tar")), f"{stage} wrote image tars"
        assert tree_bytes(pipeline / stage) < 0.05 * download, stage
        manifest = json.loads((pipeline / stage / "lenscap.json").read_text())
        assert manifest["images"]["location"] == "../download"
    info = json.loads(ok("inspect", str(pipeline / "caption"), "--json"))
    assert info["images"] == {"held": False, "location": str(pipeline / "download"), "problem": None}

    # The same stages with --copy-images from the same download: self-contained, and the same export.
    copy = tmp_path / "copy"
    ok(
        "filter",
        str(pipeline / "download"),
        str(copy / "filter"),
        "--min-side",
        "256",
        "--annotate",
        "blur,uniform",
        "--max-uniformity",
        "0.95",
        "--copy-images",
    )
    # in the demo recipe's order: dedup before caption
    ok("dedup", str(copy / "filter"), str(copy / "dedup"), "--processes", "1", "--copy-images")
    ok(
        "caption",
        str(copy / "dedup"),
        str(copy / "caption"),
        "--backend",
        "describe",
        "-O",
        "ocr=off",
        "--copy-images",
        "--no-cache",
    )
    ok("shard", str(copy / "caption"), str(copy / "shard"), "--format", "webdataset", "--target-size", "2MB", "--processes", "1")
    assert json.loads((copy / "caption" / "lenscap.json").read_text())["images"] is None
    assert sorted(p.name for p in (copy / "caption").glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    exported = sorted((pipeline / "shard").glob("*.tar"))
    assert exported and [p.name for p in exported] == sorted(p.name for p in (copy / "shard").glob("*.tar"))
    for tar in exported:
        assert tar.read_bytes() == (copy / "shard" / tar.name).read_bytes()
    kept = sum(
        1
        for shard in Dataset.open(pipeline / "caption").completed_ids()
        for s in Dataset.open(pipeline / "caption").iter_samples(shard)
        if s.has_image and s.row["caption_status"] == "ok"
    )
    assert json.loads((pipeline / "shard" / "shards.json").read_text())["samples"] == kept > 50


def test_a_missing_or_replaced_image_source_is_a_one_line_error(pipeline, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(pipeline / "download", work / "download")
    shutil.copytree(pipeline / "filter", work / "filter")
    assert ok("inspect", str(work / "filter"), "--json")
    shutil.rmtree(work / "download")
    err = refused("caption", str(work / "filter"), str(work / "caption"), "--backend", "describe", "--no-cache")
    assert "the images of" in err and "download, which is missing" in err and "--copy-images" in err
    info = json.loads(run_cli_here("inspect", str(work / "filter"), "--json")[1])
    assert info["images"]["held"] is False and "missing" in info["images"]["problem"]

    # Another dataset in its place (its id differs): refused, never read as if it were the same.
    write_image_dataset(work / "download", 10, per_shard=5)
    err = refused("shard", str(work / "filter"), str(work / "shard"))
    assert "was replaced since" in err


def test_another_input_or_other_settings_into_an_output_are_refused(tmp_path):
    a, b = write_image_dataset(tmp_path / "a", 12, per_shard=4), write_image_dataset(tmp_path / "b", 12, per_shard=4)
    out = tmp_path / "out"
    ok("filter", str(a.path), str(out), "--min-side", "100")
    before = {p.name: p.read_bytes() for p in out.glob("0*")}
    err = refused("filter", str(b.path), str(out), "--min-side", "100")
    assert f"input {b.path}" in err or str(b.path) in err
    err = refused("filter", str(a.path), str(out), "--min-side", "10")
    assert "rules.min_side: 100 -> 10" in err
    assert "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.glob("0*")} == before
    assert json.loads((out / "lenscap.json").read_text())["parameters"]["rules"]["min_side"] == 100
    err = refused("caption", str(b.path), str(out), "--backend", "describe", "--no-cache")
    assert "written by filter, not caption" in err
    ok("filter", str(a.path), str(out), "--min-side", "100")  # the same job: resumes (nothing to do)

    ok("filter", str(a.path), str(out), "--min-side", "10", "--overwrite")
    rows = [s.row for i in Dataset.open(out).completed_ids() for s in Dataset.open(out).iter_samples(i)]
    assert len(rows) == 12 and all(r["filter_status"] == "kept" for r in rows)
    assert json.loads((out / "lenscap.json").read_text())["parameters"]["rules"]["min_side"] == 10


def test_output_equal_to_or_inside_the_input_is_refused(tmp_path):
    src = write_image_dataset(tmp_path / "ds", 8, per_shard=4)
    manifest = (src.path / "lenscap.json").read_bytes()
    for args in (("filter",), ("caption", "--backend", "describe", "--no-cache"), ("dedup",), ("shard",)):
        for out in (src.path, src.path / "nested"):
            err = refused(args[0], str(src.path), str(out), *args[1:])
            assert "the output" in err and "the input" in err
    assert (src.path / "lenscap.json").read_bytes() == manifest
    assert not (src.path / "nested").exists()
    assert src.completed_ids() == [0, 1]


def test_a_directory_lenscap_did_not_make_is_refused(tmp_path):
    src = write_image_dataset(tmp_path / "ds", 8, per_shard=4)
    for args in (("filter",), ("caption", "--backend", "describe", "--no-cache"), ("dedup",), ("shard",)):
        mine = tmp_path / f"mine-{args[0]}"
        mine.mkdir()
        (mine / "README.md").write_text("my notes")
        (mine / "00000.tar").write_bytes(b"my archive")
        err = refused(args[0], str(src.path), str(mine), *args[1:])
        assert "not empty" in err and "not written by lenscap" in err
        assert sorted(p.name for p in mine.iterdir()) == ["00000.tar", "README.md"]
        assert (mine / "README.md").read_text() == "my notes"


def test_overwrite_removes_only_what_lenscap_wrote(tmp_path):
    """A person's notes and a dataset they put inside an output are not lenscap's: --overwrite keeps them."""
    src = write_image_dataset(tmp_path / "in", 8, per_shard=4)
    out = tmp_path / "out"
    ok("filter", str(src.path), str(out), "--min-side", "100")
    (out / "notes.txt").write_text("my notes")
    (out / "sub").mkdir()
    (out / "sub" / "z.txt").write_text("z")
    (out / "data").mkdir()  # a folder whose name an export uses, holding the person's file
    (out / "data" / "mine.csv").write_text("a,b")
    mine = write_image_dataset(out / "mydataset", 4, per_shard=4)
    kept = {p.relative_to(out): p.read_bytes() for p in [*out.rglob("*")] if p.is_file() and ".lenscap" not in p.parts}
    kept = {k: v for k, v in kept.items() if k.parts[0] in ("notes.txt", "sub", "data", "mydataset")}
    stats = json.loads((out / "00000_stats.json").read_text())
    (out / "00000_stats.json").write_text(json.dumps({**stats, "old": True}))  # to see that it goes

    ok("filter", str(src.path), str(out), "--min-side", "10", "--overwrite")
    for rel, data in kept.items():
        assert (out / rel).read_bytes() == data, f"--overwrite touched {rel}"
    assert mine.completed_ids() == [0]
    assert json.loads((out / "lenscap.json").read_text())["parameters"]["rules"]["min_side"] == 10
    assert "old" not in json.loads((out / "00000_stats.json").read_text()), "lenscap's own files go"


def test_a_folder_with_its_own_lenscap_json_or_an_empty_work_dir_is_not_lenscaps(tmp_path):
    """A project's ``lenscap.json`` (not a manifest lenscap wrote) or an empty ``.lenscap/`` does not make a
    folder lenscap's: refused, naming what is there, --overwrite included; nothing of it is removed."""
    src = write_image_dataset(tmp_path / "in", 8, per_shard=4)
    project = tmp_path / "project"
    project.mkdir()
    (project / "lenscap.json").write_text(json.dumps({"name": "my project"}))
    (project / "thesis.docx").write_bytes(b"years of work")
    for extra in ([], ["--overwrite"]):
        err = refused("filter", str(src.path), str(project), *extra)
        assert "lenscap.json, thesis.docx" in err and "not a manifest lenscap wrote" in err
        assert "--overwrite" not in err and len(err.strip().splitlines()) == 1
    assert (project / "thesis.docx").read_bytes() == b"years of work"

    folder = tmp_path / "folder"
    (folder / ".lenscap").mkdir(parents=True)
    (folder / "thesis.docx").write_bytes(b"years of work")
    err = refused("filter", str(src.path), str(folder), "--overwrite")
    assert "not empty (thesis.docx)" in err and "not written by lenscap" in err
    assert (folder / "thesis.docx").read_bytes() == b"years of work"


def test_an_output_written_before_the_manifest_marker_still_resumes(tmp_path):
    src = write_image_dataset(tmp_path / "in", 8, per_shard=4)
    out = tmp_path / "out"
    ok("filter", str(src.path), str(out), "--min-side", "100")
    manifest = json.loads((out / "lenscap.json").read_text())
    assert manifest["format"] == "lenscap-dataset/1"
    del manifest["format"]  # as lenscap wrote it before the marker, and before claims
    (out / "lenscap.json").write_text(json.dumps(manifest))
    (out / ".lenscap" / "claim.json").unlink()
    ok("filter", str(src.path), str(out), "--min-side", "100")
    assert Dataset.open(out).completed_ids() == [0, 1]


def test_two_commands_on_one_output_take_the_same_lock(tmp_path):
    src = write_image_dataset(tmp_path / "ds", 8, per_shard=4)
    out = tmp_path / "out"
    with output_lock(out):  # what a running `filter IN OUT` holds (this process: another one is refused)
        r = run_cli("shard", str(src.path), str(out), "--quiet")
        assert r.returncode == 5 and "being written by another lenscap process" in r.stderr
    ok("filter", str(src.path), str(out))
    err = refused("shard", str(src.path), str(out))
    assert "written by filter, not shard" in err


def test_an_input_with_an_incomplete_shard_is_refused_unless_allowed(tmp_path):
    src = write_image_dataset(tmp_path / "ds", 12, per_shard=4)
    stats = src.stats_path(1).read_bytes()
    src.stats_path(1).unlink()  # a download still writing shard 1
    out = tmp_path / "out"
    err = refused("filter", str(src.path), str(out))
    assert "1 incomplete shard(s) (00001)" in err and "--allow-incomplete" in err
    assert not out.exists()
    ok("filter", str(src.path), str(out), "--allow-incomplete")
    manifest = json.loads((out / "lenscap.json").read_text())
    assert manifest["input_incomplete_shards"] == ["00001"]
    assert Dataset.open(out).completed_ids() == [0, 2]
    info = json.loads(ok("inspect", str(out), "--json"))
    assert info["input_incomplete_shards"] == ["00001"]

    # The download finishes its shard: the same command goes on with the shard it lacked.
    src.stats_path(1).write_bytes(stats)
    ok("filter", str(src.path), str(out))
    assert Dataset.open(out).completed_ids() == [0, 1, 2]
    assert json.loads((out / "lenscap.json").read_text())["input_incomplete_shards"] == []


def test_another_commands_output_and_the_inputs_image_source_are_refused(tmp_path):
    raw = write_image_dataset(tmp_path / "raw", 8, per_shard=4)  # a download's output, as lenscap writes it
    other = write_image_dataset(tmp_path / "other", 8, per_shard=4)
    before = {p.name: p.read_bytes() for p in raw.path.iterdir() if p.is_file()}
    err = refused("filter", str(other.path), str(raw.path))
    assert "holds the output of download, not of filter" in err
    ok("filter", str(raw.path), str(tmp_path / "filtered"))
    # The filter output's images live in raw/: even --overwrite never clears them.
    err = refused("caption", str(tmp_path / "filtered"), str(raw.path), "--backend", "describe", "--no-cache", "--overwrite")
    assert "holds the images of the input" in err
    assert {p.name: p.read_bytes() for p in raw.path.iterdir() if p.is_file()} == before


def test_a_damaged_claim_or_image_reference_is_a_one_line_error(tmp_path):
    src = write_image_dataset(tmp_path / "ds", 4, per_shard=4)
    out = tmp_path / "out"
    ok("filter", str(src.path), str(out))
    (out / ".lenscap" / "claim.json").write_text("{not json")
    err = refused("filter", str(src.path), str(out))
    assert "cannot read" in err and "claim.json" in err
    (out / ".lenscap" / "claim.json").unlink()
    manifest = json.loads((out / "lenscap.json").read_text())
    (out / "lenscap.json").write_text(json.dumps({**manifest, "images": ["../ds"]}))
    err = refused("shard", str(out), str(tmp_path / "release"))
    assert '"images" entry is not one lenscap wrote' in err


def test_download_owns_its_output_like_every_command(tmp_path, image_server):
    """download runs on the same driver: one claim, refusals that say what differs, --overwrite, and an
    output that lenscap 0.2 recorded in .lenscap/job.json adopted as a claim."""
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("".join(image_server.url(f"/ok/{i}.jpg") + "\n" for i in range(4)))
    second.write_text("".join(image_server.url(f"/ok/{i}.jpg") + "\n" for i in range(4, 7)))
    out = tmp_path / "raw"
    fast = ["--samples-per-shard", "2", "--processes", "1", "--threads", "2"]
    ok("download", str(first), str(out), *fast)
    claim = json.loads((out / ".lenscap" / "claim.json").read_text())
    assert claim["command"] == "download" and claim["input"] == {"location": str(first)}
    assert claim["settings"]["image_size"] == 1024 and not (out / ".lenscap" / "job.json").exists()

    err = refused("download", str(first), str(out), *fast, "--image-size", "512")
    assert "other settings (image_size: 1024 -> 512)" in err and "--overwrite" in err
    err = refused("download", str(second), str(out), *fast)
    assert f"input {first}, not {second}" in err
    assert Dataset(out).read_manifest()["input"] == str(first)  # refused: nothing changed

    ok("download", str(second), str(out), *fast, "--image-size", "512", "--overwrite")
    manifest = Dataset(out).read_manifest()
    assert manifest["input"] == str(second) and manifest["counts"]["samples"] == 3
    assert manifest["shards"] == {"expected": 2, "completed": 2} and manifest["parameters"]["image_size"] == 512
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]

    # An output written by lenscap 0.2: its record was .lenscap/job.json, and it resumes as it did.
    (out / ".lenscap" / "claim.json").unlink()
    options = {**claim["settings"], "image_size": 512}
    (out / ".lenscap" / "job.json").write_text(json.dumps({"stage": "download", "input": str(second), "options": options}))
    hits = dict(image_server.hits)
    ok("download", str(second), str(out), *fast, "--image-size", "512")
    assert image_server.hits == hits  # every shard was done: nothing fetched again
    assert json.loads((out / ".lenscap" / "claim.json").read_text())["settings"] == options
    assert "other settings (image_size: 512 -> 1024)" in refused("download", str(second), str(out), *fast)


def test_a_complete_shard_damaged_since_is_written_again_and_never_read(tmp_path):
    """Resume checks each complete shard's files against the sizes its stats recorded: a truncated or
    emptied file, or a stats file that is not one, is said and written again; inspect names it and
    reads around it, and an input with one is a one-line error."""
    src = write_image_dataset(tmp_path / "raw", 8, per_shard=4)
    ok("filter", str(src.path), str(tmp_path / "ref"), "--min-side", "10")
    ok("filter", str(src.path), str(tmp_path / "out"), "--min-side", "10")
    out = tmp_path / "out"
    parquet = out / "00001.parquet"
    parquet.write_bytes(parquet.read_bytes()[: parquet.stat().st_size // 2])  # truncated: a disk that filled, a bad copy
    info = json.loads(ok("inspect", str(out), "--json"))
    assert info["shards"]["complete"] == 1 and info["shards"]["damaged"] == 1
    assert info["damaged_shards"] == {
        "00001": f"00001.parquet has {parquet.stat().st_size} bytes, not the "
        f"{(tmp_path / 'ref' / '00001.parquet').stat().st_size} written"
    }
    code, _, err = run_cli_here("filter", str(src.path), str(out), "--min-side", "10", "--quiet")
    assert code == 0 and "shard 00001 of" in err and "was damaged since it was written" in err and "writing it again" in err
    for name in ("00000.parquet", "00001.parquet", "00000_stats.json", "00001_stats.json"):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name

    (out / "00000_stats.json").write_text("{not json")
    (out / "00001.parquet").write_bytes(b"")
    info = json.loads(ok("inspect", str(out), "--json"))
    assert info["shards"]["complete"] == 0 and set(info["damaged_shards"]) == {"00000", "00001"}
    ok("report", str(out), "--out", str(tmp_path / "report.html"))  # reads around them too
    assert "0 complete, 2 damaged" in (tmp_path / "report.html").read_text()
    err = refused("caption", str(out), str(tmp_path / "cap"), "--backend", "describe", "--no-cache")
    assert "00000_stats.json is not a stats file lenscap wrote" in err and len(err.strip().splitlines()) == 1
    ok("filter", str(src.path), str(out), "--min-side", "10")  # both written again
    assert all((out / n).read_bytes() == (tmp_path / "ref" / n).read_bytes() for n in ("00000_stats.json", "00001.parquet"))
