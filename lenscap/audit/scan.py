"""The audit's two passes: a scan of every shard (on any executor), then a global pass on DuckDB.

The scan measures each shard a batch at a time (``lenscap.audit.measures``) and hands back what is
small (per model/prompt tallies, a few sampled flagged captions) and what is not (LSH band keys,
opening counts), which this process appends to spill files partitioned by hash (``lenscap.audit.spill``).
The global pass (``lenscap.audit.summary``) reads those a partition at a time: band keys shared by two
captions make both ``duplicate``; opening counts summed give the top openings. Memory holds one
batch, the tallies, the sample and one partition, whatever the dataset's size.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lenscap.audit.measures import FLAGS, READ_COLUMNS, AuditSettings, Measured, measure
from lenscap.audit.source import ParquetFiles
from lenscap.audit.spill import Spill
from lenscap.audit.text import KMV
from lenscap.core.dataset import Dataset
from lenscap.core.job import Job

__all__ = ["Tally", "ScanJob", "Scan", "scan", "MAX_WORDS"]

MAX_WORDS = 2048  # the word histogram's last bin holds every longer caption
_BATCH = 4096
_SAMPLE_CHARS = 2000  # a sampled caption is cut here (a loop can be very long)
Label = tuple[str, str, str]  # (caption_model, caption_prompt, caption_prompt_sha)


@dataclass
class Tally:
    """What the audit adds up for one group of captions; two tallies merge into the tally of both."""

    captions: int = 0
    texts: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    hist: np.ndarray = field(default_factory=lambda: np.zeros(MAX_WORDS + 1, np.int64))
    words: int = 0
    unigrams: int = 0
    bigrams: int = 0
    distinct_1: KMV = field(default_factory=KMV)
    distinct_2: KMV = field(default_factory=KMV)
    ocr_known: int = 0
    ocr_with_text: int = 0
    alt_named: int = 0
    alt_carry: float = 0.0

    def add(self, m: Measured, rows: np.ndarray, unigram_mask: np.ndarray, bigram_mask: np.ndarray) -> None:
        text = rows & m.text
        self.captions += int((rows & m.audited).sum())
        self.texts += int(text.sum())
        for name in FLAGS:
            n = int((rows & m.flags[name]).sum())
            if n:
                self.counts[name] += n
        words = m.words[text]
        self.hist += np.bincount(np.minimum(words, MAX_WORDS), minlength=MAX_WORDS + 1)
        self.words += int(words.sum())
        unigrams, bigrams = m.unigrams[unigram_mask], m.bigrams[bigram_mask]
        self.unigrams += len(unigrams)
        self.bigrams += len(bigrams)
        self.distinct_1.add(unigrams)
        self.distinct_2.add(bigrams)
        self.ocr_known += int((rows & m.ocr_known).sum())
        self.ocr_with_text += int((rows & m.ocr_with_text).sum())
        self.alt_named += int((rows & m.alt_named).sum())
        self.alt_carry += float(m.alt_carry[rows & m.alt_named].sum())

    def merge(self, other: Tally) -> None:
        for name in ("captions", "texts", "words", "unigrams", "bigrams", "ocr_known", "ocr_with_text", "alt_named", "alt_carry"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.counts.update(other.counts)
        self.hist += other.hist
        self.distinct_1.merge(other.distinct_1)
        self.distinct_2.merge(other.distinct_2)


def _sample_rank(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big")


class ScanJob:
    """The executor's job: ``run(shard_id)`` measures one shard of ``src`` and returns its parts."""

    def __init__(self, src: Dataset | ParquetFiles, settings: AuditSettings, sample: int, seed: int, rows: bool = False) -> None:
        self.src = src
        self.settings = settings
        self.sample = sample
        self.seed = seed
        self.rows = rows  # also return (key, words, flags) of every caption: to compare two datasets

    def setup(self) -> None:
        pass

    def run(self, shard_id: int) -> dict[str, Any]:
        tallies: dict[Label, Tally] = {}
        labels: dict[Label, int] = {}  # this shard's groups, numbered in order of appearance
        openings: Counter[tuple[Label, str]] = Counter()
        band_keys, band_rows, row_groups, flagged, kept_rows = [], [], [], [], []
        names = self.src.read_schema(shard_id).names
        columns = [c for c in READ_COLUMNS if c in names]
        base = 0
        for batch in self.src.iter_batches(shard_id, columns, _BATCH):
            table = pa.Table.from_batches([batch])
            m = measure(table, self.settings)
            self._tally(m, tallies)
            local = np.array([labels.setdefault(label, len(labels)) for label in m.labels] + [-1], np.int32)
            row_groups.append(local[m.groups])  # -1 (not a caption) picks the -1 at the end
            self._count_openings(m, openings)
            band_keys.append(m.band_keys)
            band_rows.append(m.band_rows + base)
            flagged.extend(self._flagged(table, m, base))
            if self.rows:
                kept_rows.append(self._rows(table, m, base))
            base += table.num_rows
        out: dict[str, Any] = {
            "tallies": tallies,
            "openings": openings,
            "samples": heapq.nsmallest(self.sample, flagged),
            "band_keys": np.concatenate(band_keys) if band_keys else np.zeros(0, np.uint64),
            "band_rows": np.concatenate(band_rows) if band_rows else np.zeros(0, np.int64),
            "labels": list(labels),
            "row_groups": np.concatenate(row_groups) if row_groups else np.zeros(0, np.int32),
        }
        if self.rows:
            out["rows"] = pa.concat_tables(kept_rows) if kept_rows else None
        return out

    @staticmethod
    def _count_openings(m: Measured, openings: Counter[tuple[Label, str]]) -> None:
        """Adds each text row's opening (first three words) to ``openings``, by group; counted by
        numpy on codes, not row by row."""
        counted = m.text & pc.fill_null(pc.is_valid(m.openings), False).to_numpy(zero_copy_only=False).astype(bool)
        if not counted.any():
            return
        encoded = pc.dictionary_encode(m.openings.filter(pa.array(counted)))
        words = encoded.dictionary.to_pylist()
        codes = m.groups[counted] * len(words) + encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        distinct, counts = np.unique(codes, return_counts=True)
        for code, n in zip(distinct.tolist(), counts.tolist(), strict=True):
            group, opening = divmod(code, len(words))
            openings[(m.labels[group], words[opening])] += n

    @staticmethod
    def _tally(m: Measured, tallies: dict[Label, Tally]) -> None:
        # Word and word-pair hashes count for the group of the caption they come from.
        for g, label in enumerate(m.labels):
            rows = m.groups == g
            tallies.setdefault(label, Tally()).add(m, rows, rows[m.unigram_owner], rows[m.bigram_owner])

    def _flagged(self, table: pa.Table, m: Measured, base: int) -> list[tuple[int, str, int, dict[str, Any]]]:
        """The flagged captions of this batch as ``(rank, key, row, what a reader needs)``, the
        ``sample`` smallest ranks only."""
        if not self.sample:
            return []
        flagged = np.zeros(len(m.audited), bool)
        for name in FLAGS:
            flagged |= m.flags[name]
        rows = np.flatnonzero(flagged)
        if not len(rows):
            return []
        keys = table.column("key").to_pylist()
        ranked = heapq.nsmallest(self.sample, ((_sample_rank(self.seed, str(keys[i])), int(i)) for i in rows))
        picked = table.take(pa.array([i for _, i in ranked])).to_pylist()
        out = []
        for (rank, i), row in zip(ranked, picked, strict=True):
            caption = row.get("caption") or ""
            out.append(
                (
                    rank,
                    str(row["key"]),
                    base + i,
                    {
                        "key": str(row["key"]),
                        "flags": [f for f in FLAGS if m.flags[f][i]],
                        "words": int(m.words[i]),
                        "caption_status": row.get("caption_status"),
                        "caption": caption[:_SAMPLE_CHARS] + ("..." if len(caption) > _SAMPLE_CHARS else ""),
                        "ocr_text": row.get("ocr_text"),
                        "alt_text": row.get("alt_text"),
                        "model": row.get("caption_model"),
                    },
                )
            )
        return out

    @staticmethod
    def _rows(table: pa.Table, m: Measured, base: int) -> pa.Table:
        bits = np.zeros(len(m.audited), np.int64)
        for bit, name in enumerate(FLAGS):
            bits |= m.flags[name].astype(np.int64) << bit
        keep = np.flatnonzero(m.audited)
        return pa.table(
            {
                "key": table.column("key").cast(pa.string()).take(pa.array(keep)),
                "row": pa.array(keep + base, pa.int64()),
                "words": pa.array(m.words[keep]),
                "flags": pa.array(bits[keep]),
            }
        )


@dataclass
class Scan:
    """A whole dataset's scan: tallies per group, the sampled flagged captions, and its spill files."""

    tallies: dict[Label, Tally]
    groups: dict[int, Label]  # the spill files' group ids
    samples: list[dict[str, Any]]
    bands: Spill  # (h: LSH band key, sample, grp) of every measured caption
    openings: Spill  # (h: hash of an opening, grp, n) per shard
    opening_texts: Path  # "h<TAB>opening" lines: the text of each hash
    rows: Path | None
    shards: list[int]
    failed: dict[int, str]
    duplicates: Any = None  # set by the global pass (lenscap.audit.summary.Duplicates)


BAND_RECORD = np.dtype([("h", "<u8"), ("sample", "<i8"), ("grp", "<i4")])  # sample: shard << 32 | row
OPENING_RECORD = np.dtype([("h", "<u8"), ("grp", "<i4"), ("n", "<i8")])


def opening_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class _Collector:
    """What the scan keeps of each shard's parts as they come back: tallies, the sample, spilled keys."""

    def __init__(self, spill: Path, sample: int, rows: bool, progress: Any) -> None:
        spill.mkdir(parents=True, exist_ok=True)
        self.spill, self.sample, self.rows, self.progress = spill, sample, rows, progress
        self.groups: dict[Label, int] = {}
        self.tallies: dict[Label, Tally] = {}
        self.heap: list[tuple[int, str, int, dict[str, Any]]] = []
        self.bands = Spill(spill / "bands", BAND_RECORD)
        self.openings = Spill(spill / "openings", OPENING_RECORD)
        self.texts = open(spill / "openings.tsv", "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.row_writer: pq.ParquetWriter | None = None

    def add(self, shard_id: int, part: dict[str, Any]) -> None:
        for label, tally in part["tallies"].items():
            self.tallies.setdefault(label, Tally()).merge(tally)
        global_ids = np.array([self.groups.setdefault(label, len(self.groups)) for label in part["labels"]], np.int32)
        keys, who = part["band_keys"], part["band_rows"]
        if len(keys):
            records = np.empty(len(keys), BAND_RECORD)
            records["h"], records["sample"] = keys, (np.int64(shard_id) << np.int64(32)) | who
            records["grp"] = global_ids[part["row_groups"][who]]
            self.bands.append(records)
        if part["openings"]:
            self._add_openings(part["openings"])
        for rank, key, row, info in part["samples"]:
            entry = (-rank, key, (shard_id << 32) | row, info | {"shard": shard_id, "row": row})
            if len(self.heap) < self.sample:
                heapq.heappush(self.heap, entry)
            elif entry > self.heap[0]:
                heapq.heapreplace(self.heap, entry)
        if self.rows and part.get("rows") is not None:
            table = part["rows"].append_column("shard", pa.array([shard_id] * part["rows"].num_rows, pa.int32()))
            if self.row_writer is None:
                self.row_writer = pq.ParquetWriter(self.spill / "rows.parquet", table.schema)
            self.row_writer.write_table(table)
        if self.progress is not None:
            self.progress.advance(shards=1, samples=sum(t.captions for t in part["tallies"].values()))

    def _add_openings(self, counted: Counter[tuple[Label, str]]) -> None:
        items = list(counted.items())
        records = np.empty(len(items), OPENING_RECORD)
        hashes = [opening_hash(o) for (_, o), _ in items]
        records["h"], records["n"] = hashes, [n for _, n in items]
        records["grp"] = [self.groups[label] for (label, _), _ in items]
        self.openings.append(records)
        self.texts.writelines(f"{h:016x}\t{o}\n" for h, ((_, o), _) in zip(hashes, items, strict=True))

    def close(self) -> None:
        self.bands.close()
        self.openings.close()
        self.texts.close()
        if self.row_writer is not None:
            self.row_writer.close()


def scan(
    src: Dataset | ParquetFiles,
    settings: AuditSettings,
    job: Job,
    spill: Path,
    *,
    sample: int = 10,
    seed: int = 0,
    rows: bool = False,
    progress: Any = None,
) -> Scan:
    """Scan every complete, undamaged shard of ``src`` on ``job``'s executor; spill into ``spill``."""
    damaged = src.damaged_shards()
    shards = [i for i in src.completed_ids() if i not in damaged]
    kept = _Collector(spill, sample, rows, progress)
    if progress is not None:
        progress.start(len(shards), 0)
    try:
        failed = job.map(ScanJob(src, settings, sample, seed, rows), shards, kept.add)
    finally:
        kept.close()
        if progress is not None:
            progress.finish()
    samples = [info for _, _, _, info in sorted(kept.heap, key=lambda e: -e[0])]
    return Scan(
        kept.tallies,
        {gid: label for label, gid in kept.groups.items()},
        samples,
        kept.bands,
        kept.openings,
        spill / "openings.tsv",
        spill / "rows.parquet" if kept.row_writer is not None else None,
        shards,
        failed,
    )
