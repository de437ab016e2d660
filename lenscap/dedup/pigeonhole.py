"""Near-duplicate search on 64-bit hashes by the pigeonhole table method, as DuckDB queries.

Split the 64 bits into ``m`` blocks. Two hashes within Hamming distance ``r`` differ in at most
``r`` blocks, so they agree exactly on at least ``m - r``: on every one of the ``C(m, r)`` choices
of ``m - r`` blocks ("tables") that avoids their differing blocks. Each table is a GROUP BY on the
concatenated blocks (a key of about ``64 (m - r) / m`` bits); only hashes sharing a key are compared,
by popcount. A pair is emitted by the first table (in combination order) on which it agrees, so each
pair comes out once however many tables it shares.

``m`` is chosen per run from the number of hashes: more blocks mean more tables (more scans) but
longer keys (fewer chance candidates). Each table is processed in partitions on the leading bits of
its first block, from a copy of the hashes sorted on those bits, so one GROUP BY works on a slice
that stays in cache and DuckDB reads only that slice; the copies are ordinary DuckDB tables, which
spill to disk under the memory limit.

A key shared by more than ``bucket_cap`` hashes (templates, near-blank images that escaped the
degenerate check) is not expanded, since its pairs grow with the square of its size; such buckets
are returned so the report can name them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["PigeonholePlan", "near_pairs", "table_pairs", "create_outputs"]

# Relative cost of a chance candidate pair (join, popcount) against scanning one hash in one table.
_CANDIDATE_COST = 4.0


@dataclass(frozen=True)
class PigeonholePlan:
    max_distance: int
    blocks: tuple[tuple[int, int], ...]  # (first bit counted from the most significant, width)
    tables: tuple[tuple[int, ...], ...]  # block combinations, each a join key
    partition_bits: int

    @classmethod
    def for_size(cls, n: int, max_distance: int, rows_per_partition: int = 1_000_000) -> PigeonholePlan:
        """The plan with the least estimated work for ``n`` hashes (uniformly distributed)."""
        r = max_distance
        if not 0 <= r <= 16:
            raise ValueError(f"max distance must be between 0 and 16, not {r}")
        best: tuple[float, PigeonholePlan] | None = None
        for m in range(r + 1, min(64, 2 * r + 3) + 1):
            plan = cls.with_blocks(n, r, m, rows_per_partition)
            if best is None or plan.estimated_work(n) < best[0]:
                best = (plan.estimated_work(n), plan)
        assert best is not None
        return best[1]

    @classmethod
    def with_blocks(cls, n: int, r: int, m: int, rows_per_partition: int = 1_000_000) -> PigeonholePlan:
        widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
        blocks = tuple((sum(widths[:i]), widths[i]) for i in range(m))
        tables = tuple(itertools.combinations(range(m), m - r))
        wanted = math.ceil(math.log2(n / rows_per_partition)) if n > rows_per_partition else 0
        return cls(r, blocks, tables, max(0, min(wanted, min(w for _, w in blocks), 12)))

    def key_bits(self, table: tuple[int, ...]) -> int:
        return sum(self.blocks[i][1] for i in table)

    def estimated_work(self, n: int) -> float:
        chance_pairs = sum(n * n / 2 / 2 ** self.key_bits(t) for t in self.tables)
        return len(self.tables) * n + _CANDIDATE_COST * chance_pairs

    # -- SQL --------------------------------------------------------------------------------------

    def block_sql(self, i: int, column: str) -> str:
        start, width = self.blocks[i]
        return f"(({column} >> {64 - start - width}) & {(1 << width) - 1}::UBIGINT)"

    def key_sql(self, table: tuple[int, ...], column: str = "h") -> str:
        parts, shift = [], 0
        for i in table:
            parts.append(f"({self.block_sql(i, column)} << {shift})")
            shift += self.blocks[i][1]
        return " | ".join(parts)

    def partition_sql(self, block: int, column: str = "h") -> str:
        width = self.blocks[block][1]
        return f"({self.block_sql(block, column)} >> {width - self.partition_bits})::USMALLINT"

    def sorted_sql(self, block: int, source: str, has_new: bool) -> str:
        """The hashes of ``source`` with their partition ``p`` on ``block``, sorted on it: a table whose
        first block is ``block`` then reads one partition's slice, not every hash, per GROUP BY."""
        cols = "uid, h" + (", has_new" if has_new else "")
        return f"SELECT {cols}, {self.partition_sql(block)} AS p FROM {source} ORDER BY p"

    def first_table_sql(self, table: tuple[int, ...], xor: str) -> str:
        """True when ``table`` is the first table on which a pair with this XOR agrees: every block
        before its last that it leaves out differs."""
        skipped = [j for j in range(max(table)) if j not in table]
        return " AND ".join(f"{self.block_sql(j, xor)} <> 0" for j in skipped) or "true"


def near_pairs(
    con: Any,
    source: str,
    plan: PigeonholePlan,
    bucket_cap: int,
    restrict: str | None = None,
    on_table: Callable[[int, int], None] | None = None,
) -> None:
    """Fill table ``near(a, b, d)`` with the pairs of rows of ``source(uid, h, ...)`` within the plan's
    distance (``a < b``), and ``capped(tbl, k, n)`` with the buckets too large to expand.

    ``restrict`` is an SQL condition over the pair ``a``/``b`` (e.g. at least one is new). ``source``
    must hold distinct ``uid``; equal hashes are grouped before this, except that dedup gives each
    image several rows (its hash and its canonical orientations' keys, ``search._near_edges``), keeps
    pairs of one image's rows out with ``restrict``, and reduces the row pairs to image pairs. At
    distance 0 the one table pairs equal hashes.
    """
    create_outputs(con)
    partitions = 1 << plan.partition_bits
    firsts = sorted({t[0] for t in plan.tables})
    sorted_copies = {}
    for i in firsts:
        if partitions == 1:
            sorted_copies[i] = source
            continue
        sorted_copies[i] = f"ph_sorted_{i}"
        con.execute(f"CREATE OR REPLACE TEMP TABLE ph_sorted_{i} AS {plan.sorted_sql(i, source, restrict is not None)}")
    for number, table in enumerate(plan.tables):
        table_pairs(con, plan, number, sorted_copies[table[0]], bucket_cap, restrict)
        if on_table is not None:
            on_table(number + 1, len(plan.tables))
    for i in firsts:
        if sorted_copies[i] != source:
            con.execute(f"DROP TABLE {sorted_copies[i]}")


def create_outputs(con: Any) -> None:
    con.execute("CREATE OR REPLACE TEMP TABLE near (a BIGINT, b BIGINT, d UTINYINT)")
    con.execute("CREATE OR REPLACE TEMP TABLE capped (tbl INTEGER, k UBIGINT, n BIGINT)")


def table_pairs(con: Any, plan: PigeonholePlan, number: int, rows: str, bucket_cap: int, restrict: str | None = None) -> None:
    """Add to ``near`` and ``capped`` what table ``number`` finds in ``rows``: the hashes with their
    partition ``p`` of the table's first block when the plan has partitions (``plan.sorted_sql``), a
    table or a ``read_parquet``. It finds only the pairs no earlier table finds, so the tables can
    run in any order, in any process, and their results add up to ``near_pairs``'."""
    table = plan.tables[number]
    key = plan.key_sql(table)
    partitions = 1 << plan.partition_bits
    pair_filter = f" AND ({restrict})" if restrict else ""
    for p in range(partitions):
        where = f"WHERE p = {p}" if partitions > 1 else ""
        con.execute(f"CREATE OR REPLACE TEMP TABLE ph_slice AS SELECT *, ({key}) AS k FROM {rows} {where}")
        con.execute("""CREATE OR REPLACE TEMP TABLE ph_keys AS
            SELECT k, count(*) AS n FROM ph_slice GROUP BY k HAVING count(*) > 1""")
        con.execute(f"INSERT INTO capped SELECT {number}, k, n FROM ph_keys WHERE n > {int(bucket_cap)}")
        con.execute(f"""INSERT INTO near
            WITH c AS (SELECT s.* FROM ph_slice s SEMI JOIN (SELECT k FROM ph_keys WHERE n <= {int(bucket_cap)}) USING (k))
            SELECT a.uid, b.uid, bit_count(xor(a.h, b.h)) FROM c a JOIN c b ON a.k = b.k AND a.uid < b.uid
            WHERE bit_count(xor(a.h, b.h)) <= {plan.max_distance} AND {plan.first_table_sql(table, "xor(a.h, b.h)")}{pair_filter}""")
    con.execute("DROP TABLE IF EXISTS ph_slice; DROP TABLE IF EXISTS ph_keys")
