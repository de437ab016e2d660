"""Reading URL lists: txt, csv, tsv, jsonl and parquet files, directories or globs of them, or stdin.

A URL list may also be remote: a URL on any fsspec filesystem (``s3://bucket/urls.parquet``,
``gs://bucket/lists/``, ``memory://urls.txt``), a file, a directory or a glob there too. Messages
name it without the credentials a URL may carry.

Everything is streamed as Arrow tables of at most ``batch_rows`` rows with the columns ``url``,
``caption`` and any extra columns asked for. txt, csv, tsv and parquet never become Python objects
row by row: at 800M rows that alone would cost a quarter of an hour.
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
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from lenscap.core.errors import InputError
from lenscap.core.progress import say
from lenscap.core.storage import is_remote, redact_url, url_to_fs

__all__ = ["InputSpec", "resolve_input_files", "read_url_tables", "rows_to_table", "SUPPORTED_SUFFIXES", "NOT_UTF8"]

SUPPORTED_SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl", ".parquet")
URL_COLUMN_GUESSES = ("url", "URL", "image_url", "img_url")
CAPTION_COLUMN_GUESSES = ("caption", "alt_text", "alt", "text", "TEXT")
# Columns img2dataset writes itself; an input column of the same name would be overwritten.
RESERVED_COLUMNS = frozenset(
    {
        "key",
        "caption",
        "url",
        "width",
        "height",
        "original_width",
        "original_height",
        "status",
        "error_message",
        "exif",
        "md5",
        "sha256",
        "sha512",
    }
)
_BATCH_ROWS = 8192
_JSONL_SCHEMA_RECORDS = 1000
# A txt URL list is read as a one-column csv: this separator never occurs in a URL.
_NO_DELIMITER = "\x1f"
# Whitespace, plus the byte-order mark some editors put at the start of a file.
_TRIM = " \t\r\n\ufeff"
# A txt, csv or tsv row with bytes that are not UTF-8 is a failed sample, like any other bad row: its
# URL becomes this scheme (never fetched: only http and https are) and its bytes, escaped, never
# replaced (a URL with a replacement character would be another URL). The download names it.
NOT_UTF8 = "not-utf8:"
_NOT_UTF8_COLUMN = "__lenscap_not_utf8"
# A first line of a txt list that is one of these is a header row, not a URL.
_TXT_HEADERS = ("url", "urls", "image_url", "img_url")


@dataclass(frozen=True)
class _File:
    """One input file: ``name`` to show, ``path`` to open (on ``fs``, or local when ``fs`` is None)."""

    name: str
    path: str
    fs: Any = None

    def binary(self) -> Any:
        """A file object for a remote file (gzip-decompressed for ``.gz``), or the local path: pyarrow
        opens local paths itself, faster, and decompresses ``.gz`` by the name."""
        if self.fs is None:
            return sys.stdin.buffer if self.path == "-" else self.path
        f = self.fs.open(self.path, "rb")
        return gzip.GzipFile(fileobj=f) if self.path.endswith(".gz") else f

    def text(self) -> IO[str]:
        if self.fs is None:
            return _open_text(self.path)
        # utf-8-sig: spreadsheet programs start their csv files with a byte-order mark.
        return io.TextIOWrapper(self.binary(), encoding="utf-8-sig")


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
    return [f.name for f in _input_files(source)]


def _input_files(source: str) -> list[_File]:
    if is_remote(source):
        return _remote_files(source)
    return [_File(p, p) for p in _local_files(source)]


def _supported(name: str) -> bool:
    return any(name.removesuffix(".gz").endswith(s) for s in SUPPORTED_SUFFIXES)


def _remote_files(source: str) -> list[_File]:
    shown = redact_url(source)
    fs, root = url_to_fs(source)

    def file(path: str) -> _File:
        return _File(redact_url(fs.unstrip_protocol(path)), path, fs)

    try:
        if fs.isdir(root):
            files = sorted(p for p in fs.ls(root, detail=False) if _supported(p.rsplit("/", 1)[-1]) and fs.isfile(p))
            if not files:
                raise InputError(f"{shown}: directory holds no URL list ({', '.join(SUPPORTED_SUFFIXES)})")
            return [file(p) for p in files]
        if not fs.exists(root) and any(ch in root for ch in "*?["):
            files = sorted(p for p in fs.glob(root) if fs.isfile(p))
            if not files:
                raise InputError(f"{shown}: no file matches this pattern")
            for p in files:
                _format_of(p)
            return [file(p) for p in files]
        if not fs.exists(root):
            raise InputError(f"input file {shown} does not exist")
    except OSError as e:
        raise InputError(f"cannot read {shown}: {e}") from None
    _format_of(shown)
    return [_File(shown, root, fs)]


def _local_files(source: str) -> list[str]:
    if source == "-":
        return ["-"]
    if os.path.isdir(source):
        files = sorted(str(p) for p in Path(source).iterdir() if p.is_file() and _supported(p.name))
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


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows to a table whatever their values: url and caption as text, every column with a usable type.

    A column whose values disagree on a type (JSON lines often do) is kept as text rather than
    refused; a column with no value at all is text too, so it matches the batches where it has some.
    """
    names = list(dict.fromkeys(k for r in rows for k in r))
    arrays = []
    for name in names:
        values = [r.get(name) for r in rows]
        try:
            array = pa.array(values, type=pa.string() if name in ("url", "caption") else None)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            array = pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v, default=str) for v in values])
        arrays.append(array)
    return _text_for_null(pa.Table.from_arrays(arrays, names=names))


def _text_for_null(table: pa.Table) -> pa.Table:
    for i, f in enumerate(table.schema):
        if pa.types.is_null(f.type):
            table = table.set_column(i, f.name, table.column(i).cast(pa.string()))
    return table


def _open_text(path: str) -> IO[str]:
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig")
    # utf-8-sig: spreadsheet programs start their csv files with a byte-order mark.
    return open(path, encoding="utf-8-sig")


def _csv_batches(path: str, reader_source: Any, **options: Any) -> Iterator[pa.RecordBatch]:
    try:
        yield from pacsv.open_csv(reader_source, **options)
    except pa.ArrowInvalid as e:
        if "Empty CSV file" in str(e):
            return
        raise InputError(f"{path}: cannot parse: {e}") from None
    finally:
        if not isinstance(reader_source, str) and reader_source is not sys.stdin.buffer:
            reader_source.close()  # a remote file opened for this read


def _decoded(column: pa.Array | pa.ChunkedArray) -> tuple[pa.Array | pa.ChunkedArray, pa.Array | None]:
    """A binary column as text, and which of its values were not UTF-8 (None: all were); those keep their
    bytes, escaped. Only a batch that fails the cast is looked at value by value."""
    try:
        return column.cast(pa.string()), None
    except pa.ArrowInvalid:
        values, bad = [], []
        for value in column.to_pylist():
            try:
                values.append(None if value is None else value.decode("utf-8"))
                bad.append(False)
            except UnicodeDecodeError:
                values.append(value.decode("utf-8", "backslashreplace"))
                bad.append(True)
        return pa.array(values, pa.string()), pa.array(bad)


def _mark_not_utf8(url: pa.Array | pa.ChunkedArray, bad: pa.Array | None) -> pa.Array | pa.ChunkedArray:
    return url if bad is None else pc.if_else(bad, pc.binary_join_element_wise(NOT_UTF8, url, ""), url)


def _txt(file: _File) -> tuple[list[str], Iterator[pa.Table]]:
    path = file.name

    def tables() -> Iterator[pa.Table]:
        first = True
        for batch in _csv_batches(
            path,
            file.binary(),
            read_options=pacsv.ReadOptions(column_names=["url"]),
            parse_options=pacsv.ParseOptions(delimiter=_NO_DELIMITER, quote_char=False, double_quote=False),
            convert_options=pacsv.ConvertOptions(column_types={"url": pa.binary()}, strings_can_be_null=False),
        ):
            text, bad = _decoded(batch.column(0))
            url = _mark_not_utf8(pc.utf8_trim(text, characters=_TRIM), bad)
            # Without Python scalars (converting one imports pandas): non-empty, not a comment.
            keep = pc.and_(pc.cast(pc.utf8_length(url), pa.bool_()), pc.invert(pc.starts_with(url, "#")))
            table = pa.table({"url": url}).filter(keep)
            if first and table.num_rows:
                first = False
                head = pc.utf8_lower(table.column(0).slice(0, 1))
                if pc.any(pc.is_in(head, value_set=pa.array(_TXT_HEADERS))).as_py():
                    say(f"note: {path}: its first line is a header ({table.column(0)[0]}), not a URL: skipped")
                    table = table.slice(1)
            yield table

    return ["url"], tables()


def _delimited(file: _File, delimiter: str) -> tuple[list[str], Iterator[pa.Table]]:
    path = file.name
    binary = file.binary()
    with (
        gzip.open(binary)
        if isinstance(binary, str) and binary.endswith(".gz")
        else (open(binary, "rb") if isinstance(binary, str) else binary) as f
    ):
        # Decoded a line at a time, so that only the header must be UTF-8 here: a later row that is not
        # is that row's failure (``_decoded``).
        lines = (line.decode("utf-8-sig" if i == 0 else "utf-8") for i, line in enumerate(f))
        try:
            header = next(csv.reader(lines, delimiter=delimiter), None)
        except UnicodeDecodeError:
            raise InputError(f"{path}: the header row is not valid UTF-8; save the file as UTF-8") from None
    if not header:
        raise InputError(f"{path}: empty file (a {'tsv' if delimiter == chr(9) else 'csv'} needs a header row)")

    def tables() -> Iterator[pa.Table]:
        # Every column as text: type inference per block would disagree between blocks.
        for batch in _csv_batches(
            path,
            file.binary(),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.binary() for c in header}),
        ):
            columns, any_bad = {}, None
            for name, column in zip(batch.schema.names, batch.columns):
                columns[name], bad = _decoded(column)
                if bad is not None:
                    any_bad = bad if any_bad is None else pc.or_(any_bad, bad)
            if any_bad is not None:  # a row with a cell that is not UTF-8: its URL says so (_normalise)
                columns[_NOT_UTF8_COLUMN] = any_bad
            yield pa.table(columns)

    return header, tables()


def _utf8_lines(f: IO[str], path: str) -> Iterator[str]:
    """The lines of ``f``; bytes that are not UTF-8 are refused, naming the line, as the csv reader
    refuses them, never replaced (a URL with a replacement character is another URL)."""
    n = 0
    while True:
        try:
            line = f.readline()
        except UnicodeDecodeError:
            raise InputError(f"{path}: not valid UTF-8 (after line {n}); save the file as UTF-8") from None
        if not line:
            return
        n += 1
        yield line


def _jsonl(file: _File) -> tuple[list[str], Iterator[pa.Table]]:
    # JSON lines have no header: the columns are the keys seen in the first records (writers often
    # leave out null fields, so one record is not enough).
    path = file.name
    f = file.text()
    head: list[dict[str, Any]] = []
    lineno = 0
    lines = _utf8_lines(f, path)
    for line in lines:
        lineno += 1
        if line.strip():
            head.append(_parse_json_line(path, lineno, line))
            if len(head) >= _JSONL_SCHEMA_RECORDS:
                break
    if not head:
        f.close()
        raise InputError(f"{path}: no records")

    def tables() -> Iterator[pa.Table]:
        n = lineno
        batch = head
        try:
            for line in lines:
                n += 1
                if line.strip():
                    batch.append(_parse_json_line(path, n, line))
                    if len(batch) >= _BATCH_ROWS:
                        yield rows_to_table(batch)
                        batch = []
            if batch:
                yield rows_to_table(batch)
        finally:
            f.close()

    return list(dict.fromkeys(k for record in head for k in record)), tables()


def _parse_json_line(path: str, lineno: int, line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}:{lineno}: expected a JSON object per line")
    return obj


def _parquet(file: _File) -> tuple[list[str], Iterator[pa.Table]]:
    path = file.name
    try:
        pf = pq.ParquetFile(file.binary())
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names

    def tables() -> Iterator[pa.Table]:
        try:
            for batch in pf.iter_batches(batch_size=_BATCH_ROWS):
                yield pa.Table.from_batches([batch])
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"{path}: cannot read ({e})") from None
        finally:
            if file.fs is not None:
                pf.close(force=True)  # a remote file opened for this read

    return names, tables()


def _pick(columns: list[str], explicit: str | None, guesses: tuple[str, ...], what: str, path: str) -> str | None:
    if explicit is not None:
        if explicit not in columns:
            raise InputError(f"{path}: no {what} column {explicit!r} (columns: {', '.join(columns) or 'none'})")
        return explicit
    return next((c for c in guesses if c in columns), None)


def _as_text(column: pa.ChunkedArray | pa.Array, name: str, path: str) -> pa.ChunkedArray | pa.Array:
    if pa.types.is_string(column.type):
        return column
    try:
        return column.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise InputError(f"{path}: column {name!r} is {column.type}, not text") from None


def _normalise(table: pa.Table, url_col: str, caption_col: str | None, extras: list[str], path: str) -> pa.Table:
    def column(name: str | None) -> pa.ChunkedArray | pa.Array:
        # A JSON-lines batch may lack a key altogether: its values are null.
        if name is None or name not in table.column_names:
            return pa.nulls(table.num_rows, pa.string())
        return table.column(name)

    url = pc.utf8_trim(_as_text(column(url_col), url_col, path), characters=_TRIM)
    if _NOT_UTF8_COLUMN in table.column_names:
        url = _mark_not_utf8(url, table.column(_NOT_UTF8_COLUMN))
    columns = {
        "url": url,
        "caption": _as_text(column(caption_col), str(caption_col), path),
    }
    for extra in extras:
        columns[extra] = column(extra)
    return _text_for_null(pa.table(columns))


def read_url_tables(spec: InputSpec, batch_rows: int = _BATCH_ROWS) -> Iterator[pa.Table]:
    """Tables with the columns url, caption and ``spec.extra_cols``, in input order, of at most ``batch_rows`` rows."""
    bad_extras = sorted(set(spec.extra_cols) & RESERVED_COLUMNS)
    if bad_extras:
        raise InputError(f"--extra-cols cannot include {', '.join(bad_extras)}: lenscap writes those columns itself")
    total = 0
    for file in _input_files(spec.source):
        path = file.name
        fmt = "txt" if path == "-" else _format_of(path)
        if fmt == "txt":
            if spec.caption_col or spec.extra_cols or spec.url_col not in (None, "url"):
                raise InputError(
                    f"{path}: a .txt URL list has no columns; use csv, tsv, jsonl or parquet for captions and extra columns"
                )
            columns, tables = _txt(file)
        elif fmt in ("csv", "tsv"):
            columns, tables = _delimited(file, "," if fmt == "csv" else "\t")
        elif fmt == "jsonl":
            columns, tables = _jsonl(file)
        else:
            columns, tables = _parquet(file)
        url_col = _pick(columns, spec.url_col, URL_COLUMN_GUESSES, "URL", path)
        if url_col is None:
            raise InputError(f"{path}: no URL column found (columns: {', '.join(columns)}); name it with --url-col")
        caption_col = _pick(columns, spec.caption_col, CAPTION_COLUMN_GUESSES, "caption", path)
        for extra in spec.extra_cols:
            _pick(columns, extra, (), "extra", path)
        for table in tables:
            table = _normalise(table, url_col, caption_col, spec.extra_cols, path)
            for offset in range(0, table.num_rows, batch_rows):
                part = table.slice(offset, batch_rows)
                total += part.num_rows
                yield part
    if total == 0:
        raise InputError(f"{redact_url(spec.source)}: the input holds no URLs")
