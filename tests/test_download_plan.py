"""The download's plan: a lopsided list's hosts interleave in every shard, the same list gives the same
plan, and a list whose hosts are even keeps its own order."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lenscap.core.dataset import Dataset
from lenscap.download import plan
from lenscap.download.command import _Job, _split_input
from lenscap.download.hosts import host_of
from lenscap.download.inputs import InputSpec


def _split(tmp_path: Path, name: str, urls: list[str], samples_per_shard: int) -> list[list[dict]]:
    (tmp_path / f"{name}.txt").write_text("".join(u + "\n" for u in urls))
    job = _Job(Dataset.create(tmp_path / name))
    shards = _split_input(job, InputSpec(str(tmp_path / f"{name}.txt")), samples_per_shard)["shards"]
    assert not (job.work / "plan").exists(), "the spill files are removed"
    return [pq.read_table(job.input_dir / f"{i:05d}.parquet").to_pylist() for i in range(shards)]


def _lopsided() -> list[str]:
    """400 URLs on one host and 40 on each of 7 others, grouped by host as a list sorted by URL is."""
    small = [f"http://img.site{h}.org/{i}.jpg" for h in range(7) for i in range(40)]
    return [f"http://cdn{i % 3}.bigcdn.com/p/{i}.jpg" for i in range(400)] + small


def test_a_lopsided_list_puts_every_host_in_every_shard_at_its_share(tmp_path):
    shards = _split(tmp_path, "a", _lopsided(), samples_per_shard=100)
    assert [len(s) for s in shards] == [100] * 6 + [80]
    for rows in shards[:6]:
        hosts = Counter(host_of(r["url"]) for r in rows)
        assert abs(hosts["bigcdn.com"] - 100 * 400 / 680) <= 1.5, hosts  # its share of the list, in every shard
        assert all(abs(hosts[f"site{h}.org"] - 100 * 40 / 680) <= 1.5 for h in range(7)), hosts
    # Within a shard too: no 20 consecutive URLs of one host.
    planned = [host_of(r["url"]) for rows in shards for r in rows]
    assert min(len(set(planned[i : i + 20])) for i in range(len(planned) - 20)) >= 4
    # Every row once, and its row of the list kept.
    rows = sorted((r for s in shards for r in s), key=lambda r: r["lenscap_row"])
    assert [r["url"] for r in rows] == _lopsided() and [r["lenscap_row"] for r in rows] == list(range(680))


def test_the_same_list_gives_the_same_plan(tmp_path):
    assert _split(tmp_path, "a", _lopsided(), 64) == _split(tmp_path, "b", _lopsided(), 64)


@pytest.mark.parametrize(
    "urls",
    [
        [f"http://one.example.com/{i}.jpg" for i in range(50)],  # one host
        [f"http://site{i}.example.com/x.jpg" for i in range(50)],  # one URL per host
        [f"http://h{i % 5}.example.com/{i}.jpg" for i in range(50)],  # already interleaved, round-robin
    ],
    ids=["one-host", "host-per-url", "round-robin"],
)
def test_an_even_list_keeps_its_order_counted_or_planned_by_duckdb(tmp_path, monkeypatch, urls):
    assert [r["url"] for s in _split(tmp_path, "counted", urls, 8) for r in s] == urls
    monkeypatch.setattr(plan, "HOSTS_COUNTED", 0)  # too many hosts to count: DuckDB plans it
    assert [r["url"] for s in _split(tmp_path, "planned", urls, 8) for r in s] == urls


def test_duckdb_plans_what_the_shortcut_would(tmp_path, monkeypatch):
    spilled = plan.spill([pa.table({"url": _lopsided()})], tmp_path / "list", pa.concat_tables)
    assert not spilled.in_list_order and spilled.hosts == {"bigcdn.com": 400} | {f"site{h}.org": 40 for h in range(7)}
    monkeypatch.setattr(plan, "HOSTS_COUNTED", 0)
    uncounted = plan.spill([pa.table({"url": _lopsided()})], tmp_path / "list2", pa.concat_tables)
    assert uncounted.hosts is None and not uncounted.in_list_order
    first = pa.concat_tables(plan.planned(spilled, tmp_path / "w1"))
    assert first.equals(pa.concat_tables(plan.planned(uncounted, tmp_path / "w2")))
    assert first.column_names == ["url", plan.ROW]


def test_url_hosts_names_each_url_as_host_of_does():
    urls = [
        "http://a.b.example.co.uk/x.jpg",
        "HTTPS://CDN.Example.co.uk:8443/y?z#w",
        "http://user:pw@127.0.0.5:80/a",
        "http://[::1]:8080/a.jpg",
        "http://localhost/a",
        "  http://padded.example.com/a  ",
        "ftp://files.example.net/a",
        "example.com/no-scheme.jpg",
        "not-utf8:%ff",
        "",
        None,
        "http://bucket.s3.amazonaws.com/k",
    ]
    assert plan.url_hosts(pa.array(urls, pa.string())).to_pylist() == [host_of(u) for u in urls]
