"""The columns a stage reads from its input, checked in every input shard's parquet schema before any work.

A stage declares what it reads (``Stage.needs``: ``Column("key", "string")``, ...); the job driver checks
each input shard's schema against it (``check_shards``) before the output is touched, reading only the
parquet footers. A shard without a column the stage needs, or with one of another type, is one
``DatasetError`` naming the shard, the column and what the stage needs, instead of a ``KeyError`` or a
DuckDB error in the middle of the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa

from lenscap.core.errors import DatasetError
from lenscap.core.layout import shard_name

__all__ = ["Column", "check_schema", "check_shards", "check_same_types", "input_schemas"]

# A kind of column: the Arrow types it takes, and what a message calls it.
_KINDS: dict[str, tuple[Callable[[pa.DataType], bool], str]] = {
    # A column of nulls only (no caption yet) is a string column without values.
    "string": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t), "a string"),
    "integer": (pa.types.is_integer, "an integer"),
    "number": (lambda t: pa.types.is_integer(t) or pa.types.is_floating(t), "a number"),
    "boolean": (pa.types.is_boolean, "a boolean"),
    "any": (lambda t: True, "a column"),
}


class Shards(Protocol):
    """What is checked: a ``Dataset``, or the audit's directory of another tool's Parquet files."""

    location: str

    def read_schema(self, shard_id: int) -> pa.Schema: ...


@dataclass(frozen=True)
class Column:
    """A column a stage reads: its ``name`` and ``kind`` (string, integer, number, boolean, any). An
    ``optional`` one is read where a shard has it, and must then be of that kind."""

    name: str
    kind: str
    optional: bool = False

    def __post_init__(self) -> None:
        assert self.kind in _KINDS, self.kind

    def __str__(self) -> str:
        return f"{self.name}: {self.kind}"


def _describe(columns: Iterable[Column]) -> str:
    return ", ".join(str(c) for c in columns if not c.optional)


def check_schema(schema: pa.Schema, needs: Iterable[Column], who: str, where: str) -> None:
    """A ``DatasetError`` unless ``schema`` (``where``: "shard 00001's") has every column ``who`` needs."""
    needs = list(needs)
    for column in needs:
        index = schema.get_field_index(column.name)
        if index < 0:
            if column.optional:
                continue
            raise DatasetError(f'{where} parquet has no column "{column.name}" ({who} needs {_describe(needs)})')
        accepts, noun = _KINDS[column.kind]
        found = schema.field(index).type
        if not accepts(found):
            raise DatasetError(f'{where} column "{column.name}" is {found}, {who} needs {noun}')


def input_schemas(src: Shards, shard_ids: list[int]) -> dict[int, pa.Schema]:
    """Each shard's parquet schema (its footer only), read a few at a time: on a store, each is a request.
    A shard whose footer cannot be read is left out: it is damaged, which the claim of the output (a
    stats file that is not one) or the shard's own task (a truncated parquet) reports in its own words.
    So is a shard with no columns at all: one written with no sample, from which nothing is read."""

    def schema(shard_id: int) -> pa.Schema | None:
        try:
            return src.read_schema(shard_id)
        except DatasetError:
            return None

    with ThreadPoolExecutor(max_workers=min(16, max(1, len(shard_ids)))) as pool:
        read = dict(zip(shard_ids, pool.map(schema, shard_ids), strict=True))
    return {shard_id: s for shard_id, s in read.items() if s is not None and len(s.names) > 0}


def check_shards(src: Shards, shard_ids: list[int], needs: Iterable[Column], who: str) -> dict[int, pa.Schema]:
    """``check_schema`` of every shard of ``src`` in ``shard_ids``; returns their schemas."""
    needs = list(needs)
    schemas = input_schemas(src, shard_ids)
    for shard_id, schema in schemas.items():
        check_schema(schema, needs, who, f"{src.location}: shard {shard_name(shard_id)}'s")
    return schemas


def check_same_types(src: Shards, schemas: dict[int, pa.Schema], who: str) -> None:
    """A ``DatasetError`` unless every column has one type in all the shards of ``schemas``, which ``who``
    puts together (one shard's int64 ``width`` cannot join another's string one)."""
    first: dict[str, tuple[int, pa.DataType]] = {}
    for shard_id, schema in sorted(schemas.items()):
        for f in schema:
            seen = first.setdefault(f.name, (shard_id, f.type))
            if seen[1] != f.type:
                raise DatasetError(
                    f'{src.location}: shard {shard_name(shard_id)}\'s column "{f.name}" is {f.type}, shard '
                    f"{shard_name(seen[0])}'s is {seen[1]}: {who} puts the shards together, so a column needs one type in all"
                )
