"""The two built-in steps of a release train (``releases = "DIR"`` in a recipe, for cron): ``new-urls``
keeps the input URLs that no earlier release holds, and ``release`` moves the last dataset to
``DIR/NNNNN``. While a refresh runs, its stages live in ``WORK/current/``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from lenscap.core.commits import atomic_write_json
from lenscap.core.dataset import Dataset
from lenscap.core.errors import UsageError
from lenscap.download.inputs import InputSpec, read_url_tables

__all__ = ["BUILTINS", "earlier_releases", "new_urls", "release"]

BUILTINS = ("new-urls", "release")


def earlier_releases(releases: Path | None) -> list[Path]:
    """The releases made so far, oldest first."""
    if releases is None or not releases.is_dir():
        return []
    return sorted(p for p in releases.iterdir() if p.is_dir() and p.name.isdigit())


def new_urls(source: str, releases: list[Path], out: Path) -> dict[str, Any]:
    """Write ``out/urls.parquet``: the rows of ``source`` whose URL no earlier release holds."""
    tables = list(read_url_tables(InputSpec(source)))
    table = pa.concat_tables(tables) if tables else pa.table({"url": pa.array([], pa.string())})
    out.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    try:
        con.register("new", table)
        files = [str(p) for r in releases for p in sorted(r.glob("*.parquet"))]
        if files:
            con.execute("CREATE TABLE old AS SELECT DISTINCT url FROM read_parquet(?, union_by_name = true)", [files])
            kept = con.sql("SELECT * FROM new ANTI JOIN old USING (url)").to_arrow_table()
        else:
            kept = table
    finally:
        con.close()
    tmp = out / ".urls.parquet.tmp"
    pq.write_table(kept, tmp)
    os.replace(tmp, out / "urls.parquet")
    return {
        "urls": str(out / "urls.parquet"),
        "input": table.num_rows,
        "new": kept.num_rows,
        "in_earlier_releases": table.num_rows - kept.num_rows,
        "releases": [str(r) for r in releases],
    }


def release(dataset: Path, releases: Path, base: Path) -> dict[str, Any]:
    """Move ``dataset`` to the next ``releases/NNNNN`` and end this refresh (``WORK/current`` goes)."""
    if dataset.exists():
        ds = Dataset.open(dataset)
        if ds.image_source() is not ds:  # its images are in this refresh's directories, which go below
            raise UsageError(
                f"release: {dataset} refers to the images of {ds.image_source().location}, which this "
                "release removes; set copy_images = true on the stage before release"
            )
    releases.mkdir(parents=True, exist_ok=True)
    intent = base / ".lenscap-run" / "release.json"
    if intent.exists():  # a release that a crash interrupted after choosing its number
        target = Path(json.loads(intent.read_text())["release"])
    else:
        existing = [int(p.name) for p in earlier_releases(releases)]
        target = releases / f"{(max(existing) + 1) if existing else 0:05d}"
        atomic_write_json(intent, {"release": str(target)})
    if dataset.exists():
        os.replace(dataset, target)
    shutil.rmtree(base)
    return {"release": str(target)}
