"""The order a URL list is downloaded in: every host spread evenly over the whole job.

img2dataset downloads shard by shard, one shard per worker process, and a shard is a run of the list.
Web lists are lopsided and often grouped by host (sorted by URL, or concatenated per site): in list
order one shard can be all one host while the others wait, and a per-host rate then holds a worker
(and the end of the job) on that host alone. So the list is planned before it is cut into shards:

    a URL's place in the plan = (its rank among its host's URLs + its host's phase) / its host's URL count

where the phase is where the host first appears in the list, as a fraction of the list (in [0, 1)),
and ties go to list order. Each host's URLs are then spaced evenly over the planned list, so every
run of it (every shard, every part of a shard) holds each host in its share of the list: a host with
most of the list is in every shard, at its share, and is kept busy from the first second to the last
(the job ends near ``its URLs / its rate``); no shard is one host's unless the list is. The phase is
the host's first row rather than 0, so that small hosts do not all start together, and so that a list
with one host, or one URL per host, keeps its own order (the key of every URL is then its row / N).

Out of core: the list is streamed once into spill files with each row's number and host
(``spill``), and the plan is a DuckDB ``ORDER BY`` over them, held to ``PLAN_MEMORY`` and spilling to
disk beyond it (``planned``). A list whose plan is its own order (one host, or every URL on a host of
its own, counted while spilling for up to ``HOSTS_COUNTED`` hosts) skips DuckDB and is read back in order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lenscap.core.sql import literal, out_of_core
from lenscap.download.hosts import host_of

__all__ = ["ROW", "HOST", "PLAN_MEMORY", "HOSTS_COUNTED", "Spill", "url_hosts", "spill", "planned"]

ROW, HOST = "lenscap_row", "lenscap_host"  # the list's row number (0-based) and the URL's host
PLAN_MEMORY = "256MB"  # DuckDB's memory for the plan; beyond it the sort spills to the work directory
HOSTS_COUNTED = 1_000_000  # hosts counted while spilling (a few hundred MB at most); more: DuckDB decides
_SPILL_ROWS = 262_144  # rows per spill file
_BATCH_ROWS = 8192
# scheme://netloc: every URL of one netloc is on one host, so host_of runs once per netloc, not per URL.
_ORIGIN = r"^(?P<origin>\s*[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*)"


@dataclass
class Spill:
    """The URL list as spill files (``DIR/NNNNN.parquet``, in list order, with ``ROW`` and ``HOST``)."""

    directory: Path
    files: list[Path] = field(default_factory=list)
    rows: int = 0
    hosts: dict[str, int] | None = field(default_factory=dict)  # URLs per host; None past HOSTS_COUNTED

    @property
    def in_list_order(self) -> bool:
        """Whether the plan is the list's own order, known without planning: one host, or one URL per host."""
        return self.hosts is not None and (len(self.hosts) <= 1 or len(self.hosts) == self.rows)


def url_hosts(urls: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Each URL's host, as ``host_of`` names it."""
    urls = urls.combine_chunks() if isinstance(urls, pa.ChunkedArray) else urls
    if len(urls) == 0:
        return pa.array([], pa.string())
    origins = pc.struct_field(pc.extract_regex(urls, _ORIGIN), [0])
    distinct = pc.drop_null(pc.unique(origins))
    named = pa.array([_origin_host(o) for o in distinct.to_pylist()], pa.string())
    hosts = pc.take(named, pc.index_in(origins, value_set=distinct))
    if hosts.null_count:  # a URL without scheme://: rare, named one by one
        hosts = pa.array([h if h is not None else host_of(u) for h, u in zip(hosts.to_pylist(), urls.to_pylist())], pa.string())
    return hosts


@functools.lru_cache(maxsize=65_536)
def _origin_host(origin: str) -> str:
    return host_of(origin)


def spill(tables: Iterable[pa.Table], directory: Path, concat: Callable[[list[pa.Table]], pa.Table]) -> Spill:
    """Stream ``tables`` (the URL list, in order) into spill files with each row's number and host;
    ``concat`` joins the tables of one file (the caller's rule for columns whose types differ)."""
    directory.mkdir(parents=True, exist_ok=True)
    out = Spill(directory)
    pending: list[pa.Table] = []
    pending_rows = 0

    def flush() -> None:
        nonlocal pending, pending_rows
        table = concat(pending)
        hosts = url_hosts(table.column("url"))  # per file, not per batch: fewer, larger Arrow calls
        rows = pa.array(np.arange(out.rows - table.num_rows, out.rows, dtype=np.int64))
        path = directory / f"{len(out.files):05d}.parquet"
        pq.write_table(table.append_column(ROW, rows).append_column(HOST, hosts), path)
        out.files.append(path)
        _count(out, hosts)
        pending, pending_rows = [], 0

    for table in tables:
        pending.append(table)
        pending_rows += table.num_rows
        out.rows += table.num_rows
        if pending_rows >= _SPILL_ROWS:
            flush()
    if pending:
        flush()
    return out


def _count(out: Spill, hosts: pa.Array) -> None:
    if out.hosts is None:
        return
    counts = pc.value_counts(hosts)
    for host, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()):
        out.hosts[host] = out.hosts.get(host, 0) + n
    if len(out.hosts) > HOSTS_COUNTED:
        out.hosts = None


def planned(spilled: Spill, work: Path) -> Iterator[pa.Table]:
    """The spilled list in the order of the plan, as tables with ``ROW`` (``HOST`` dropped)."""
    if not spilled.files:
        return
    if spilled.in_list_order:
        for path in spilled.files:
            table = pq.read_table(path)
            yield table.drop_columns([HOST])
        return
    con = out_of_core(PLAN_MEMORY, work / "spill", threads=2)
    try:
        files = ", ".join(literal(p) for p in spilled.files)
        host = f"PARTITION BY {HOST}"
        query = f"""
            SELECT * EXCLUDE ({HOST}, lenscap_place) FROM (
                SELECT *, (row_number() OVER ({host} ORDER BY {ROW}) - 1
                           + min({ROW}) OVER ({host}) / {spilled.rows}::DOUBLE) / count(*) OVER ({host}) AS lenscap_place
                FROM read_parquet([{files}], union_by_name = true))
            ORDER BY lenscap_place, {ROW}"""
        for batch in con.sql(query).to_arrow_reader(_BATCH_ROWS):
            yield pa.Table.from_batches([batch])
    finally:
        con.close()
