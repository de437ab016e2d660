"""The dataset card: ``README.md`` with the Hugging Face Hub's YAML front matter.

The front matter names the data files (so ``datasets.load_dataset(OUT)`` and the Hub's viewer find
them), the size category and the features; the body says what is inside, how the captions look,
what was left out and why, and the pipeline that made it, from the manifest's history. The licence
is left for the user: lenscap cannot know the rights in the images and their text.

Two cards: ``write_card``, an export's (``lenscap shard``), and ``write_download_card``, a download
directory's (``lenscap download``: its tars are WebDataset shards, so ``load_dataset(DIR)`` reads
the downloaded samples). ``datasets`` picks one builder for a directory from the extensions of all
the configs' files, so a card names files of one format only (a download's tars, not its Parquet rows).

WebDataset features are declared (``dataset_info``) where every column has a JSON type: ``datasets``
otherwise infers them from the first five samples, and a column empty there but not later (an error
message, an OCR text) would fail the load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from lenscap import __version__
from lenscap.core.commits import atomic_write_bytes
from lenscap.core.dataset import Dataset
from lenscap.core.layout import IMAGE_OFFSET, IMAGE_SIZE

__all__ = ["write_card", "write_download_card", "CARD_NAME"]

CARD_NAME = "README.md"

_HF_DTYPES = {
    pa.string(): "string",
    pa.large_string(): "large_string",
    pa.bool_(): "bool",
    pa.float32(): "float32",
    pa.float64(): "float64",
    pa.int8(): "int8",
    pa.int16(): "int16",
    pa.int32(): "int32",
    pa.int64(): "int64",
    pa.uint8(): "uint8",
    pa.uint16(): "uint16",
    pa.uint32(): "uint32",
    pa.uint64(): "uint64",
    pa.binary(): "binary",
}


# JSON values (``KEY.json``, written with ``default=str``) as ``datasets`` types them.
_JSON_DTYPES = {
    **{t: "int64" for t in (pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64())},
    pa.float16(): "float64",
    pa.float32(): "float64",
    pa.float64(): "float64",
    pa.bool_(): "bool",
    pa.string(): "string",
    pa.large_string(): "string",
}


def _json_dtype(t: pa.DataType) -> str | None:
    if t in _JSON_DTYPES:
        return _JSON_DTYPES[t]
    if pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_decimal(t):
        return "string"  # written as its str()
    return None  # lists, structs, binary: left to datasets to infer


def _webdataset_features(json_fields: list[tuple[str, pa.DataType]]) -> list[str] | None:
    """``features`` of a WebDataset config whose samples are ``jpg``, ``txt`` and ``json`` (fields in
    order); None where a field has no JSON type to declare."""
    dtypes = [(name, _json_dtype(t)) for name, t in json_fields]
    if any(d is None for _, d in dtypes):
        return None
    lines = [
        "  features:",
        "  - name: jpg",
        "    dtype: image",
        "  - name: txt",
        "    dtype: string",
        "  - name: json",
        "    struct:",
    ]
    for name, dtype in dtypes:
        lines += [f"    - name: {json.dumps(name)}", f"      dtype: {dtype}"]
    return lines + ["  - name: __key__", "    dtype: string", "  - name: __url__", "    dtype: string"]


def _front_matter(name: str, n: int, files: str, info: list[str] | None) -> list[str]:
    lines = [
        "---",
        "# Set the licence of these images and captions here: lenscap cannot know it.",
        "license: other",
        f"pretty_name: {json.dumps(name)}",
        "task_categories:",
        "- text-to-image",
        "- image-to-text",
        "size_categories:",
        f"- {_size_category(n)}",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        f"    path: {json.dumps(files)}",
    ]
    if info:
        lines += ["dataset_info:", *info]
    return lines + ["tags:", "- lenscap", "- image-captioning", "---", ""]


_LICENCE = [
    "## Licence",
    "",
    "Not set. Fill in the licence under which you may share these images and captions, and the `license` field above.",
    "",
]


def _write(ds_or_dir: Dataset | Path, text: str) -> None:
    if isinstance(ds_or_dir, Path):
        atomic_write_bytes(ds_or_dir / CARD_NAME, text.encode())
    elif ds_or_dir.remote:
        ds_or_dir.fs.pipe_file(ds_or_dir.file(CARD_NAME), text.encode())
    else:
        atomic_write_bytes(ds_or_dir.path / CARD_NAME, text.encode())


def _webdataset_loading(urls: str, shards: int) -> list[str]:
    """How to read WebDataset shards in a training loop, with several DataLoader workers and nodes."""
    workers = max(1, min(8, shards))
    return [
        "With several DataLoader workers (and nodes), each reads shards of its own: a worker without one gets "
        f"nothing, so this export has at least `--min-shards` shards ({shards} here; use at most that many "
        "workers in all). `sizes.json` holds the samples of each tar, as open_clip's loader expects "
        "(`--train-data` with `--dataset-type webdataset`).",
        "",
        "```python",
        "import webdataset as wds",
        "from torch.utils.data import DataLoader",
        "",
        f"urls = {json.dumps(urls)}",
        "# One pass over every sample, once: shards are split between nodes, then between workers.",
        f"ds = (wds.WebDataset(urls, shardshuffle={shards}, nodesplitter=wds.split_by_node)",
        "      .shuffle(1000).decode('pil').to_tuple('jpg', 'txt'))",
        f"loader = DataLoader(ds, batch_size=None, num_workers={workers})",
        "```",
        "",
        "Training on several GPUs or nodes: ranks must see equally many batches, or one waits for the others "
        "forever at the end of an epoch. Resampled shards give every worker an endless stream, and `with_epoch` "
        "cuts it into equal epochs (samples are drawn with replacement):",
        "",
        "```python",
        "ds = (wds.WebDataset(urls, resampled=True, shardshuffle=True)",
        "      .shuffle(1000).decode('pil').to_tuple('jpg', 'txt')",
        "      .with_epoch(SAMPLES_PER_EPOCH // (WORLD_SIZE * NUM_WORKERS)))",
        "```",
        "",
    ]


def _size_category(n: int) -> str:
    bounds = [
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
        (100_000_000, "10M<n<100M"),
        (1_000_000_000, "100M<n<1B"),
    ]
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
            "FROM read_parquet(?)",
            [files],
        ).fetchall()[0]
        hist = con.execute(
            f"SELECT least({words} // 10 * 10, 200) AS b, count(*) FROM read_parquet(?) GROUP BY b ORDER BY b", [files]
        ).fetchall()
        models = []
        if "caption_model" in columns.names:
            models = con.execute(
                "SELECT coalesce(caption_model, '(original text)'), count(*) FROM read_parquet(?) GROUP BY 1 ORDER BY 2 DESC",
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


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError


def write_card(
    out: Path,
    format_name: str,
    summary: dict[str, Any],
    history: list[dict[str, Any]],
    index_dir: Path,
    columns: pa.Schema,
    location: str | None = None,
) -> None:
    """Write ``out/README.md``. ``location``: where the export is read from, when not ``out`` (a remote
    output's URL, whose files are uploaded from the local ``out``)."""
    n = summary["samples"]
    files = "data/train-*.parquet" if format_name == "parquet" else "*.tar"
    stats = _caption_stats(index_dir, columns)
    where = location.rstrip("/") if location is not None else str(out.resolve())
    name = where.rsplit("/", 1)[-1]
    info: list[str] | None = None
    if format_name == "parquet":
        if all(f.type in _HF_DTYPES for f in columns):  # a partial list would fail the load: all or none
            info = ["  features:", "  - name: key", "    dtype: string", "  - name: image", "    dtype: image"]
            info += [line for f in columns for line in (f"  - name: {json.dumps(f.name)}", f"    dtype: {_HF_DTYPES[f.type]}")]
            info += ["  splits:", "  - name: train", f"    num_bytes: {summary['bytes']}", f"    num_examples: {n}"]
    else:
        features = _webdataset_features([("key", pa.string()), *((f.name, f.type) for f in columns if f.name != "caption")])
        if features is not None:
            info = features + ["  splits:", "  - name: train", f"    num_bytes: {summary['bytes']}", f"    num_examples: {n}"]
    lines = _front_matter(name, n, files, info)

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
        f"{shards} {format_name} shards, {_human(summary['bytes'])}.",
        "",
        "## Files",
        "",
    ]
    if format_name == "parquet":
        body += [
            "`data/train-NNNNN-of-MMMMM.parquet`: one row per sample; `image` is the `datasets` Image feature "
            "(`{bytes, path}`), decoded on access.",
            "",
        ]
    else:
        body += [
            "`NNNNN.tar`: WebDataset shards; each sample is `KEY.jpg` (the image), `KEY.txt` (the caption) and "
            "`KEY.json` (the other columns). `sizes.json`: the samples of each tar, by file name (open_clip).",
            "",
        ]
    body += [
        "`shards.json` lists every file with its sample count, for random access and sharded loading.",
        "",
        "| column | type |",
        "| --- | --- |",
        "| key | string |",
    ]
    if format_name == "parquet":
        body.append("| image | image |")
    body += [f"| {f.name} | {f.type} |" for f in columns] + [""]
    if stats["count"]:
        body += [
            "## Captions",
            "",
            f"{stats['count']:,} captions: {stats['mean']} words on average, median {stats['p50']}, "
            f"95th percentile {stats['p95']}, longest {stats['max']}.",
            "",
            "| words | captions |",
            "| --- | --- |",
        ]
        body += [f"| {b}-{b + 9}{'+' if b == 200 else ''} | {c:,} |" for b, c in stats["histogram"]] + [""]
        if stats["models"]:
            body += ["| caption model | captions |", "| --- | --- |"] + [f"| {m} | {c:,} |" for m, c in stats["models"]] + [""]
    if summary["left_out"]:
        body += (
            [
                "## Left out",
                "",
                "Samples of the input that are not in these shards, by reason:",
                "",
                "| reason | samples |",
                "| --- | --- |",
            ]
            + [f"| {r} | {c:,} |" for r, c in summary["left_out"].items()]
            + [""]
        )
    body += ["## How it was made", "", "The lenscap stages that produced it, in order (from `lenscap.json`):", ""]
    for step, h in enumerate(history, 1):
        params = {k: v for k, v in (h.get("parameters") or {}).items() if v not in (None, {}, [])}
        body.append(f"{step}. `{h.get('stage')}` {json.dumps(params, default=str)[:400]}")
    body += ["", "## Loading", "", "```python", "from datasets import load_dataset", ""]
    if location is None:
        body += [f'ds = load_dataset({json.dumps(where)}, split="train")', "```", ""]
    else:  # a URL: datasets reads it through fsspec as data files (credentials from the environment)
        builder = "parquet" if format_name == "parquet" else "webdataset"
        body += [
            f'ds = load_dataset({json.dumps(builder)}, data_files={json.dumps(where + "/" + files)}, split="train")',
            "```",
            "",
        ]
    if (
        format_name == "webdataset" and location is None and shards
    ):  # webdataset opens local paths and http(s), not every fsspec URL
        body += _webdataset_loading(f"{out.resolve()}/{{00000..{shards - 1:05d}}}.tar", shards)
    atomic_write_bytes(out / CARD_NAME, "\n".join(lines + body + _LICENCE).encode())


def write_download_card(path: str | Path | Dataset) -> None:
    """Write the card of a finished download directory (``lenscap download``): its tars as the
    ``default`` config, so ``datasets.load_dataset(DIR)`` reads the downloaded samples (image,
    caption, metadata); the Parquet rows (every URL, failed ones included) are named in the body."""
    ds = Dataset.open(path)
    manifest = ds.read_manifest() or {}
    counts = manifest.get("counts") or {}
    status: dict[str, int] = dict(counts.get("status") or {})
    samples = int(counts.get("samples") or sum(status.values()))
    downloaded = int(status.get("success", 0))
    where = ds.location.rstrip("/")
    name = where.rsplit("/", 1)[-1]
    ids = ds.completed_ids()
    columns = [f for f in ds.read_schema(ids[0])] if ids else []
    json_fields = [("key", pa.string())] + [(f.name, f.type) for f in columns if f.name not in ("key", IMAGE_OFFSET, IMAGE_SIZE)]
    features = _webdataset_features(json_fields) if ids and _first_json_keys(ds, ids) == {n for n, _ in json_fields} else None
    lines = _front_matter(name, downloaded, "*.tar", features)
    body = [
        f"# {name}",
        "",
        f"Images downloaded by lenscap {__version__}: {samples:,} URLs, {downloaded:,} of them downloaded, in "
        f"{len(ids)} shard{'s' if len(ids) != 1 else ''}.",
        "",
        "| download status | samples |",
        "| --- | --- |",
    ]
    body += [f"| {s} | {c:,} |" for s, c in sorted(status.items(), key=lambda kv: (kv[0] != "success", -kv[1]))] + [""]
    body += (
        [
            "## Files",
            "",
            "`NNNNN.tar`: WebDataset shards of the downloaded samples: `KEY.jpg` (the image), `KEY.txt` (the caption, "
            "the alt-text of the URL list) and `KEY.json` (the row). `NNNNN.parquet`: one row per URL, failed ones "
            "included (`status`, `error_message`), no image bytes. `NNNNN_stats.json`: written last, it marks its shard "
            "complete. `lenscap.json`: how the directory was made.",
            "",
            "| column | type |",
            "| --- | --- |",
        ]
        + [f"| {f.name} | {f.type} |" for f in columns]
        + [""]
    )
    body += [
        "## Loading",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        "# the downloaded samples (jpg, txt, json)",
        f'ds = load_dataset({json.dumps(where)}, split="train")',
        "# every URL's row, failed downloads included (no images)",
        f'rows = load_dataset("parquet", data_files={json.dumps(where + "/*.parquet")}, split="train")',
        "```",
        "",
        "The next stages (`lenscap filter`, `caption`, `dedup`, `shard`) read this directory as it is.",
        "",
    ]
    _write(ds, "\n".join(lines + body + _LICENCE))


def _first_json_keys(ds: Dataset, ids: list[int]) -> set[str] | None:
    """The fields of the first sample's ``KEY.json`` in the first tar, or None (no tar, no sample)."""
    import tarfile

    for shard_id in ids:
        try:
            with ds.open_tar(shard_id) as f, tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    if member.name.endswith(".json"):
                        data = tar.extractfile(member)
                        return set(json.loads(data.read())) if data is not None else None
        except (OSError, tarfile.TarError, ValueError):
            return None
    return None
