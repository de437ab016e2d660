"""dedup and shard into a remote output: memory:// in this process, and an S3 store (moto's server)
through the real CLI in subprocesses, on the local executor and on Ray. Each writes what a local run
writes (rows, tar members, dedup's report, the exported shards and shards.json); a kill mid-upload,
then a rerun, gives what an uninterrupted run gives; inspect reads the outputs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
from conftest import CliResult, run_cli
from conftest import run_cli_here as cli
from fsspec.implementations.memory import MemoryFileSystem
from test_dedup import make_planted
from test_remote_storage import snapshot as rows_and_members

from lenscap.core.dataset import Dataset
from lenscap.inspect.summary import inspect_dataset

DEDUP = ("--processes", "1", "--quiet")
SHARD = ("--processes", "1", "--quiet", "--samples-per-shard", "16")  # 66 exported samples: 5 shards


def ok(result: tuple[int, str, str] | CliResult) -> str:
    code, out, err = (result.returncode, result.stdout, result.stderr) if isinstance(result, CliResult) else result
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    """The planted duplicates (106 samples, 6 shards), deduplicated and exported both ways, all locally."""
    base = tmp_path_factory.mktemp("ref")
    make_planted(base / "in")
    ok(cli("dedup", str(base / "in"), str(base / "d"), *DEDUP))
    ok(cli("shard", str(base / "d"), str(base / "webdataset"), *SHARD))
    ok(cli("shard", str(base / "d"), str(base / "parquet"), *SHARD, "--format", "parquet"))
    return base


@pytest.fixture
def mem(monkeypatch, tmp_path):
    """A fresh memory:// root and an isolated local work dir (the outputs' work directories); removed afterwards."""
    monkeypatch.setenv("LENSCAP_WORK_DIR", str(tmp_path / "work"))
    root = f"t{uuid.uuid4().hex[:8]}"
    yield f"memory://{root}"
    fs = MemoryFileSystem()
    if fs.exists(f"/{root}"):
        fs.rm(f"/{root}", recursive=True)


def read(location: str | Path, name: str) -> bytes:
    with fsspec.open(f"{location}/{name}", "rb") as f:
        return f.read()


def dedup_report(location: str | Path) -> tuple[dict, list[dict]]:
    """report.json (but its timing) and the rows of clusters.parquet."""
    report = json.loads(read(location, "dedup/report.json"))
    report.pop("seconds")
    return report, pq.ParquetFile(io.BytesIO(read(location, "dedup/clusters.parquet"))).read().to_pylist()


def export(location: str | Path) -> tuple[dict, dict[str, object]]:
    """shards.json, and every file it lists: tar members in order, or the parquet rows and schema."""
    index = json.loads(read(location, "shards.json"))
    files: dict[str, object] = {}
    for record in index["shards"]:
        data = read(location, record["file"])
        if record["file"].endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                files[record["file"]] = [(m.name, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]
        else:
            table = pq.ParquetFile(io.BytesIO(data)).read()
            files[record["file"]] = (table.schema, table.to_pylist())
    return index, files


def names_under(fs, root: str) -> list[str]:
    return sorted(p[len(root.rstrip("/")) + 1 :] for p in fs.find(root))


@contextlib.contextmanager
def killed_uploading(name: str):
    """In this process, memory://'s upload of a file ending in ``name`` (a put of a staged file, or of a
    small file's bytes) puts part of it, then stops the command as a kill would: nothing after that point
    runs (KeyboardInterrupt: exit code 130)."""
    real_put, real_pipe = MemoryFileSystem.put_file, MemoryFileSystem.pipe_file

    def dying_put(self, lpath, rpath, *args, **kwargs):
        if str(rpath).endswith(name):
            real_pipe(self, rpath, Path(lpath).read_bytes()[:700])
            raise KeyboardInterrupt
        return real_put(self, lpath, rpath, *args, **kwargs)

    def dying_pipe(self, path, value=None, *args, **kwargs):
        if str(path).endswith(name):
            real_pipe(self, path, value[:700])
            raise KeyboardInterrupt
        return real_pipe(self, path, value, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(MemoryFileSystem, "put_file", dying_put)
        m.setattr(MemoryFileSystem, "pipe_file", dying_pipe)
        yield


def test_dedup_into_memory_equals_local(ref, mem, tmp_path):
    out = json.loads(ok(cli("dedup", str(ref / "in"), f"{mem}/d", *DEDUP, "--json")))
    assert out["out_dir"] == f"{mem}/d" and out["report"] == f"{mem}/d/dedup/report.json"
    assert rows_and_members(f"{mem}/d") == rows_and_members(ref / "d")
    assert dedup_report(f"{mem}/d") == dedup_report(ref / "d")
    fs, root = fsspec.core.url_to_fs(f"{mem}/d")
    assert names_under(fs, root) == sorted(
        [
            "lenscap.json",
            "dedup/clusters.parquet",
            "dedup/report.json",
            *(f"0000{i}{ext}" for i in range(6) for ext in (".parquet", "_stats.json")),
        ]
    )
    work = Dataset(f"{mem}/d").work_dir  # the search ran here; no shard or report copy is left
    assert (work / "dedup" / "decisions.parquet").exists()
    assert not list(work.glob("staging/*")) and not list(work.glob("dedup/report/*"))

    info, local = inspect_dataset(f"{mem}/d"), inspect_dataset(ref / "d")
    assert info["dedup"] == {**local["dedup"], "report": f"{mem}/d/dedup/report.json"} and info["dedup"]["duplicates"] > 30
    for key in ("stage", "shards", "samples", "status", "stage_status", "columns", "history"):
        assert info[key] == local[key], key
    code, text, err = cli("inspect", f"{mem}/d")
    assert code == 0 and "duplicates" in text + err, err

    # --against a remote release, into a remote output and a local one: the same decisions
    fs.put(str(ref / "in") + "/", f"{root.rsplit('/', 1)[0]}/rel", recursive=True)
    ok(cli("dedup", str(ref / "d"), f"{mem}/d2", *DEDUP, "--against", f"{mem}/rel"))
    ok(cli("dedup", str(ref / "d"), str(tmp_path / "d2"), *DEDUP, "--against", f"{mem}/rel"))
    assert rows_and_members(f"{mem}/d2") == rows_and_members(tmp_path / "d2")
    assert dedup_report(f"{mem}/d2") == dedup_report(tmp_path / "d2")
    assert dedup_report(f"{mem}/d2")[0]["duplicates_of_earlier_releases"] > 0


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_shard_into_memory_equals_local(ref, mem, fmt):
    out = json.loads(ok(cli("shard", str(ref / "d"), f"{mem}/{fmt}", *SHARD, "--format", fmt, "--json")))
    assert out["out_dir"] == f"{mem}/{fmt}" and out["shards"] == 5
    assert export(f"{mem}/{fmt}") == export(ref / fmt)
    fs, root = fsspec.core.url_to_fs(f"{mem}/{fmt}")
    files = [r["file"] for r in json.loads(read(ref / fmt, "shards.json"))["shards"]]
    sizes = ["sizes.json"] if fmt == "webdataset" else []  # open_clip's shard sizes
    assert names_under(fs, f"{root}") == sorted(["shards.json", "lenscap.json", "README.md", *sizes, *files])
    work = Dataset(f"{mem}/{fmt}").work_dir  # the state stays here; the shards and index files went
    assert len(list((work / "done").glob("*.json"))) == 5
    assert [p for p in work.glob("staging/**/*") if p.is_file()] == []
    card = read(f"{mem}/{fmt}", "README.md").decode()
    assert f'pretty_name: "{fmt}"' in card and f"{mem}/{fmt}/" in card and str(work) not in card

    manifest, local_manifest = Dataset.open(f"{mem}/{fmt}").read_manifest(), Dataset.open(ref / fmt).read_manifest()
    assert manifest["counts"] == local_manifest["counts"] and manifest["input"] == str(ref / "d")  # type: ignore[index]
    info, local = inspect_dataset(f"{mem}/{fmt}"), inspect_dataset(ref / fmt)
    assert info["path"] == f"{mem}/{fmt}"
    assert info["images"] == {"held": True, "location": f"{mem}/{fmt}", "problem": None}
    assert {k: v for k, v in info.items() if k not in ("path", "bytes", "images")} == {
        k: v for k, v in local.items() if k not in ("path", "bytes", "images")
    }
    # again, from a remote input: the same
    if fmt == "webdataset":
        # the dedup output and, beside it as locally, the dataset holding its images
        for name in ("d", "in"):
            fs.put(str(ref / name) + "/", f"{root.rsplit('/', 1)[0]}/{name}", recursive=True)
        ok(cli("shard", f"{mem}/d", f"{mem}/again", *SHARD))
        assert export(f"{mem}/again") == export(ref / fmt)


def test_shard_killed_mid_upload_resumes(ref, mem):
    out = f"{mem}/s"
    fs, root = fsspec.core.url_to_fs(out)
    done = Dataset(out).work_dir / "done"
    # 1. killed while uploading shard 1: a part of it is up, its marker is not written, its local copy stays
    with killed_uploading("/00001.tar"):
        assert cli("shard", str(ref / "d"), out, *SHARD)[0] == 130
    assert sorted(p.name for p in done.iterdir()) == ["00000.json"]
    assert fs.size(f"{root}/00001.tar") == 700 and not fs.exists(f"{root}/shards.json")
    # 2. killed while uploading the index files, after shards.json
    with killed_uploading("/lenscap.json"):
        assert cli("shard", str(ref / "d"), out, *SHARD)[0] == 130
    assert len(list(done.iterdir())) == 5 and fs.exists(f"{root}/shards.json")
    ok(cli("shard", str(ref / "d"), out, *SHARD))
    assert export(out) == export(ref / "webdataset")
    assert read(out, "lenscap.json") and read(out, "README.md")
    # 3. a shard lost or changed remotely since: its marker no longer counts, and it is written again
    fs.rm_file(f"{root}/00002.tar")
    fs.pipe_file(f"{root}/00003.tar", b"not the shard")
    ok(cli("shard", str(ref / "d"), out, *SHARD))
    assert export(out) == export(ref / "webdataset")
    assert not [p for p in Dataset(out).work_dir.rglob("*.tar")]


def test_dedup_killed_mid_upload_resumes(ref, mem):
    out = f"{mem}/d"
    fs, root = fsspec.core.url_to_fs(out)
    # killed uploading the report: the search is not redone, its files are uploaded by the rerun
    with killed_uploading("/dedup/report.json"):
        assert cli("dedup", str(ref / "in"), out, *DEDUP)[0] == 130
    assert fs.exists(f"{root}/dedup/clusters.parquet") and Dataset.open(out).completed_ids() == []
    # killed uploading shard 3's rows: shards 0-2 are complete remotely, 3 is not
    with killed_uploading("/00003.parquet"):
        assert cli("dedup", str(ref / "in"), out, *DEDUP)[0] == 130
    assert Dataset.open(out).completed_ids() == [0, 1, 2] and fs.size(f"{root}/00003.parquet") == 700
    assert inspect_dataset(out)["shards"]["incomplete"] == 3
    ok(cli("dedup", str(ref / "in"), out, *DEDUP))
    assert rows_and_members(out) == rows_and_members(ref / "d")
    assert dedup_report(out) == dedup_report(ref / "d")
    assert Dataset.open(out).read_manifest()["complete"] is True  # type: ignore[index]


# A real SIGKILL mid-upload, in a CLI subprocess: the S3 upload of a file ending in $KILL_AT puts a
# part of the file (more than an S3 PUT would leave), then the process kills itself.
_KILLER = """
import os, signal, sys
import s3fs

real = s3fs.S3FileSystem._put_file

async def dying(self, lpath, rpath, *args, **kwargs):
    if str(rpath).endswith(os.environ["KILL_AT"]):
        with open(lpath, "rb") as f:
            await self._pipe_file(rpath, f.read()[:700])
        os.kill(os.getpid(), signal.SIGKILL)
    return await real(self, lpath, rpath, *args, **kwargs)

s3fs.S3FileSystem._put_file = dying  # before any instance: their sync put_file wraps this
from lenscap.cli import main
sys.argv = ["lenscap", *sys.argv[1:]]
main()
"""


def run_killed(kill_at: str, *args: str, env: dict[str, str]) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", _KILLER, *args],
        env={**os.environ, **env, "KILL_AT": kill_at},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return proc.returncode


def test_s3_outputs_through_the_cli(ref, s3_store, tmp_path):
    base = f"lenscap/{uuid.uuid4().hex[:8]}"
    url = f"s3://{base}"
    env = {"LENSCAP_WORK_DIR": str(tmp_path / "work")}

    run_killed("/d/00001.parquet", "dedup", str(ref / "in"), f"{url}/d", *DEDUP, env=env)
    assert s3_store.exists(f"{base}/d/00000_stats.json") and not s3_store.exists(f"{base}/d/00001_stats.json")
    ok(run_cli("dedup", str(ref / "in"), f"{url}/d", *DEDUP, env=env))
    assert rows_and_members(f"{url}/d") == rows_and_members(ref / "d")
    assert dedup_report(f"{url}/d") == dedup_report(ref / "d")

    run_killed("/s/00002.tar", "shard", str(ref / "d"), f"{url}/s", *SHARD, env=env)
    done = Dataset(f"{url}/s").work_dir  # this process computes the same work directory from the URL...
    done = tmp_path / "work" / done.parent.name / ".lenscap" / "done"  # ...under the subprocess's $LENSCAP_WORK_DIR
    assert sorted(p.name for p in done.iterdir()) == ["00000.json", "00001.json"]
    ok(run_cli("shard", str(ref / "d"), f"{url}/s", *SHARD, env=env))
    assert export(f"{url}/s") == export(ref / "webdataset")

    info = json.loads(ok(run_cli("inspect", f"{url}/d", "--json")))
    local = inspect_dataset(ref / "d")
    assert info["path"] == f"{url}/d" and info["dedup"] == {**local["dedup"], "report": f"{url}/d/dedup/report.json"}
    assert info["stage_status"] == local["stage_status"] and info["samples"] == local["samples"]
    info = json.loads(ok(run_cli("inspect", f"{url}/s", "--json")))
    assert info["stage"] == "shard" and info["history"] == inspect_dataset(ref / "webdataset")["history"]


def test_s3_outputs_on_ray(ref, s3_store, ray_cluster, tmp_path):
    url = f"s3://lenscap/{uuid.uuid4().hex[:8]}"
    env = {"LENSCAP_WORK_DIR": str(tmp_path / "work")}
    on_ray = ("--quiet", "--executor", "ray", "--ray-address", ray_cluster)
    ok(run_cli("dedup", str(ref / "in"), f"{url}/d", *on_ray, env=env))
    assert rows_and_members(f"{url}/d") == rows_and_members(ref / "d")
    assert dedup_report(f"{url}/d") == dedup_report(ref / "d")
    # from the remote dedup output (each task reads its input by ranges) into S3 again
    ok(run_cli("shard", f"{url}/d", f"{url}/s", "--samples-per-shard", "16", *on_ray, env=env))
    assert export(f"{url}/s") == export(ref / "webdataset")
