"""The directories lenscap writes, read by the tools that train on them: webdataset through a torch
DataLoader with several workers, open_clip's ``sizes.json``, ``datasets.load_dataset(DIR)`` on a
download and on every export format; ``inspect`` and ``report`` on an export; an empty export; one
cost figure for caption and inspect when a rerun's answers come from the response cache."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest
import yaml
from conftest import run_cli_here

from lenscap.core.dataset import Dataset
from lenscap.demo.datasets import write_image_dataset
from lenscap.inspect.summary import inspect_dataset
from lenscap.shard.command import run_shard
from lenscap.shard.formats import FORMATS
from lenscap.shard.options import ShardOptions
from lenscap.testing.fake_openai import FakeOpenAI, FakeSettings

N = 20  # samples of the small source; 2 of them failed downloads
FAILED = {3, 11}
KEY = "sk-test-readers-0123456789"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_image_dataset(
        tmp_path_factory.mktemp("readers") / "in", N, per_shard=10, size=(64, 48), failed=lambda i: i in FAILED
    ).path


@pytest.fixture(scope="module")
def exports(source, tmp_path_factory) -> dict[str, Path]:
    """Each export format of the source, with the defaults (so: --min-shards 8)."""
    base = tmp_path_factory.mktemp("exports")
    out = {}
    for name in FORMATS:
        result = run_shard(source, base / name, ShardOptions(format=name, processes=1), quiet=True)
        assert result.exit_code == 0 and result.samples == N - len(FAILED) and result.shards_total == 8
        out[name] = base / name
    return out


@pytest.fixture(scope="module")
def downloaded(image_server, tmp_path_factory) -> Path:
    """A real ``lenscap download`` of 8 images and 2 failures (img2dataset, loopback server)."""
    from lenscap import api
    from lenscap.download.options import DownloadOptions

    tmp = tmp_path_factory.mktemp("download")
    urls = [image_server.url(f"/ok/{i}.jpg") for i in range(8)] + [
        image_server.url("/missing.jpg"),
        image_server.url("/html.jpg"),
    ]
    (tmp / "urls.txt").write_text("\n".join(urls) + "\n")
    result = api.download(
        tmp / "urls.txt", tmp / "dl", DownloadOptions(processes=1, timeout=2, max_retries=0, allow_private_network=True)
    )
    assert result.exit_code == 0 and result.status.get("success") == 8
    return tmp / "dl"


def hf_load(path, cache: Path, *args, **kwargs):
    import datasets

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return datasets.load_dataset(str(path), *args, split="train", cache_dir=str(cache), **kwargs)


def tar_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return list(dict.fromkeys(m.name.partition(".")[0] for m in tar))


# -- webdataset and open_clip ------------------------------------------------------------------------


def test_webdataset_through_a_dataloader_with_two_workers_yields_every_sample_once(exports):
    import torch.utils.data
    import webdataset as wds

    out = exports["webdataset"]
    index = json.loads((out / "shards.json").read_text())
    urls = [str(out / s["file"]) for s in index["shards"]]
    # As the card says: shards split between nodes, then between the workers.
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node).to_tuple("__key__", "jpg", "txt")
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    keys = [key for key, _, _ in loader]
    assert sorted(keys) == sorted(f"{i:09d}" for i in range(N) if i not in FAILED)
    assert len(keys) == len(set(keys))  # exactly once


def test_sizes_json_matches_the_tars(exports):
    out = exports["webdataset"]
    sizes = json.loads((out / "sizes.json").read_text())
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert sorted(sizes) == tars and len(tars) == 8
    assert sizes == {name: len(tar_keys(out / name)) for name in tars}
    # open_clip's get_dataset_size: sizes[basename(shard)] summed over the shards
    assert sum(int(sizes[os.path.basename(p)]) for p in tars) == N - len(FAILED)


def test_never_more_shards_than_samples(tmp_path):
    src = write_image_dataset(tmp_path / "three", 3, size=(32, 24)).path
    result = run_shard(src, tmp_path / "out", ShardOptions(processes=1), quiet=True)
    assert result.shards_total == 3 and [len(tar_keys(p)) for p in sorted((tmp_path / "out").glob("*.tar"))] == [1, 1, 1]


def test_the_card_shows_a_loader_for_several_workers(exports):
    card = (exports["webdataset"] / "README.md").read_text()
    assert "nodesplitter=wds.split_by_node" in card and "num_workers=" in card and "with_epoch" in card
    assert "sizes.json" in card and "{00000..00007}.tar" in card


# -- datasets.load_dataset(DIR) ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FORMATS))
def test_load_dataset_reads_every_export_format(exports, tmp_path, name):
    loaded = hf_load(exports[name], tmp_path / "hf")
    assert loaded.num_rows == N - len(FAILED)
    row = loaded[0]
    caption = row["caption"] if name == "parquet" else row["txt"]
    assert caption and (row["image"] if name == "parquet" else row["jpg"]).size == (64, 48)


def test_load_dataset_reads_the_download_directory(downloaded, tmp_path):
    card = (downloaded / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["configs"][0]["data_files"][0]["path"] == "*.tar"
    loaded = hf_load(downloaded, tmp_path / "hf")
    assert loaded.num_rows == 8  # the downloaded samples; the failed ones have rows, not images
    assert loaded[0]["jpg"].size == (640, 480) and loaded[0]["json"]["status"] == "success"
    rows = hf_load("parquet", tmp_path / "hf2", data_files=str(downloaded / "*.parquet"))  # as the card says
    assert rows.num_rows == 10


def test_a_card_in_the_download_directory_trips_no_stage(downloaded, tmp_path):
    """README.md beside the shards: the directory still opens, inspects and feeds the next stages."""
    from lenscap import api

    ds = Dataset.open(downloaded)
    assert ds.completed_ids() == [0] and ds.incomplete_ids() == [] and ds.damaged_shards() == {}
    info = inspect_dataset(downloaded)
    assert info["shards"]["complete"] == 1 and info["shards"]["incomplete"] == 0 and info["samples"] == 10
    filtered = api.filter(downloaded, tmp_path / "filtered")
    assert filtered.exit_code == 0 and filtered.samples == 10
    # a download's captions come from a bare URL list: none, so nothing to export, said with exit code 7
    empty = run_shard(downloaded, tmp_path / "export", ShardOptions(processes=1), quiet=True)
    assert (
        empty.exit_code == 7
        and empty.empty
        and empty.left_out == {"download: failed_to_download": 1, "download: failed_to_resize": 1, "no caption": 8}
    )
    assert "This export is empty" in (tmp_path / "export" / "README.md").read_text()


# -- inspect and report on an export -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FORMATS))
def test_inspect_understands_an_export(exports, name):
    info = inspect_dataset(exports[name])
    assert info["stage"] == "shard"
    assert info["shards"] == {"complete": 8, "incomplete": 0, "damaged": 0, "expected": 8}
    assert info["samples"] == N - len(FAILED) and info["status"] == {"success": N - len(FAILED)}
    index = json.loads((exports[name] / "shards.json").read_text())
    assert info["bytes"]["shards"] == index["bytes"] and info["export"]["format"] == name
    assert info["export"]["sizes_json"] is (name == "webdataset") and info["export"]["card"] is True
    assert info["outcomes"] == {"status": {"success": N - len(FAILED)}, "left_out": {"download: failed_to_download": 2}}
    assert info["caption_words"]["count"] == N - len(FAILED)
    assert info["errors"] == {} and info["skips"] == {}


def test_inspect_names_a_damaged_export_file(source, tmp_path):
    run_shard(source, tmp_path / "out", ShardOptions(min_shards=2, processes=1), quiet=True)
    (tmp_path / "out" / "00001.tar").write_bytes(b"")
    info = inspect_dataset(tmp_path / "out")
    assert info["shards"]["complete"] == 1 and info["shards"]["damaged"] == 1
    assert info["damaged_shards"] == {
        "00001.tar": f"has 0 bytes, not the {json.loads((tmp_path / 'out' / 'shards.json').read_text())['shards'][1]['bytes']} written"
    }


@pytest.mark.parametrize("name", list(FORMATS))
def test_report_on_an_export_with_sample_0_and_with_samples(exports, tmp_path, name):
    code, out, err = run_cli_here("report", str(exports[name]), "--sample", "0", "--out", str(tmp_path / "zero.html"), "--json")
    assert code == 0, err
    assert json.loads(out)["samples_shown"] == 0
    html = (tmp_path / "zero.html").read_text()
    assert "<img " not in html and "8 complete" in html and "left out of the export" in html
    code, out, err = run_cli_here("report", str(exports[name]), "--sample", "5", "--out", str(tmp_path / "five.html"), "--json")
    assert code == 0, err
    assert json.loads(out)["samples_shown"] == 5 and (tmp_path / "five.html").read_text().count("alt='sample ") == 5


def test_inspect_cli_on_an_export(exports):
    code, out, err = run_cli_here("inspect", str(exports["webdataset"]), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["shards"]["complete"] == 8 and info["samples"] == N - len(FAILED)


# -- one cost figure -------------------------------------------------------------------------------


def test_caption_and_inspect_agree_on_spent_usd_when_answers_come_from_the_cache(tmp_path, monkeypatch):
    """A rerun whose answers all come from the response cache spends nothing: caption --json says
    spent_usd 0 and inspect says the same; what the cached answers cost when first asked is cached_usd."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("LENSCAP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    src = write_image_dataset(tmp_path / "in", 6, per_shard=3, size=(64, 48), failed=lambda i: i == 2).path
    with FakeOpenAI(FakeSettings(api_key=KEY)) as fake:
        summaries = {}
        for name in ("first", "again"):
            code, out, err = run_cli_here(
                "caption", str(src), str(tmp_path / name), "--base-url", fake.base_url, "--json", "--quiet"
            )
            assert code == 0, err
            summaries[name] = json.loads(out)
        assert fake.stats()["requests"] == 5  # the rerun asked nothing
    first, again = inspect_dataset(tmp_path / "first"), inspect_dataset(tmp_path / "again")
    assert summaries["first"]["spent_usd"] > 0
    for name, summary in summaries.items():  # the same figure, said the same way (summaries round money alike)
        code, out, err = run_cli_here("inspect", str(tmp_path / name), "--json")
        assert code == 0, err
        assert json.loads(out)["caption_cost"]["spent_usd"] == summary["spent_usd"]
    assert first["caption_cost"]["spent_usd"] == pytest.approx(summaries["first"]["spent_usd"], abs=1e-4)
    assert first["caption_cost"]["cached_usd"] == 0 and first["caption_cost"]["cached_answers"] == 0
    assert summaries["again"]["spent_usd"] == 0
    assert again["caption_cost"]["spent_usd"] == 0 == again["caption_cost"]["usd"]
    assert again["caption_cost"]["cached_answers"] == 5
    assert again["caption_cost"]["cached_usd"] == pytest.approx(first["caption_cost"]["spent_usd"], abs=1e-6)
    assert again["caption_cost"]["input_tokens"] == 0  # tokens of the requests paid for
    # the skipped sample (a failed download) is a skip, not an error
    assert again["errors"] == {"HTTP Error 404: Not Found": 1}
    assert again["skips"] == {"caption: no image (download status: failed_to_download)": 1}
