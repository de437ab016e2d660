"""The dataset card: ``README.md`` with the Hugging Face Hub's YAML front matter.

The front matter names the data files (so ``datasets.load_dataset(OUT)`` and the Hub's viewer find
them), the size category and the features; the body says what is inside, how the captions look,
what was left out and why, and the pipeline that made it, from the manifest's history. The licence
is left for the user: lenscap cannot know the rights in the images and their text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from lenscap import __version__
from lenscap.dataset import Dataset
from lenscap.journal import atomic_write_bytes

__all__ = ["write_card"]

_HF_DTYPES = {pa.string(): "string", pa.large_string(): "large_string", pa.bool_(): "bool", pa.float32(): "float32",
              pa.float64(): "float64", pa.int8(): "int8", pa.int16(): "int16", pa.int32(): "int32", pa.int64(): "int64",
              pa.uint8(): "uint8", pa.uint16(): "uint16", pa.uint32(): "uint32", pa.uint64(): "uint64", pa.binary(): "binary"}


def _size_category(n: int) -> str:
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
    return next((label for bound, label in bounds if n < bound), "1B<n<10B")


def _caption_stats(index_dir: Path, columns: pa.Schema) -> dict[str, Any]:
    import duckdb

    index = Dataset(index_dir)
    files = [str(index.parquet_path(i)) for i in index.completed_ids()]
    if not files:
        return {"count": 0}
    con = duckdb.connect()
    try:
        words = "len(regexp_split_to_array(trim(caption), '\\s+'))"
        count, mean, p50, p95, longest = con.execute(
            f"SELECT count(*), avg({words}), quantile_disc({words}, 0.5), quantile_disc({words}, 0.95), max({words}) "
            "FROM read_parquet(?)", [files]).fetchall()[0]
        hist = con.execute(f"SELECT least({words} // 10 * 10, 200) AS b, count(*) FROM read_parquet(?) GROUP BY b ORDER BY b",
                           [files]).fetchall()
        models = []
        if "caption_model" in columns.names:
            models = con.execute("SELECT coalesce(caption_model, '(original text)'), count(*) FROM read_parquet(?) "
                                 "GROUP BY 1 ORDER BY 2 DESC", [files]).fetchall()
    finally:
        con.close()
    return {"count": count, "mean": round(mean or 0, 1), "p50": p50, "p95": p95, "max": longest, "histogram": hist, "models": models}


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError


def write_card(out: Path, format_name: str, summary: dict[str, Any], history: list[dict[str, Any]], index_dir: Path,
               columns: pa.Schema, location: str | None = None) -> None:
    """Write ``out/README.md``. ``location``: where the export is read from, when not ``out`` (a remote
    output's URL, whose files are uploaded from the local ``out``)."""
    n = summary["samples"]
    files = "data/train-*.parquet" if format_name == "parquet" else "*.tar"
    stats = _caption_stats(index_dir, columns)
    where = location.rstrip("/") if location is not None else str(out.resolve())
    lines = ["---", "# Set the licence of these images and captions here: lenscap cannot know it.", "license: other",
             f"pretty_name: {json.dumps(where.rsplit('/', 1)[-1])}", "task_categories:", "- text-to-image", "- image-to-text",
             "size_categories:", f"- {_size_category(n)}", "configs:", "- config_name: default", "  data_files:",
             "  - split: train", f"    path: {json.dumps(files)}"]
    if format_name == "parquet":
        lines += ["dataset_info:", "  features:", "  - name: key", "    dtype: string", "  - name: image", "    dtype: image"]
        for f in columns:
            if f.type in _HF_DTYPES:
                lines += [f"  - name: {f.name}", f"    dtype: {_HF_DTYPES[f.type]}"]
        lines += ["  splits:", "  - name: train", f"    num_bytes: {summary['bytes']}", f"    num_examples: {n}"]
    lines += ["tags:", "- lenscap", "- image-captioning", "---", ""]

    body = [f"# {where.rsplit('/', 1)[-1]}", "",
            f"Image-text pairs exported by lenscap {__version__}: {n:,} samples in "
            f"{len(summary['shards'])} {format_name} shards, {_human(summary['bytes'])}.", "",
            "## Files", ""]
    if format_name == "parquet":
        body += ["`data/train-NNNNN-of-MMMMM.parquet`: one row per sample; `image` is the `datasets` Image feature "
                 "(`{bytes, path}`), decoded on access.", ""]
    else:
        body += ["`NNNNN.tar`: WebDataset shards; each sample is `KEY.jpg` (the image), `KEY.txt` (the caption) and "
                 "`KEY.json` (the other columns).", ""]
    body += ["`shards.json` lists every file with its sample count, for random access and sharded loading.", "",
             "| column | type |", "| --- | --- |", "| key | string |"]
    if format_name == "parquet":
        body.append("| image | image |")
    body += [f"| {f.name} | {f.type} |" for f in columns] + [""]
    if stats["count"]:
        body += ["## Captions", "", f"{stats['count']:,} captions: {stats['mean']} words on average, median {stats['p50']}, "
                 f"95th percentile {stats['p95']}, longest {stats['max']}.", "", "| words | captions |", "| --- | --- |"]
        body += [f"| {b}-{b + 9}{'+' if b == 200 else ''} | {c:,} |" for b, c in stats["histogram"]] + [""]
        if stats["models"]:
            body += ["| caption model | captions |", "| --- | --- |"] + [f"| {m} | {c:,} |" for m, c in stats["models"]] + [""]
    if summary["left_out"]:
        body += ["## Left out", "", "Samples of the input that are not in these shards, by reason:", "",
                 "| reason | samples |", "| --- | --- |"] + [f"| {r} | {c:,} |" for r, c in summary["left_out"].items()] + [""]
    body += ["## How it was made", "", "The lenscap stages that produced it, in order (from `lenscap.json`):", ""]
    for step, h in enumerate(history, 1):
        params = {k: v for k, v in (h.get("parameters") or {}).items() if v not in (None, {}, [])}
        body.append(f"{step}. `{h.get('stage')}` {json.dumps(params, default=str)[:400]}")
    body += ["", "## Loading", "", "```python", "from datasets import load_dataset", ""]
    if location is None:
        body += [f"ds = load_dataset({json.dumps(where)}, split=\"train\")", "```", ""]
    else:  # a URL: datasets reads it through fsspec as data files (credentials from the environment)
        builder = "parquet" if format_name == "parquet" else "webdataset"
        body += [f"ds = load_dataset({json.dumps(builder)}, data_files={json.dumps(where + '/' + files)}, split=\"train\")",
                 "```", ""]
    if format_name == "webdataset" and location is None:  # webdataset opens local paths and http(s), not every fsspec URL
        last = max(len(summary["shards"]) - 1, 0)
        urls = json.dumps(f"{out.resolve()}/{{00000..{last:05d}}}.tar")
        body += ["```python", "import webdataset as wds", "",
                 f'ds = wds.WebDataset({urls}).decode("pil").to_tuple("jpg", "txt")', "```", ""]
    body += ["## Licence", "", "Not set. Fill in the licence under which you may share these images and captions, "
             "and the `license` field above.", ""]
    atomic_write_bytes(out / "README.md", "\n".join(lines + body).encode())
