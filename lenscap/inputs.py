"""Reading URL lists: txt, csv, tsv, jsonl and parquet files, directories or globs of them, or stdin.

Everything is streamed in record batches and cut into per-shard parquet files, so memory holds one
shard whatever the size of the list.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from lenscap.errors import InputError

__all__ = ["InputSpec", "resolve_input_files", "read_url_batches", "SUPPORTED_SUFFIXES"]

SUPPORTED_SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl", ".parquet")
URL_COLUMN_GUESSES = ("url", "URL", "image_url", "img_url")
CAPTION_COLUMN_GUESSES = ("caption", "alt_text", "alt", "text", "TEXT")
# Columns img2dataset writes itself; an input column of the same name would be overwritten.
RESERVED_COLUMNS = frozenset(
    {"key", "caption", "url", "width", "height", "original_width", "original_height", "status",
     "error_message", "exif", "md5", "sha256", "sha512"}
)
_BATCH_ROWS = 8192
_JSONL_SCHEMA_RECORDS = 1000


@dataclass
class InputSpec:
    """Where the URLs come from and which columns to take."""

    source: str
    url_col: str | None = None
    caption_col: str | None = None
    extra_cols: list[str] = field(default_factory=list)


def _format_of(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return suffix[1:]
    raise InputError(f"{path}: unsupported input format (use one of {', '.join(SUPPORTED_SUFFIXES)}, optionally .gz)")


def resolve_input_files(source: str) -> list[str]:
    """The files named by ``source``: a file, a directory (its supported files) or a glob; '-' is stdin."""
    if source == "-":
        return ["-"]
    if os.path.isdir(source):
        files = sorted(
            str(p) for p in Path(source).iterdir()
            if p.is_file() and any(p.name.removesuffix(".gz").endswith(s) for s in SUPPORTED_SUFFIXES)
        )
        if not files:
            raise InputError(f"{source}: directory holds no URL list ({', '.join(SUPPORTED_SUFFIXES)})")
        return files
    if not os.path.exists(source) and any(ch in source for ch in "*?["):
        files = sorted(p for p in glob.glob(source) if os.path.isfile(p))
        if not files:
            raise InputError(f"{source}: no file matches this pattern")
        for f in files:
            _format_of(f)
        return files
    if not os.path.exists(source):
        raise InputError(f"input file {source} does not exist")
    _format_of(source)
    return [source]


def _open_text(path: str) -> IO[str]:
    if path == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="replace")
    # utf-8-sig: spreadsheet programs start their csv files with a byte-order mark.
    return open(path, encoding="utf-8-sig", errors="replace")


def _batches_txt(path: str) -> Iterator[tuple[list[str], Iterator[dict[str, Any]]]]:
    def rows() -> Iterator[dict[str, Any]]:
        with _open_text(path) as f:
            for line in f:
                url = line.strip()
                if url and not url.startswith("#"):
                    yield {"url": url}

    yield ["url"], rows()


def _batches_csv(path: str, delimiter: str) -> Iterator[tuple[list[str], Iterator[dict[str, Any]]]]:
    with _open_text(path) as f:
        header = next(csv.reader(f, delimiter=delimiter), None)
    if not header:
        raise InputError(f"{path}: empty file (a {('tsv' if delimiter == chr(9) else 'csv')} needs a header row)")

    def rows() -> Iterator[dict[str, Any]]:
        try:
            # Every column as text: type inference per block would disagree between blocks.
            reader = pacsv.open_csv(
                path if path != "-" else sys.stdin.buffer,
                parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in header}),
            )
            for batch in reader:
                yield from batch.to_pylist()
        except pa.ArrowException as e:
            raise InputError(f"{path}: cannot parse: {e}") from None

    yield header, rows()


def _batches_jsonl(path: str) -> Iterator[tuple[list[str], Iterator[dict[str, Any]]]]:
    # JSON lines have no header: the columns are the keys seen in the first records (writers often
    # leave out null fields, so one record is not enough).
    f = _open_text(path)
    head: list[dict[str, Any]] = []
    lineno = 0
    for line in f:
        lineno += 1
        if line.strip():
            head.append(_parse_json_line(path, lineno, line))
            if len(head) >= _JSONL_SCHEMA_RECORDS:
                break
    if not head:
        f.close()
        raise InputError(f"{path}: no records")

    def rows() -> Iterator[dict[str, Any]]:
        n = lineno
        try:
            yield from head
            for line in f:
                n += 1
                if line.strip():
                    yield _parse_json_line(path, n, line)
        finally:
            f.close()

    yield list(dict.fromkeys(k for record in head for k in record)), rows()


def _parse_json_line(path: str, lineno: int, line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}:{lineno}: expected a JSON object per line")
    return obj


def _batches_parquet(path: str, columns: list[str] | None) -> Iterator[tuple[list[str], Iterator[dict[str, Any]]]]:
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names

    def rows() -> Iterator[dict[str, Any]]:
        wanted = [c for c in (columns or names) if c in names]
        try:
            for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=wanted):
                yield from batch.to_pylist()
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"{path}: cannot read ({e})") from None

    yield names, rows()


def _pick(columns: list[str], explicit: str | None, guesses: tuple[str, ...], what: str, path: str) -> str | None:
    if explicit is not None:
        if explicit not in columns:
            raise InputError(f"{path}: no {what} column {explicit!r} (columns: {', '.join(columns) or 'none'})")
        return explicit
    return next((c for c in guesses if c in columns), None)


def read_url_batches(spec: InputSpec, batch_rows: int = _BATCH_ROWS) -> Iterator[list[dict[str, Any]]]:
    """Rows ``{"url", "caption", *extra_cols}`` in input order, in lists of at most ``batch_rows``."""
    bad_extras = sorted(set(spec.extra_cols) & RESERVED_COLUMNS)
    if bad_extras:
        raise InputError(f"--extra-cols cannot include {', '.join(bad_extras)}: lenscap writes those columns itself")
    total = 0
    batch: list[dict[str, Any]] = []
    for path in resolve_input_files(spec.source):
        fmt = "txt" if path == "-" else _format_of(path)
        if fmt == "txt":
            if spec.caption_col or spec.extra_cols or spec.url_col not in (None, "url"):
                raise InputError(f"{path}: a .txt URL list has no columns; use csv, tsv, jsonl or parquet for captions and extra columns")
            sources = _batches_txt(path)
        elif fmt in ("csv", "tsv"):
            sources = _batches_csv(path, "," if fmt == "csv" else "\t")
        elif fmt == "jsonl":
            sources = _batches_jsonl(path)
        else:
            wanted = [c for c in (spec.url_col, spec.caption_col, *spec.extra_cols) if c]
            sources = _batches_parquet(path, (wanted + list(URL_COLUMN_GUESSES + CAPTION_COLUMN_GUESSES)) if wanted else None)
        for columns, rows in sources:
            url_col = _pick(columns, spec.url_col, URL_COLUMN_GUESSES, "URL", path)
            if url_col is None:
                raise InputError(f"{path}: no URL column found (columns: {', '.join(columns)}); name it with --url-col")
            caption_col = _pick(columns, spec.caption_col, CAPTION_COLUMN_GUESSES, "caption", path)
            for extra in spec.extra_cols:
                _pick(columns, extra, (), "extra", path)
            for row in rows:
                url = row.get(url_col)
                caption = row.get(caption_col) if caption_col else None
                out = {"url": None if url is None else str(url).strip(),
                       "caption": None if caption is None else str(caption)}
                for extra in spec.extra_cols:
                    out[extra] = row.get(extra)
                batch.append(out)
                if len(batch) >= batch_rows:
                    total += len(batch)
                    yield batch
                    batch = []
    if batch:
        total += len(batch)
        yield batch
    if total == 0:
        raise InputError(f"{spec.source}: the input holds no URLs")
