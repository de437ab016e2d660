"""A stage owns its output: one input, one set of settings, and nothing that lenscap did not write.

Every command that writes a dataset from another goes through here, before and after taking the
output's lock:

- ``open_output``: the output may not be the input, nor lie inside it (or it inside the output);
  a non-empty directory that lenscap did not make (no claim, no ``lenscap.json`` that lenscap wrote)
  is refused, naming what is there, so no user file is ever overwritten; then the output is created.
- ``claim_output``, under the lock: ``.lenscap/claim.json`` records the command, the input (its
  location, its dataset id, and a digest of each completed input shard's stats) and the settings
  that decide the output's content. A rerun with the same input and settings resumes. Another
  input, an input shard that changed since, or other settings, into an output that holds anything,
  is refused (``DatasetError``, exit 2) naming what differs; ``overwrite`` clears the output first.
  Clearing removes only what lenscap wrote (``Dataset.clear``): every shard's ``_stats.json`` first,
  then the rest, and the old claim last, so a kill leaves either the old job's results (a subset)
  under the old claim, or an empty output. A file lenscap did not write stays.
- ``input_shards``: an input with incomplete shards (a download still running, a stage that
  failed) is refused, naming them, unless ``allow_incomplete``; then they are left out and named in
  the output's manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from lenscap.core.commits import atomic_write_json
from lenscap.core.dataset import Dataset
from lenscap.core.errors import DatasetError, UsageError
from lenscap.core.layout import LOCK_ENTRIES, MANIFEST_NAME, OLD_WORK_DIR_NAME, WORK_DIR_NAME, shard_name
from lenscap.core.manifest import is_lenscap_manifest

__all__ = ["open_output", "claim_output", "input_shards", "CLAIM_FILE"]

CLAIM_FILE = "claim.json"


def _inside(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def open_output(out_dir: str | os.PathLike[str] | Dataset, src: Dataset | None, command: str) -> Dataset:
    """The output of ``command`` from ``src``, created: refused if it is (in) the input, or a
    non-empty directory that lenscap did not make."""
    out = out_dir if isinstance(out_dir, Dataset) else Dataset(out_dir)
    if src is not None:
        a, b = out.resolved, src.resolved
        if _inside(a, b) or _inside(b, a):
            where = "is the input" if a == b else "lies inside the input" if _inside(a, b) else "holds the input"
            raise UsageError(
                f"the output {out.location} {where} {src.location}: {command} writes a new dataset; name another output directory"
            )
        try:
            images = src.image_source()
        except DatasetError:
            images = src  # missing or replaced: said when the job starts
        if images is not src and (_inside(a, images.resolved) or _inside(images.resolved, a)):
            raise UsageError(
                f"the output {out.location} holds the images of the input {src.location}; name another output directory"
            )
    if out.fs.isfile(out.root):
        raise DatasetError(f"output directory {out.location} exists and is a file")
    foreign = _foreign_entries(out)
    if foreign:
        shown = ", ".join(sorted(foreign)[:5]) + (f", ... ({len(foreign)} entries)" if len(foreign) > 5 else "")
        why = f" (its {MANIFEST_NAME} is not a manifest lenscap wrote)" if MANIFEST_NAME in foreign else ""
        raise DatasetError(
            f"{out.location} is not empty ({shown}) and was not written by lenscap{why}; "
            f"{command} writes only into a new or empty directory, or one it wrote before"
        )
    return Dataset.create(out)


def _foreign_entries(out: Dataset) -> list[str]:
    """The entries of a non-empty output that lenscap did not make; [] if it made it (or nothing is there
    but a work directory). A directory is lenscap's by its claim, or by a manifest lenscap wrote (its
    format marker: ``is_lenscap_manifest``), never by a file name alone: a project's own ``lenscap.json``
    or an empty ``.lenscap/`` does not make a folder lenscap's."""
    if (out.work_dir / CLAIM_FILE).exists():  # claimed from this machine (a remote output's work directory is here)
        return []
    names = [name for name in out.names() if name not in (WORK_DIR_NAME, OLD_WORK_DIR_NAME)]
    if not names:
        return []
    if MANIFEST_NAME in names:
        try:
            if is_lenscap_manifest(out.read_manifest()):
                return []
        except DatasetError:  # not JSON: not lenscap's
            pass
    return names


def input_shards(src: Dataset, allow_incomplete: bool) -> tuple[list[int], list[int]]:
    """(completed shards, incomplete shards) of the input; incomplete ones refused unless allowed."""
    expected = ((src.read_manifest() or {}).get("shards") or {}).get("expected")
    incomplete = src.incomplete_ids(range(expected) if expected else None)
    if incomplete and not allow_incomplete:
        names = ", ".join(shard_name(i) for i in incomplete[:5]) + (", ..." if len(incomplete) > 5 else "")
        raise DatasetError(
            f"{src.location} has {len(incomplete)} incomplete shard(s) ({names}): the stage writing it is "
            "still running or did not finish; finish it (rerun it), or pass --allow-incomplete to go on "
            "without them"
        )
    return src.completed_ids(), incomplete


def _shard_digests(src: Dataset, shard_ids: list[int]) -> dict[str, str]:
    stats = src.read_all_stats(shard_ids)
    return {
        shard_name(i): hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:16]
        for i, s in zip(shard_ids, stats, strict=True)
    }


def _holds_anything(out: Dataset) -> bool:
    """Whether the output holds results or paid-for state of a job: shards, files beside the manifest,
    non-empty private files other than the lock and the claim (journals of paid requests, signatures,
    a plan). A manifest alone is not: a run writes one first, and one that failed its first request
    (a mistyped model) leaves the directory to the corrected command."""
    if set(out.names()) - {MANIFEST_NAME, WORK_DIR_NAME}:
        return True
    work = out.work_dir
    for root, dirs, files in os.walk(work):
        if root == str(work):
            dirs[:] = [d for d in dirs if d not in LOCK_ENTRIES]
        for name in files:
            if root == str(work) and (name in LOCK_ENTRIES or name == CLAIM_FILE):
                continue
            if os.path.getsize(os.path.join(root, name)):
                return True
    return False


def claim_output(
    out: Dataset,
    src: Dataset | None,
    command: str,
    settings: dict[str, Any],
    *,
    overwrite: bool = False,
    input_ids: list[int] | None = None,
    source_label: str | None = None,
) -> None:
    """Hold ``out`` to this input and these settings (see the module's docstring). Under the lock.

    ``source_label``: an input that is not a dataset (download's URL list), known by its location
    only; ``-`` (standard input) cannot be told from another, so it matches any.
    """
    settings = json.loads(json.dumps(settings, default=str))
    path = out.work_dir / CLAIM_FILE
    try:
        previous = json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError) as e:
        raise DatasetError(
            f"cannot read {path} ({e}); delete it to let this command claim {out.location} again, or add --overwrite"
        ) from None
    if previous is not None and not isinstance(previous, dict):
        previous = {}
    source = None
    if src is not None:
        ids = src.completed_ids() if input_ids is None else input_ids
        source = {"location": src.resolved, "id": (src.read_manifest() or {}).get("id"), "shards": _shard_digests(src, ids)}
    elif source_label is not None:
        source = {"location": source_label}
        if source_label == "-" and previous:
            source = previous.get("input") or source
    if previous is None and not overwrite and _holds_anything(out):
        # Written before claims existed: adopted only by the command that wrote it.
        stage = (out.read_manifest() or {}).get("stage")
        if stage != command:
            raise DatasetError(
                f"{out.location} holds the output of {stage or 'another job'}, not of {command}; name a new "
                "output directory, or add --overwrite to replace it"
            )
    if previous is not None and not overwrite:
        differences = _differences(previous, command, source, settings)
        if differences and _holds_anything(out):
            raise DatasetError(
                f"{out.location} holds the output of another job ({'; '.join(differences)}); rerun with "
                "the same input and settings to resume it, add --overwrite to replace it, or name a new "
                "output directory"
            )
    if overwrite and _holds_anything(out):
        clear_output(out)
    if src is not None and source is not None and previous is not None and not overwrite and previous.get("input"):
        source["shards"] = {**previous["input"].get("shards", {}), **source["shards"]}
    atomic_write_json(path, {"command": command, "input": source, "settings": settings})


def _differences(previous: dict[str, Any], command: str, source: dict[str, Any] | None, settings: dict[str, Any]) -> list[str]:
    out = []
    if previous.get("command") != command:
        out.append(f"written by {previous.get('command')}, not {command}")
    before = previous.get("input") or {}
    if source is not None and before:
        if before.get("location") != source["location"] and "-" not in (before.get("location"), source["location"]):
            out.append(f"input {before.get('location')}, not {source['location']}")
        elif before.get("id") != source.get("id"):
            out.append(f"input {source['location']} was replaced since (dataset id {before.get('id')}, now {source.get('id')})")
        else:
            now = source.get("shards", {})
            changed = sorted(k for k, v in before.get("shards", {}).items() if now.get(k) not in (None, v))
            gone = sorted(k for k in before.get("shards", {}) if k not in now)
            if changed or gone:
                out.append(f"input shard(s) {', '.join((changed + gone)[:5])} changed since")
    old, new = _flat(previous.get("settings") or {}), _flat(settings)
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed and previous.get("command") == command:
        out.append("other settings (" + ", ".join(changed) + ")")
    return out


def _flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``a.b: value``, so a message names the one value that differs."""
    out: dict[str, Any] = {}
    for k, v in settings.items():
        if isinstance(v, dict) and v:
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def clear_output(out: Dataset) -> None:
    """Empty an output lenscap wrote, keeping its lock: stats files first (no shard stays complete), then
    everything else, the claim last."""
    out.clear(keep={*LOCK_ENTRIES, CLAIM_FILE})
    (out.work_dir / CLAIM_FILE).unlink(missing_ok=True)
