"""A finished download directory's card (``lenscap download``): its tars as the ``default`` config, so
``datasets.load_dataset(DIR)`` reads the downloaded samples. ``datasets`` picks one builder for a
directory from the extensions of all the configs' files, so the card names the tars only, and the
Parquet rows (every URL, failed ones included) in its body."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow as pa

from lenscap import __version__
from lenscap.core.card import CARD_NAME, LICENCE, front_matter, webdataset_features
from lenscap.core.dataset import Dataset
from lenscap.core.layout import IMAGE_OFFSET, IMAGE_SIZE

__all__ = ["write_download_card"]


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
    features = webdataset_features(json_fields) if ids and _first_json_keys(ds, ids) == {n for n, _ in json_fields} else None
    lines = front_matter(name, downloaded, "*.tar", features)
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
    ds.put_bytes(CARD_NAME, "\n".join(lines + body + LICENCE).encode())


def _first_json_keys(ds: Dataset, ids: list[int]) -> set[str] | None:
    """The fields of the first sample's ``KEY.json`` in the first tar, or None (no tar, no sample)."""
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
