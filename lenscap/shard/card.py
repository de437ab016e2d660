"""The dataset card: ``README.md`` with the Hugging Face Hub's YAML front matter.

The front matter names the data files (so ``datasets.load_dataset(OUT)`` and the Hub's viewer find
them), the size category and the features; the body says what is inside, how the captions look,
what was left out and why, and the pipeline that made it, from the manifest's history. The licence
is left for the user: lenscap cannot know the rights in the images and their text.

This is an export's card (``lenscap shard``); ``lenscap.download.card`` writes a download's, and
``lenscap.core.card`` holds what both share.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from lenscap import __version__
from lenscap.core.card import LICENCE, front_matter, human
from lenscap.core.dataset import Dataset
from lenscap.core.storage import is_remote
from lenscap.shard.formats import ExportFormat

__all__ = ["write_card"]


def _caption_stats(index: Dataset, columns: pa.Schema) -> dict[str, Any]:
    import duckdb  # DuckDB takes a quarter second to import: only where a query runs

    files = [str(index.parquet_path(i)) for i in index.completed_ids()]
    if not files:
        return {"count": 0}
    con = duckdb.connect()
    try:
        words = "len(regexp_split_to_array(trim(caption), '\\s+'))"
        count, mean, p50, p95, longest = con.execute(
            f"SELECT count(*), avg({words}), quantile_disc({words}, 0.5), quantile_disc({words}, 0.95), max({words}) "
            "FROM read_parquet(?)",
            [files],
        ).fetchall()[0]
        hist = con.execute(
            f"SELECT least({words} // 10 * 10, 200) AS b, count(*) FROM read_parquet(?) GROUP BY b ORDER BY b", [files]
        ).fetchall()
        models = []
        if "caption_model" in columns.names:
            # The prompt each model was sent: none where the backend reads none (describe); "-" for text
            # no caption stage wrote.
            prompt = "caption_prompt" if "caption_prompt" in columns.names else "NULL"
            models = con.execute(
                "SELECT coalesce(caption_model, '(original text)'), "
                f"CASE WHEN caption_model IS NULL THEN '-' ELSE coalesce({prompt}, 'none') END, count(*) "
                "FROM read_parquet(?) GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2",
                [files],
            ).fetchall()
    finally:
        con.close()
    return {
        "count": count,
        "mean": round(mean or 0, 1),
        "p50": p50,
        "p95": p95,
        "max": longest,
        "histogram": hist,
        "models": models,
    }


def write_card(
    url: str,
    fmt: type[ExportFormat],
    summary: dict[str, Any],
    history: list[dict[str, Any]],
    index: Dataset,
    columns: pa.Schema,
) -> str:
    """The card of the export at ``url`` (a local path or a remote URL) in format ``fmt``: ``README.md``'s text."""
    n = summary["samples"]
    remote = is_remote(url)
    where = url.rstrip("/") if remote else str(Path(url).resolve())
    name = where.rsplit("/", 1)[-1]
    features = fmt.card_features(columns)
    split = ["  splits:", "  - name: train", f"    num_bytes: {summary['bytes']}", f"    num_examples: {n}"]
    lines = front_matter(name, n, fmt.data_files, None if features is None else features + split)
    shards = len(summary["shards"])
    body = [f"# {name}", ""]
    if n == 0:
        body += [
            "**This export is empty**: none of the input's samples was exported (see *Left out* for why), so "
            "there is nothing here to train on, and `load_dataset` finds no data files.",
            "",
        ]
    body += [
        f"Image-text pairs exported by lenscap {__version__}: {n:,} samples in "
        f"{shards} {fmt.name} shards, {human(summary['bytes'])}.",
        "",
    ]
    body += _files(fmt, columns) + _captions(_caption_stats(index, columns)) + _left_out(summary["left_out"])
    body += _history(history) + _loading(fmt, where, shards, remote)
    return "\n".join(lines + body + LICENCE)


def _files(fmt: type[ExportFormat], columns: pa.Schema) -> list[str]:
    return [
        "## Files",
        "",
        *fmt.card_files(),
        "`shards.json` lists every file with its sample count, for random access and sharded loading.",
        "",
        "| column | type |",
        "| --- | --- |",
        "| key | string |",
        *fmt.card_columns(),
        *(f"| {f.name} | {f.type} |" for f in columns),
        "",
    ]


def _captions(stats: dict[str, Any]) -> list[str]:
    if not stats["count"]:
        return []
    lines = [
        "## Captions",
        "",
        f"{stats['count']:,} captions: {stats['mean']} words on average, median {stats['p50']}, "
        f"95th percentile {stats['p95']}, longest {stats['max']}.",
        "",
        "| words | captions |",
        "| --- | --- |",
    ]
    lines += [f"| {b}-{b + 9}{'+' if b == 200 else ''} | {c:,} |" for b, c in stats["histogram"]] + [""]
    if stats["models"]:
        lines += ["| caption model | prompt sent | captions |", "| --- | --- | --- |"]
        lines += [f"| {m} | {p} | {c:,} |" for m, p, c in stats["models"]] + [""]
    return lines


def _left_out(left_out: dict[str, int]) -> list[str]:
    if not left_out:
        return []
    return [
        "## Left out",
        "",
        "Samples of the input that are not in these shards, by reason:",
        "",
        "| reason | samples |",
        "| --- | --- |",
        *(f"| {r} | {c:,} |" for r, c in left_out.items()),
        "",
    ]


def _history(history: list[dict[str, Any]]) -> list[str]:
    lines = ["## How it was made", "", "The lenscap stages that produced it, in order (from `lenscap.json`):", ""]
    for step, h in enumerate(history, 1):
        params = {k: v for k, v in (h.get("parameters") or {}).items() if v not in (None, {}, [])}
        lines.append(f"{step}. `{h.get('stage')}` {json.dumps(params, default=str)[:400]}")
    return lines


def _loading(fmt: type[ExportFormat], where: str, shards: int, remote: bool) -> list[str]:
    lines = ["", "## Loading", "", "```python", "from datasets import load_dataset", ""]
    if not remote:
        lines += [f'ds = load_dataset({json.dumps(where)}, split="train")', "```", ""]
    else:  # a URL: datasets reads it through fsspec as data files (credentials from the environment)
        files = json.dumps(where + "/" + fmt.data_files)
        lines += [f'ds = load_dataset({json.dumps(fmt.hf_builder)}, data_files={files}, split="train")', "```", ""]
    return lines + fmt.card_loading(where, shards, remote)
