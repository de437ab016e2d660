"""What a dataset says about itself: each shard's ``_stats.json`` and the directory's ``lenscap.json``.

The manifest records the stage and its parameters (secrets never), the input, the lenscap version,
the schema, counts summed from the shards' stats, the history of the stages before, where the images
live (``images``), the input shards left out (``--allow-incomplete``), and a stage's own fields (dedup
--semantic's ``embeddings``: the model, dimension, type and folder of the embeddings kept per shard). Its ``id`` is made at the
first manifest and kept after, so a dataset referring to this one's images can tell it from another
written in its place.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from typing import Any

import pyarrow as pa

from lenscap import __version__
from lenscap.core.layout import shard_name
from lenscap.core.storage import redact_url

__all__ = ["shard_stats", "redact", "build_manifest", "MANIFEST_FORMAT", "is_lenscap_manifest"]

# The first field of every manifest lenscap writes: what tells its ``lenscap.json`` from a file of the
# same name that a person or another tool wrote (a project's ``{"name": "my project"}``), so that
# lenscap never takes a directory for its own, nor clears it, on a file name alone.
MANIFEST_FORMAT = "lenscap-dataset/1"
# The fields every manifest of lenscap before the marker held (a stage's and an export's alike).
_OLD_FIELDS = ("lenscap_version", "stage", "history")

# Parameter names whose values are never written anywhere (manifests, logs, summaries).
_SECRET_NAME_RE = re.compile(r"(api_?key|secret|password|authorization)", re.IGNORECASE)


def shard_stats(shard_id: int, table: pa.Table) -> dict[str, Any]:
    """The ``_stats.json`` content for a shard holding ``table``: counts per status and per error."""
    names = table.column_names
    status = Counter(str(s) for s in table.column("status").to_pylist()) if "status" in names else Counter()
    errors = Counter(e for e in table.column("error_message").to_pylist() if e) if "error_message" in names else Counter()
    stage_status = {
        name: dict(sorted(Counter(str(s) for s in table.column(name).to_pylist()).items()))
        for name in names
        if name.endswith("_status") and name != "status"
    }
    return {
        "shard": shard_name(shard_id),
        "count": table.num_rows,
        "successes": status.get("success", 0),
        "status": dict(sorted(status.items())),
        "stage_status": stage_status,
        "errors": dict(errors.most_common(20)),
    }


def redact(parameters: dict[str, Any]) -> dict[str, Any]:
    """Drop parameters that could hold secrets, at any depth; by name, so no value's shape matters."""
    return {k: redact(v) if isinstance(v, dict) else v for k, v in parameters.items() if not _SECRET_NAME_RE.search(k)}


def build_manifest(
    previous: dict[str, Any],
    stage: str,
    parameters: dict[str, Any],
    input_path: str | None,
    *,
    completed: int,
    stats: list[dict[str, Any]],
    schema: pa.Schema | None,
    expected_shards: int | None,
    history: list[dict[str, Any]] | None,
    images: dict[str, Any] | None,
    input_incomplete: list[int] | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of a dataset whose ``completed`` shards have ``stats`` and ``schema``; ``previous``
    its manifest before (for its ``id``); ``history`` the input's history."""
    counts: Counter[str] = Counter()
    stage_counts: dict[str, Counter[str]] = {}
    samples = 0
    for shard in stats:
        samples += int(shard.get("count", 0))
        counts.update(shard.get("status", {}))
        for column, outcome in shard.get("stage_status", {}).items():
            stage_counts.setdefault(column, Counter()).update(outcome)
    params = redact(parameters)
    input_path = redact_url(input_path) if input_path is not None else None  # never credentials in a URL
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    entry = {"stage": stage, "parameters": params, "input": input_path, "lenscap_version": __version__, "at": now}
    return {
        "format": MANIFEST_FORMAT,
        "lenscap_version": __version__,
        "id": previous.get("id") or uuid.uuid4().hex,
        "stage": stage,
        "parameters": params,
        "input": input_path,
        "updated_at": now,
        "complete": expected_shards is not None and completed >= expected_shards,
        "shards": {"expected": expected_shards, "completed": completed},
        "counts": {
            "samples": samples,
            "status": dict(sorted(counts.items())),
            **{column: dict(sorted(c.items())) for column, c in sorted(stage_counts.items())},
        },
        "schema": [{"name": f.name, "type": str(f.type)} for f in schema] if schema is not None else [],
        "images": images,
        "input_incomplete_shards": [shard_name(i) for i in input_incomplete or []],
        **(extra or {}),
        "history": [*(history or []), entry],
    }


def is_lenscap_manifest(manifest: Any) -> bool:
    """Whether ``manifest`` (a parsed ``lenscap.json``) is one lenscap wrote: it carries the format
    marker, or it is an older one, with every field those held (so outputs written before resume)."""
    if not isinstance(manifest, dict):
        return False
    if manifest.get("format") == MANIFEST_FORMAT:
        return True
    return all(k in manifest for k in _OLD_FIELDS) and isinstance(manifest["history"], list)
