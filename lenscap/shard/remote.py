"""``shard`` into a remote output (any fsspec URL): what differs from a local one.

The export runs in the output's local mirror (``Dataset.path``) as it would in a local directory,
state (``.lenscap/``: index, plan, done markers) included. The differences are here and in
``job._WriteJob``: each output shard is uploaded before its done marker is written and its local copy
removed, and the index files are uploaded at the end. The remote directory is the truth about which
shards are there, so before a run the mirror is brought in line with it (``sync_mirror``).
"""

from __future__ import annotations

import json
from pathlib import Path

from lenscap.core.dataset import Dataset
from lenscap.core.uploads import uploaded_sizes

__all__ = ["INDEX_FILES", "sync_mirror"]

# Written locally at the end of a run, then uploaded in this order (as a local run writes them).
INDEX_FILES = ("shards.json", "sizes.json", "lenscap.json", "README.md")


def sync_mirror(remote: Dataset, done_dir: Path) -> None:
    """Before a run (the lock held, so no task is writing): keep only the done markers of shards whose
    remote file has the size the marker records, and remove the shard files a kill left in the mirror.

    A marker is written only after its upload, so a missing or short remote file means the output was
    changed or deleted since; that shard is then written again, like one never done. (A local output
    is its own mirror: nothing to do.)
    """
    if not remote.remote:
        return
    out = remote.path
    uploaded = uploaded_sizes(remote)
    for marker in done_dir.glob("*.json"):
        record = json.loads(marker.read_text())
        if uploaded.get(record["file"]) != record["bytes"]:
            marker.unlink()
    # Killed before its marker (upload or not): written again. After its marker: uploaded already.
    for leftover in [*out.glob("*.tar"), *out.glob("data/*.parquet")]:
        leftover.unlink()
