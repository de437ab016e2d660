"""``dedup --against`` a plain folder of image files (an evaluation set): its signatures, made the way
pass 1 makes a dataset's, so the search compares them with the input's at every tier (with
``--semantic``, each image is embedded in the same read, as a dataset's are).

The folder (local, or on any store a dataset can be on) is read recursively, hidden directories left
out; every file with an image suffix is one sample, keyed by its path relative to the folder. The files are hashed in fixed groups of
``FILES_PER_SHARD``, one executor task each, into a signatures directory like a dataset's, so a kill
and rerun hashes only the groups not finished. A listing that changed since (files added, removed or
rewritten) starts the hashing over.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from lenscap.core.commits import atomic_write_json
from lenscap.core.dataset import Dataset
from lenscap.core.errors import DatasetError, InputError
from lenscap.core.job import Job
from lenscap.core.record import Sample
from lenscap.dedup.embedding import EmbeddingPlan
from lenscap.dedup.signatures import SIGNATURE_SCHEMA, SignatureStage

__all__ = ["ImageFolder", "IMAGE_SUFFIXES", "FILES_PER_SHARD", "open_against", "hash_folder"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif", ".jfif")
FILES_PER_SHARD = 1000


@dataclass(frozen=True)
class ImageFolder:
    """A folder of image files given to ``--against``."""

    location: str
    files: tuple[str, ...]  # relative, ``/``-separated, sorted
    sizes: tuple[int, ...]

    @property
    def resolved(self) -> str:
        return Dataset(self.location).resolved

    def listing_digest(self) -> str:
        """What the hashed signatures are made from: every file's name and size."""
        return hashlib.sha256("".join(f"{n}\0{s}\n" for n, s in zip(self.files, self.sizes)).encode()).hexdigest()

    def read(self, name: str) -> bytes:
        folder = Dataset(self.location)
        return folder.fs.cat_file(f"{folder.root.rstrip('/')}/{name}")


def _image_files(folder: Dataset) -> list[tuple[str, int]]:
    root = folder.root.rstrip("/")
    found = []
    for path, info in folder.fs.find(root, detail=True).items():
        rel = PurePosixPath(path[len(root) :].lstrip("/"))
        if any(part.startswith(".") for part in rel.parts[:-1]) or info.get("type") != "file":
            continue
        if rel.suffix.lower() in IMAGE_SUFFIXES:
            found.append((rel.as_posix(), int(info.get("size") or 0)))
    return sorted(found)


def open_against(location: str) -> Dataset | ImageFolder:
    """An ``--against`` value: a dataset directory, else a folder holding image files."""
    try:
        return Dataset.open(location)
    except DatasetError as e:
        folder = Dataset(location)
        if not folder.fs.isdir(folder.root):
            raise
        files = _image_files(folder)
        if not files:
            raise InputError(
                f"--against {location} is neither a dataset directory nor a folder of images "
                f"(no file ending in {', '.join(IMAGE_SUFFIXES[:4])}...)"
            ) from e
        return ImageFolder(location, tuple(n for n, _ in files), tuple(s for _, s in files))


@dataclass(frozen=True)
class FolderSignatures:
    """An executor task: the signatures of one group of a folder's files (an item is a group number)."""

    folder: ImageFolder
    target: str
    embedding: EmbeddingPlan | None = None  # --semantic: each image embedded too, a sidecar a group

    def setup(self) -> None:
        pass

    def run(self, shard_id: int) -> dict[str, Any]:
        dst = Dataset(self.target)
        if dst.is_complete(shard_id) or dst.recover_shard(shard_id):
            return dst.read_stats(shard_id)
        names = self.folder.files[shard_id * FILES_PER_SHARD : (shard_id + 1) * FILES_PER_SHARD]
        stage = SignatureStage()
        writer = dst.writer(shard_id, SIGNATURE_SCHEMA, copy_images=False)
        embeddings = self.embedding.start(shard_id) if self.embedding is not None else None
        try:
            for row, name in enumerate(names):
                image = Sample(name, {}, image=self.folder.read(name))
                writer.write(Sample(name, stage.signature(image, shard_id, row)))
                if embeddings is not None:
                    embeddings.add(image)
            sidecars, stats = embeddings.finish(dst, shard_id) if embeddings is not None else ({}, {})
        except BaseException:
            writer.abort()
            raise
        return writer.commit({"stage": "signatures", **stats}, sidecars)


def hash_folder(job: Job, folder: ImageFolder, target: Path, label: str, embed_model: str | None = None) -> dict[int, str]:
    """Pass 1 for an image folder, into ``target``, each image embedded with ``embed_model`` too when
    given (--semantic); the groups that failed (group: why)."""
    marker = target / "folder.json"
    listing = {"folder": folder.resolved, "files": len(folder.files), "digest": folder.listing_digest()}
    if embed_model is not None:  # signatures made without embeddings (or with another model) are made again
        listing["embed_model"] = embed_model
    if target.exists() and (not marker.exists() or json.loads(marker.read_text()) != listing):
        shutil.rmtree(target)
    dst = Dataset.create(target)
    if not marker.exists():
        atomic_write_json(marker, listing)
    groups = range((len(folder.files) + FILES_PER_SHARD - 1) // FILES_PER_SHARD)
    todo = [i for i in groups if not dst.is_complete(i)]
    progress = job.progress(f"dedup: hashing {label}")
    progress.start(len(groups), len(groups) - len(todo))
    try:
        plan = EmbeddingPlan(embed_model) if embed_model is not None else None
        return job.map(FolderSignatures(folder, str(target), plan), todo, lambda item, result: progress.advance(shards=1))
    finally:
        progress.finish()
