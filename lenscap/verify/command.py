"""``lenscap verify``: read every byte of a dataset's complete shards, in parallel on the executor, and
compare each file with the size and checksums its commit recorded (``lenscap.core.integrity``).

The cheap checks a resume makes come first (``Dataset.damaged_shards``): a shard failing them is
damaged without being read. The others are read whole, one task per shard (``Job.map``). A shard
whose files match everything recorded is ``ok``; one that matches, but with a file whose SHA-256 was
never recorded (written before lenscap recorded checksums, or an img2dataset tar moved inside a store
on Ray), is ``unchecked``, not damaged. ``--repair`` makes each damaged shard incomplete (its stats file
goes, under the output's lock), so the next run of the command that wrote the dataset writes it again.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any

from lenscap.core import integrity
from lenscap.core.dataset import Dataset
from lenscap.core.errors import UsageError
from lenscap.core.executors import Executor, executor_for
from lenscap.core.job import Job
from lenscap.core.layout import shard_name
from lenscap.core.lock import output_lock
from lenscap.core.progress import log
from lenscap.core.result import EXIT_FAILED, EXIT_OK
from lenscap.verify.options import VerifyOptions

__all__ = ["verify", "VerifyTask"]


class VerifyTask:
    """One complete shard's files read whole and compared with its stats: an executor's task."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def setup(self) -> None:
        pass

    def run(self, shard_id: int) -> dict[str, Any]:
        """``bytes`` read, and ``damaged`` (why) or ``unchecked`` (the files with no SHA-256 recorded)."""
        stats = self.ds.read_stats(shard_id)
        read, unchecked = 0, []
        for name in integrity.recorded_files(shard_id, stats):
            try:
                digest = self.ds.digest_file(name)
            except OSError as e:  # gone since the cheap checks, or a read error of the disk itself
                return {"bytes": read, "damaged": f"{name} cannot be read: {e.strerror or e}"}
            read += digest.size
            why = integrity.whole_problem(stats, name, digest)
            if why is not None:
                return {"bytes": read, "damaged": why}
            if name not in (stats.get("sha256") or {}):
                unchecked.append(name)
        return {"bytes": read, "unchecked": unchecked}


def verify(
    path: str | os.PathLike[str], options: VerifyOptions, *, quiet: bool = True, executor: Executor | None = None
) -> dict[str, Any]:
    """Verify the dataset at ``path``; returns the ``--json`` object, whose ``exit_code`` is 1 when a
    shard is damaged. With ``repair``, the damaged shards are made incomplete, under the output's lock
    (no command may be writing the dataset meanwhile)."""
    ds = Dataset.open(path)
    manifest = ds.read_manifest() or {}
    if manifest.get("stage") == "shard":
        raise UsageError(
            f"{ds.location} is an export (lenscap shard's output): verify checks a stage's dataset; "
            "lenscap inspect compares an export's files with the sizes in its shards.json"
        )
    with output_lock(ds) if options.repair else nullcontext():
        completed = ds.completed_ids()
        damaged = ds.damaged_shards(completed)
        todo = [i for i in completed if i not in damaged]
        job = Job("verify", executor or executor_for(options), quiet)
        progress = job.progress("verify")
        progress.start(len(completed), len(damaged))
        read: dict[int, dict[str, Any]] = {}

        def on_done(shard_id: int, result: dict[str, Any]) -> None:
            read[shard_id] = result
            progress.advance(shards=1)

        try:
            failed = job.map(VerifyTask(ds), todo, on_done)
        finally:
            progress.finish()
        damaged |= {i: f"cannot be read: {why}" for i, why in failed.items()}
        damaged |= {i: r["damaged"] for i, r in read.items() if "damaged" in r}
        for shard_id, why in sorted(damaged.items()):
            log(f"verify: shard {shard_name(shard_id)} of {ds.location} is damaged: {why}")
            if options.repair:
                ds.discard(shard_id)
    return _summary(ds, manifest, completed, damaged, read, options.repair)


def _summary(
    ds: Dataset,
    manifest: dict[str, Any],
    completed: list[int],
    damaged: dict[int, str],
    read: dict[int, dict[str, Any]],
    repaired: bool,
) -> dict[str, Any]:
    unchecked = {i: r["unchecked"] for i, r in sorted(read.items()) if r.get("unchecked") and i not in damaged}
    expected = (manifest.get("shards") or {}).get("expected")
    incomplete = ds.incomplete_ids(range(expected) if expected else None)
    summary: dict[str, Any] = {
        "command": "verify",
        "path": ds.location,
        "shards": {
            "checked": len(completed),
            "ok": len(completed) - len(damaged) - len(unchecked),
            "unchecked": len(unchecked),
            "damaged": len(damaged),
            "incomplete": len([i for i in incomplete if i not in damaged]),
        },
        "bytes_read": sum(int(r.get("bytes", 0)) for r in read.values()),
        "damaged_shards": {shard_name(i): why for i, why in sorted(damaged.items())},
        "unchecked_shards": {shard_name(i): files for i, files in unchecked.items()},
    }
    if repaired:
        summary["repaired"] = [shard_name(i) for i in sorted(damaged)]
    summary["exit_code"] = EXIT_FAILED if damaged else EXIT_OK
    return summary
