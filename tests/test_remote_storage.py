"""Datasets and URL lists on an fsspec filesystem (here ``memory://``, which lives in this process):
filter and caption into and out of remote storage give what a local run gives, a remote output
resumes after a kill mid-upload, inspect reads it, download reads a remote URL list, the commands
that cannot write remotely say so in one line, and credentials are never recorded."""

from __future__ import annotations

import gzip
import json
import uuid
from pathlib import Path

import fsspec
import pytest
from conftest import run_cli_here as cli

from lenscap.core.dataset import Dataset
from lenscap.core.storage import is_remote, redact_url
from lenscap.demo.datasets import write_image_dataset
from lenscap.download.inputs import InputSpec, read_url_tables, resolve_input_files
from lenscap.inspect.summary import inspect_dataset


@pytest.fixture
def mem(monkeypatch, tmp_path):
    """A fresh memory:// root for this test, an isolated local work dir and cache; removed afterwards."""
    monkeypatch.setenv("LENSCAP_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("LENSCAP_CACHE_DIR", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    root = f"t{uuid.uuid4().hex[:8]}"
    yield f"memory://{root}"
    if fs.exists(f"/{root}"):
        fs.rm(f"/{root}", recursive=True)


@pytest.fixture
def local_in(tmp_path) -> Path:
    """3 shards, 14 samples, two failed downloads: small images, so the file stays fast."""
    return write_image_dataset(tmp_path / "in", 14, per_shard=5, size=(64, 48), failed=lambda i: i in (3, 11)).path


def upload(local: Path, url: str) -> str:
    fs, root = fsspec.core.url_to_fs(url)
    fs.put(str(local) + "/", root, recursive=True)
    return url


def snapshot(location: str) -> dict[int, tuple[list[dict], dict[str, bytes], dict]]:
    """Every complete shard: its rows, its images (read where they live, by offset), its stats."""
    ds = Dataset.open(location)
    shards = {}
    for shard_id in ds.completed_ids():
        images = {s.key: s.image for s in ds.iter_samples(shard_id) if s.has_image}
        shards[shard_id] = (ds.read_table(shard_id).to_pylist(), images, ds.read_stats(shard_id))
    return shards


# memory:// exists in this process only: its commands run here, not in worker processes.
FILTER = ("--min-bytes", "400", "--caption-min-words", "3", "--processes", "1", "--quiet")
CAPTION = ("--backend", "describe", "-O", "ocr=off", "-O", "faces=off", "--no-cache", "--quiet")  # pixels only: fast


def test_filter_and_caption_remote_equal_local(tmp_path, mem, local_in):
    assert cli("filter", str(local_in), str(tmp_path / "f"), *FILTER)[0] == 0
    assert cli("caption", str(tmp_path / "f"), str(tmp_path / "c"), *CAPTION)[0] == 0
    expected_f, expected_c = snapshot(str(tmp_path / "f")), snapshot(str(tmp_path / "c"))
    assert len(expected_f) == 3 and any(r["filter_status"] == "dropped" for r in expected_f[0][0] + expected_f[2][0])

    # local input -> remote output, then remote input -> remote output
    code, _, err = cli("filter", str(local_in), f"{mem}/f", *FILTER)
    assert code == 0, err
    assert snapshot(f"{mem}/f") == expected_f
    code, _, err = cli("caption", f"{mem}/f", f"{mem}/c", *CAPTION)
    assert code == 0, err
    assert snapshot(f"{mem}/c") == expected_c
    # remote input -> remote output for filter too, and remote input -> local output
    upload(local_in, f"{mem}/in")
    assert cli("filter", f"{mem}/in", f"{mem}/f2", *FILTER)[0] == 0
    assert snapshot(f"{mem}/f2") == expected_f
    # --copy-images: the remote output holds its tars, read by ranges, the same images and rows
    assert cli("filter", f"{mem}/in", f"{mem}/f3", *FILTER, "--copy-images")[0] == 0
    copied = snapshot(f"{mem}/f3")
    assert Dataset.open(f"{mem}/f3").read_manifest()["images"] is None
    for shard_id, (rows, images, stats) in expected_f.items():
        # The same counts; the files recorded (sizes, checksums) differ by the tar this output holds.
        files = {"files": None, "sha256": None, "head_sha256": None}
        assert copied[shard_id][1] == images and {**copied[shard_id][2], **files} == {**stats, **files}
        assert set(copied[shard_id][2]["files"]) == {f"{shard_id:05d}.tar", f"{shard_id:05d}.parquet"}
        assert [{k: v for k, v in r.items() if k != "image_offset"} for r in copied[shard_id][0]] == [
            {k: v for k, v in r.items() if k != "image_offset"} for r in rows
        ]
    assert cli("caption", f"{mem}/f", str(tmp_path / "c2"), *CAPTION)[0] == 0
    assert snapshot(str(tmp_path / "c2")) == expected_c

    # the manifest is remote, names the remote input, and counts what a local run counts
    manifest = Dataset.open(f"{mem}/c").read_manifest()
    local_manifest = Dataset.open(tmp_path / "c").read_manifest()
    assert manifest is not None and local_manifest is not None
    assert manifest["input"] == f"{mem}/f" and manifest["complete"] is True
    assert manifest["counts"] == local_manifest["counts"] and manifest["schema"] == local_manifest["schema"]
    # nothing but the dataset's own files is written remotely; its work directory is local
    fs = fsspec.filesystem("memory")
    assert {p.rsplit("/", 1)[-1] for p in fs.ls(f"/{mem.split('://')[1]}/c", detail=False)} == {
        "lenscap.json",
        *(f"0000{i}{ext}" for i in range(3) for ext in (".parquet", "_stats.json")),
    }  # rows only
    work = Dataset(f"{mem}/c").work_dir
    assert work.parent.parent == tmp_path / "work" and (work / "claim.json").exists()
    assert not list(work.glob("staging/*"))  # uploaded shards leave no local copy

    # inspect, as the library and as the command
    info = inspect_dataset(f"{mem}/c")
    local_info = inspect_dataset(tmp_path / "c")
    assert info["path"] == f"{mem}/c" and info["shards"] == local_info["shards"] and info["samples"] == 14
    for key in ("status", "stage_status", "caption_words", "columns", "errors"):
        assert info[key] == local_info[key], key
    assert info["bytes"]["shards"] == local_info["bytes"]["shards"]
    code, out, err = cli("inspect", f"{mem}/c", "--json")
    assert code == 0, err
    assert json.loads(out)["samples"] == 14

    # dry run on a remote input
    code, out, err = cli("filter", f"{mem}/in", f"{mem}/unused", *FILTER[:-1], "--dry-run", "--json")
    assert code == 0, err
    assert json.loads(out)["kept"] == sum(r["filter_status"] == "kept" for rows, _, _ in expected_f.values() for r in rows)


def test_remote_output_resumes_after_a_kill_mid_upload(tmp_path, mem, local_in, monkeypatch):
    assert cli("caption", str(local_in), str(tmp_path / "c"), *CAPTION)[0] == 0
    expected = snapshot(str(tmp_path / "c"))
    out = f"{mem}/c"
    fs, root = fsspec.core.url_to_fs(out)

    # 1. Killed while uploading shard 1: its parquet arrived, its stats never did. The shard is incomplete
    # remotely; the rerun finishes its commit from the copy staged here, and does not caption it again.
    real_pipe = type(fs).pipe_file

    def dies_on_stats(self, path, *args, **kwargs):
        if path.endswith("00001_stats.json"):
            raise OSError("connection reset (simulated kill)")
        return real_pipe(self, path, *args, **kwargs)

    monkeypatch.setattr(type(fs), "pipe_file", dies_on_stats)
    code, _, err = cli("caption", str(local_in), out, *CAPTION)
    assert code == 1, err
    monkeypatch.undo()
    monkeypatch.setenv("LENSCAP_WORK_DIR", str(tmp_path / "work"))
    remote = Dataset.open(out)
    assert remote.completed_ids() == [0, 2] and fs.exists(f"{root}/00001.parquet")
    assert remote.read_manifest()["complete"] is False  # type: ignore[index]
    assert inspect_dataset(out)["shards"]["incomplete"] == 1
    from lenscap.caption.stage import CaptionStage

    captioned = []
    real_run = CaptionStage.run_shard
    monkeypatch.setattr(CaptionStage, "run_shard", lambda self, s, d, i: captioned.append(i) or real_run(self, s, d, i))
    code, _, err = cli("caption", str(local_in), out, *CAPTION)
    assert code == 0, err
    assert captioned == []  # finished here before: uploaded, never captioned (paid for) again
    assert snapshot(out) == expected

    # 2. Killed mid-upload with nothing left locally (another machine, or the copy lost): the stats
    # file is missing, a partial parquet is there. The rerun redoes exactly that shard.
    fs.rm_file(f"{root}/00001_stats.json")
    fs.pipe_file(f"{root}/00001.parquet", fs.cat_file(f"{root}/00001.parquet")[:700])
    code, _, err = cli("caption", str(local_in), out, *CAPTION)
    assert code == 0, err
    assert captioned == [1]
    assert snapshot(out) == expected
    assert Dataset.open(out).read_manifest()["complete"] is True  # type: ignore[index]


def test_download_reads_a_remote_url_list(tmp_path, mem, image_server):
    fs, root = fsspec.core.url_to_fs(mem)
    urls = [image_server.url(f"/ok/{i}.jpg") for i in range(3)]
    fs.pipe_file(f"{root}/lists/a.csv", ("url,caption\n" + "".join(f"{u},picture {i}\n" for i, u in enumerate(urls))).encode())
    fs.pipe_file(f"{root}/lists/b.txt.gz", gzip.compress(f"{image_server.url('/ok/3.jpg')}\n# a comment\n".encode()))
    fs.pipe_file(f"{root}/lists/notes.md", b"not a list")

    assert resolve_input_files(f"{mem}/lists") == [
        f"memory:///{root.lstrip('/')}/lists/a.csv",
        f"memory:///{root.lstrip('/')}/lists/b.txt.gz",
    ]
    assert len(resolve_input_files(f"{mem}/lists/*.csv")) == 1
    table = next(read_url_tables(InputSpec(f"{mem}/lists/a.csv")))
    assert table.column("url").to_pylist() == urls and table.column("caption").to_pylist()[0] == "picture 0"
    with pytest.raises(Exception, match="does not exist"):
        resolve_input_files(f"{mem}/lists/missing.csv")

    code, out, err = cli(
        "download", f"{mem}/lists", str(tmp_path / "dl"), "--processes", "1", "--threads", "4", "--quiet", "--json"
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["samples"] == 4 and summary["status"] == {"success": 4}
    assert Dataset.open(tmp_path / "dl").read_manifest()["input"] == f"{mem}/lists"  # type: ignore[index]


@pytest.mark.parametrize(
    "args, what",
    [
        (["report", "{mem}/in"], "report's dataset"),
        (["report", "{local}", "--out", "{mem}/r.html"], "report's --out"),
        (["estimate", "--images", "10", "--from", "{mem}/in"], "estimate --from"),
        (["batch", "status", "{mem}/in"], "batch status's directory"),
        (["caption", "{local}", "{mem}/c", "--backend", "batch-files"], "the output of a batch caption job"),
        (["run", "demo", "--work-dir", "{mem}/w"], "a recipe's work directory"),
    ],
)
def test_commands_that_write_local_files_refuse_a_remote_path_in_one_line(tmp_path, mem, local_in, args, what):
    upload(local_in, f"{mem}/in")
    code, _, err = cli(*(a.format(local=local_in, mem=mem) for a in args))
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("lenscap: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"lenscap: error: {what} must be a local path, not {mem}/")
    assert "works for the input and output of filter, caption" in lines[0]
    fs, root = fsspec.core.url_to_fs(mem)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) == ["in"]  # nothing was created


def test_dedup_and_shard_read_a_remote_input(tmp_path, mem, local_in):
    upload(local_in, f"{mem}/in")
    for name, src in (("local", str(local_in)), ("remote", f"{mem}/in")):
        assert cli("dedup", src, str(tmp_path / f"d-{name}"), "--processes", "1", "--quiet")[0] == 0
        assert cli("shard", src, str(tmp_path / f"s-{name}"), "--processes", "1", "--samples-per-shard", "5", "--quiet")[0] == 0
    assert snapshot(str(tmp_path / "d-local")) == snapshot(str(tmp_path / "d-remote"))
    exported = [sorted(p.name for p in (tmp_path / f"s-{n}").glob("*.tar")) for n in ("local", "remote")]
    assert exported[0] == exported[1] and exported[0]
    for name in exported[0]:
        assert (tmp_path / "s-local" / name).read_bytes() == (tmp_path / "s-remote" / name).read_bytes()


def test_credentials_are_never_recorded(tmp_path, mem, local_in):
    assert redact_url("s3://AKIAKEY:s3cr3t@bucket/ds/?X-Amz-Signature=abc") == "s3://bucket/ds/"
    assert redact_url("simplecache::s3://k:s@bucket/ds") == "simplecache::s3://bucket/ds"
    assert redact_url(str(tmp_path)) == str(tmp_path) and not is_remote(tmp_path) and not is_remote("file:///x")
    # storage options (where keys go in the library) travel with the dataset, never into a record
    from lenscap.core.job import run_stage
    from lenscap.filter.stage import FilterStage

    secret = {"client_kwargs": {"token": "hunter2-secret"}}
    upload(local_in, f"{mem}/in")
    result = run_stage(FilterStage(), Dataset(f"{mem}/in", secret), Dataset(f"{mem}/f", secret))
    assert result.shards_completed == 3
    fs, root = fsspec.core.url_to_fs(mem)
    written = b"".join(fs.cat_file(p) for p in fs.find(f"{root}/f") if p.endswith(".json"))
    written += b"".join(p.read_bytes() for p in (tmp_path / "work").rglob("*") if p.is_file())
    assert b"hunter2" not in written
    # a URL with credentials is recorded without them
    ds = Dataset.create(tmp_path / "m")
    assert ds.write_manifest("x", {}, "s3://AKIAKEY:s3cr3t@bucket/ds")["input"] == "s3://bucket/ds"


def test_a_remote_output_refers_to_images_in_its_bucket_relatively(tmp_path, mem, local_in):
    upload(local_in, f"{mem}/raw/in")
    assert cli("filter", f"{mem}/raw/in", f"{mem}/stages/f", *FILTER)[0] == 0
    assert Dataset.open(f"{mem}/stages/f").read_manifest()["images"]["location"] == "../../raw/in"
    expected = snapshot(f"{mem}/stages/f")
    fs, root = fsspec.core.url_to_fs(mem)
    fs.mv(f"{root}/raw", f"{root}/moved/raw", recursive=True)  # the bucket's prefix moved whole
    fs.mv(f"{root}/stages", f"{root}/moved/stages", recursive=True)
    assert snapshot(f"{mem}/moved/stages/f") == expected
