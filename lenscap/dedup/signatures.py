"""Pass 1 of dedup, per shard: what each sample is compared by.

A signatures directory is itself a dataset directory (parquet rows, empty tars, ``_stats.json`` as
the done marker), so the job driver's processes, progress and resume apply unchanged. It holds one row
per sample that has an image: where the sample is (shard, row), its SHA-256, its perceptual hash with
those of its canonical orientation(s), its quality, a colour thumbnail when the quality is low, and the name of
the algorithm that made them, its normalised-caption hash, and its pixel size for ``--keep largest``.
A sample whose image cannot be decoded keeps its SHA-256 and gets ``error`` instead of a perceptual
hash. With ``dedup --semantic`` the same read of the shard gives each image its embedding
(``dedup.embedding``), committed with the shard as its ``embeddings/NNNNN.parquet`` sidecar.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lenscap.core.dataset import Dataset, read_parquet
from lenscap.core.record import Sample
from lenscap.core.schema import Column
from lenscap.core.stage import Stage
from lenscap.dedup.embedding import EmbeddingPlan
from lenscap.dedup.phash import ALGORITHM, phash

__all__ = ["SignatureStage", "SIGNATURE_SCHEMA", "caption_digest", "signature_algorithm"]

SIGNATURE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("shard", pa.int32()),
        pa.field("row", pa.int32()),
        pa.field("sha256", pa.binary(32)),
        pa.field("phash", pa.uint64()),
        pa.field("phash_algorithm", pa.string()),  # hashes of different algorithms are never compared
        pa.field("phash_degenerate", pa.bool_()),
        pa.field("phash_keys", pa.list_(pa.uint64())),  # phash, then its canonical orientation(s)
        pa.field("phash_quality", pa.float32()),
        pa.field("thumbnail", pa.binary()),  # 16x16 RGB, low-quality images only
        pa.field("caption_hash", pa.binary(16)),
        pa.field("pixels", pa.int64()),
        pa.field("image_bytes", pa.int64()),
        pa.field("error", pa.string()),
    ]
)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NOT_WORD = re.compile(r"[\W_]+", re.UNICODE)


def signature_algorithm(directory: Path) -> str | None:
    """The hash algorithm of a signatures directory's first complete shard (None: none yet, or no
    perceptual hash in it). A shard without the dihedral columns is lenscap-phash-v1's."""
    if not directory.exists():
        return None
    ids = Dataset(directory).completed_ids()
    if not ids:
        return None
    path = Dataset(directory).parquet_path(ids[0])
    if "phash_keys" not in pq.ParquetFile(path).schema_arrow.names:
        return "lenscap-phash-v1"
    found = [a for a in read_parquet(path, columns=["phash_algorithm"]).column(0).to_pylist() if a is not None]
    return found[0] if found else None


def caption_digest(caption: str | None) -> bytes | None:
    """128-bit hash of the caption after NFKC, case folding, and punctuation and spacing removed;
    None for an empty caption (empty captions are not duplicates of each other)."""
    if not caption:
        return None
    text = _NOT_WORD.sub(" ", unicodedata.normalize("NFKC", caption).casefold()).strip()
    return hashlib.blake2b(text.encode(), digest_size=16).digest() if text else None


class SignatureStage(Stage):
    name = "signatures"
    needs = (*Stage.needs, Column("caption", "string", optional=True))  # its hash is a signature

    def __init__(self, embedding: EmbeddingPlan | None = None) -> None:
        self.embedding = embedding  # --semantic: what to embed with, and what is kept already

    def parameters(self) -> dict[str, Any]:
        return {"phash_algorithm": ALGORITHM}

    def signature(self, sample: Sample, shard_id: int, row: int) -> dict[str, Any]:
        assert sample.image is not None
        # img2dataset's sha256 is of the downloaded bytes, so equal downloads still have equal digests.
        known = sample.row.get("sha256")
        digest = bytes.fromhex(known) if isinstance(known, str) and _HEX64.match(known) else hashlib.sha256(sample.image).digest()
        out: dict[str, Any] = {
            "shard": shard_id,
            "row": row,
            "sha256": digest,
            "caption_hash": caption_digest(sample.caption),
            "image_bytes": len(sample.image),
            "phash": None,
            "phash_algorithm": None,
            "phash_degenerate": None,
            "phash_keys": None,
            "phash_quality": None,
            "thumbnail": None,
            "pixels": None,
            "error": None,
        }
        try:
            h = phash(sample.image)
            out.update(
                phash=h.phash,
                phash_algorithm=ALGORITHM,
                phash_degenerate=h.degenerate,
                phash_keys=list(h.keys),
                phash_quality=h.quality,
                thumbnail=h.thumbnail,
                pixels=h.width * h.height,
            )
        except Exception as e:  # noqa: BLE001 - an undecodable image is still compared by its bytes
            out["error"] = f"cannot compute a perceptual hash: {type(e).__name__}: {e}"
        return out

    def run_shard(self, src: Dataset, dst: Dataset, shard_id: int) -> dict[str, Any]:
        writer = dst.writer(shard_id, SIGNATURE_SCHEMA, copy_images=False)
        embeddings = self.embedding.start(shard_id) if self.embedding is not None else None
        try:
            for row, sample in enumerate(src.iter_samples(shard_id)):
                if sample.has_image:
                    writer.write(Sample(sample.key, self.signature(sample, shard_id, row)))
                    if embeddings is not None:
                        embeddings.add(sample)
                self.tick()
            sidecars, stats = embeddings.finish(dst, shard_id) if embeddings is not None else ({}, {})
        except BaseException:
            writer.abort()
            raise
        return writer.commit({"stage": self.name, **stats}, sidecars)
