"""run_stage: in-process and spawned workers agree, per-sample errors are columns, shard failures resume."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from lenscap.core.dataset import Dataset
from lenscap.core.errors import DatasetError
from lenscap.core.job import run_stage
from lenscap.core.layout import shard_name
from lenscap.core.progress import make_progress
from lenscap.core.record import Sample
from lenscap.core.stage import ShardStage

SHARDS = 3
PER_SHARD = 5


def jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), ((i * 53) % 256, (i * 29) % 256, 200)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


# -- stages (module level: spawned workers import them by name) ----------------------------------


class UpperCaption(ShardStage):
    name = "upper"

    def parameters(self) -> dict[str, Any]:
        return {"mode": "upper", "api_key": "sk-RUNNER-SECRET"}

    def process(self, sample: Sample) -> Sample:
        if sample.row.get("caption") is not None:
            sample.row["caption"] = sample.row["caption"].upper()
        return sample


class ErrorOnThree(UpperCaption):
    """Raises for keys ending in 3: those samples must get upper_status / upper_error, not vanish."""

    def process(self, sample: Sample) -> Sample:
        if sample.key.endswith("3"):
            raise ValueError(f"cannot upper-case {sample.key}")
        return super().process(sample)


class FailingShard(UpperCaption):
    """Logs every run_shard call to a marker file; raises for ``fail_shard``."""

    def __init__(self, marker: str, fail_shard: int | None) -> None:
        self.marker = marker
        self.fail_shard = fail_shard

    def run_shard(self, src: Dataset, dst: Dataset, shard_id: int) -> dict[str, Any]:
        with open(self.marker, "a") as f:
            f.write(f"{shard_id}\n")
        if shard_id == self.fail_shard:
            raise RuntimeError(f"boom on shard {shard_id}")
        return super().run_shard(src, dst, shard_id)


# -- helpers -------------------------------------------------------------------------------------


def build_input(path: Path) -> Dataset:
    """3 shards x 5 samples, keys 00000..00014; the last sample of each shard failed to download."""
    ds = Dataset.create(path)
    for shard in range(SHARDS):
        w = ds.writer(shard)
        for j in range(PER_SHARD):
            i = shard * PER_SHARD + j
            failed = j == PER_SHARD - 1
            row = {
                "url": f"http://img/{i}.jpg",
                "caption": f"a small picture {i}",
                "status": "failed_to_download" if failed else "success",
                "error_message": "404 Not Found" if failed else None,
            }
            w.write(Sample(key=shard_name(i), row=row, image=None if failed else jpeg(i)))
        w.commit()
    ds.write_manifest("download", {"processes": 2}, "urls.txt", expected_shards=SHARDS)
    return ds


@pytest.fixture
def src(tmp_path) -> Dataset:
    return build_input(tmp_path / "in")


def quiet():
    return make_progress("test", quiet=True)


def shard_files(ds: Dataset, shard: int) -> list[Path]:
    return [ds.parquet_path(shard), ds.stats_path(shard)]  # no tar: the images stay in the input


def read_marker(path: Path) -> list[int]:
    return sorted(int(x) for x in path.read_text().split()) if path.exists() else []


# -- tests ---------------------------------------------------------------------------------------


def test_run_stage_upper_cases_captions(src, tmp_path):
    result = run_stage(UpperCaption(), src.path, tmp_path / "out", processes=1, progress=quiet())
    assert result.exit_code == 0
    assert result.failed_shards == {}
    assert (result.shards_total, result.shards_completed, result.samples) == (3, 3, 15)
    assert result.status == {"failed_to_download": 3, "success": 12}
    assert result.out_dir == str(tmp_path / "out")

    out = Dataset.open(tmp_path / "out")
    assert out.completed_ids() == [0, 1, 2]
    for shard in range(SHARDS):
        before = list(src.iter_samples(shard))
        after = list(out.iter_samples(shard))
        assert [s.key for s in after] == [s.key for s in before]
        assert [s.caption for s in after] == [s.caption.upper() for s in before]
        assert [s.image for s in after] == [s.image for s in before]
        assert [s.status for s in after] == [s.status for s in before]
        stats = out.read_stats(shard)
        assert stats["stage"] == "upper"
        assert (stats["count"], stats["successes"]) == (5, 4)


def test_copy_images_writes_a_self_contained_output_identical_across_processes(src, tmp_path):
    outs = []
    for processes in (1, 2):
        stage = UpperCaption()
        stage.copy_images = True
        run_stage(stage, src.path, tmp_path / f"p{processes}", processes=processes, progress=quiet())
        outs.append(Dataset.open(tmp_path / f"p{processes}"))
    a, b = outs
    assert a.read_manifest()["images"] is None and a.image_source() is a
    for shard in range(SHARDS):
        assert a.tar_path(shard).read_bytes() == b.tar_path(shard).read_bytes()
    before = [s.image for shard in range(SHARDS) for s in Dataset.open(src.path).iter_samples(shard)]
    shutil.rmtree(src.path)  # self-contained: readable without its input
    after = [s.image for shard in range(SHARDS) for s in a.iter_samples(shard)]
    assert after == before and sum(x is not None for x in after) == 12


def test_rows_only_output_refers_to_the_input_and_says_when_it_is_gone(src, tmp_path):
    run_stage(UpperCaption(), src.path, tmp_path / "out", progress=quiet())
    out = Dataset.open(tmp_path / "out")
    assert out.read_manifest()["images"]["location"] == os.path.relpath(src.path, tmp_path / "out")
    assert out.image_source().path == src.path
    assert [s.image for s in out.iter_samples(0)] == [s.image for s in src.iter_samples(0)]
    shutil.rmtree(src.path)
    with pytest.raises(DatasetError, match="live in .*which is missing; restore it, or rerun .* --copy-images"):
        list(Dataset.open(tmp_path / "out").iter_samples(0))


def test_one_and_two_processes_give_identical_output(src, tmp_path):
    r1 = run_stage(UpperCaption(), src.path, tmp_path / "p1", processes=1, progress=quiet())
    r2 = run_stage(UpperCaption(), src.path, tmp_path / "p2", processes=2, progress=quiet())
    assert r1.exit_code == r2.exit_code == 0
    assert (r1.shards_total, r1.shards_completed, r1.samples, r1.status, r1.failed_shards) == (
        r2.shards_total,
        r2.shards_completed,
        r2.samples,
        r2.status,
        r2.failed_shards,
    )
    a, b = Dataset.open(tmp_path / "p1"), Dataset.open(tmp_path / "p2")
    assert a.completed_ids() == b.completed_ids() == [0, 1, 2]
    names_a = sorted(p.name for p in a.path.iterdir() if p.is_file() and p.name != "lenscap.json")
    names_b = sorted(p.name for p in b.path.iterdir() if p.is_file() and p.name != "lenscap.json")
    assert names_a == names_b
    for shard in range(SHARDS):
        ta, tb = a.read_table(shard), b.read_table(shard)
        assert ta.schema.equals(tb.schema)
        assert ta.equals(tb)
        assert not a.tar_path(shard).exists() and not b.tar_path(shard).exists()  # images stay in the input
        assert a.read_stats(shard) == b.read_stats(shard)
    ma, mb = a.read_manifest(), b.read_manifest()
    for field in ("counts", "schema", "shards", "parameters", "complete"):
        assert ma[field] == mb[field]


def test_per_sample_errors_become_columns(src, tmp_path):
    result = run_stage(ErrorOnThree(), src.path, tmp_path / "out", processes=1, progress=quiet())
    assert result.exit_code == 0  # a bad sample never costs its shard
    out = Dataset.open(tmp_path / "out")
    seen_errors = 0
    for shard in range(SHARDS):
        table = out.read_table(shard)
        assert table.num_rows == PER_SHARD
        for row in table.to_pylist():
            if row["key"].endswith("3"):
                seen_errors += 1
                assert row.get("upper_status") == "error", row
                assert row.get("upper_error") == f"ValueError: cannot upper-case {row['key']}"
                assert row["caption"] == f"a small picture {int(row['key'])}"  # left as it was
            else:
                assert row.get("upper_status") == "ok"
                assert row.get("upper_error") is None
                assert row["caption"] == f"A SMALL PICTURE {int(row['key'])}"
    assert seen_errors == 2  # keys 00003 and 00013


def test_stage_columns_have_one_schema_across_shards(src, tmp_path):
    """Shard 1 (keys 00005..00009) has no error; its parquet must still have the stage's outcome columns."""
    run_stage(ErrorOnThree(), src.path, tmp_path / "out", processes=1, progress=quiet())
    out = Dataset.open(tmp_path / "out")
    schemas = [out.read_table(s).schema for s in range(SHARDS)]
    for schema in schemas:
        assert "upper_status" in schema.names and "upper_error" in schema.names
    assert all(s.equals(schemas[0]) for s in schemas)


@pytest.mark.parametrize("processes", [1, 2])
def test_failed_shard_is_left_incomplete_and_rerun_does_only_it(src, tmp_path, processes):
    out_dir = tmp_path / "out"
    marker = tmp_path / "calls.txt"

    result = run_stage(FailingShard(str(marker), fail_shard=1), src.path, out_dir, processes=processes, progress=quiet())
    assert result.exit_code == 1
    assert result.failed_shards == {1: "RuntimeError: boom on shard 1"}
    assert (result.shards_total, result.shards_completed, result.samples) == (3, 2, 10)
    assert read_marker(marker) == [0, 1, 2]
    out = Dataset.open(out_dir)
    assert out.completed_ids() == [0, 2]
    assert out.incomplete_ids(range(3)) == [1]
    assert not out.stats_path(1).exists()
    assert not out.tar_path(1).exists() and not out.parquet_path(1).exists()
    assert out.stats_path(0).exists() and out.stats_path(2).exists()
    assert sorted(p.name for p in out_dir.iterdir() if p.name.endswith(".tmp")) == []
    manifest = out.read_manifest()
    assert manifest["complete"] is False
    assert manifest["shards"] == {"expected": 3, "completed": 2}

    kept = {p: p.stat().st_mtime_ns for s in (0, 2) for p in shard_files(out, s)}
    kept_bytes = {p: p.read_bytes() for p in kept}
    marker.unlink()

    again = run_stage(FailingShard(str(marker), fail_shard=None), src.path, out_dir, processes=processes, progress=quiet())
    assert again.exit_code == 0
    assert again.failed_shards == {}
    assert (again.shards_total, again.shards_completed, again.samples) == (3, 3, 15)
    assert read_marker(marker) == [1]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert {p: p.read_bytes() for p in kept} == kept_bytes
    assert out.completed_ids() == [0, 1, 2]
    assert [s.caption for s in out.iter_samples(1)] == [f"A SMALL PICTURE {i}" for i in range(5, 10)]
    assert out.read_manifest()["complete"] is True

    marker.unlink()
    third = run_stage(FailingShard(str(marker), fail_shard=1), src.path, out_dir, processes=processes, progress=quiet())
    assert third.exit_code == 0
    assert read_marker(marker) == []  # nothing left to do: the stage never ran


def test_output_manifest_history_extends_input_history(src, tmp_path):
    run_stage(UpperCaption(), src.path, tmp_path / "out", processes=1, progress=quiet())
    in_manifest = src.read_manifest()
    out_manifest = Dataset.open(tmp_path / "out").read_manifest()
    assert len(in_manifest["history"]) == 1
    assert out_manifest["history"][:-1] == in_manifest["history"]
    entry = out_manifest["history"][-1]
    assert entry["stage"] == "upper"
    assert entry["input"] == str(src.path)
    assert entry["parameters"] == {"mode": "upper"}
    assert [h["stage"] for h in out_manifest["history"]] == ["download", "upper"]
    assert out_manifest["stage"] == "upper"
    assert out_manifest["input"] == str(src.path)
    assert out_manifest["counts"] == {
        "samples": 15,
        "status": {"failed_to_download": 3, "success": 12},
        "upper_status": {"ok": 15},
    }
    assert out_manifest["complete"] is True
    assert "sk-RUNNER-SECRET" not in (tmp_path / "out" / "lenscap.json").read_text()


def test_run_stage_only_takes_completed_input_shards(src, tmp_path):
    os.remove(src.stats_path(2))  # input shard 2 no longer complete
    with pytest.raises(DatasetError, match=r"1 incomplete shard\(s\) \(00002\)"):
        run_stage(UpperCaption(), src.path, tmp_path / "out", processes=1, progress=quiet())
    result = run_stage(UpperCaption(), src.path, tmp_path / "out", processes=1, progress=quiet(), allow_incomplete=True)
    assert (result.shards_total, result.shards_completed, result.exit_code) == (2, 2, 0)
    assert Dataset.open(tmp_path / "out").completed_ids() == [0, 1]
