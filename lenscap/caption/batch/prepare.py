"""What a batch job runs on its workers: packing, part one, and the reading of finished batches.

``BatchWorker`` is an executor job. An item ``>= 0`` is a source shard to prepare; an item ``< 0`` is the
finished batch file number ``-item - 1`` to read (``merge.read_answers``: parsing and validating every
answer is most of a merge's cost; the driver then only appends to the journals).

Preparing a shard: for each downloaded sample without an
answer it builds the request line (the image resized, encoded, base64) and writes the lines, in
sample order, to ``prepared/NNNNNN.jsonl`` with one id line each in ``NNNNNN.ids``; its ``NNNNNN.json``,
written last, says it is whole. This is the expensive part of packing (milliseconds a request), so
it runs on ``--processes`` or a Ray cluster; cutting the lines into batch files is a byte copy, done
by the driver (``cut.py``). Because a shard's lines depend only on its samples and the settings, the
batch files are the same bytes whichever worker built them.

Samples answered at once are journalled here and never packed: response cache hits, unreadable
images, a request larger than a batch file.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from lenscap.caption.backends.base import ERROR, CaptionResult
from lenscap.caption.batch.ids import IdLine, custom_id, prepared_paths
from lenscap.caption.batch.merge import read_answers
from lenscap.caption.cache import ResponseCache
from lenscap.caption.image_prep import UnreadableImage
from lenscap.caption.journal import Journal
from lenscap.caption.stage import CaptionStage
from lenscap.core.dataset import Dataset
from lenscap.core.layout import shard_name

__all__ = ["BatchWorker", "read_item"]


def read_item(seq: int) -> int:
    """The executor item that reads batch file number ``seq``."""
    return -seq - 1


class BatchWorker:
    """Executor job. ``run(shard_id)`` prepares one shard and returns its marker (``{"shard", "requests",
    "bytes", "tokens"}``); idempotent: a prepared shard is not built again. ``run(read_item(seq))`` returns
    ``{"answers": [(custom id, journal entry or None, message or None), ...]}`` for batch file ``seq``."""

    def __init__(self, stage: CaptionStage, src: Dataset, root: Path, journal_dir: Path, max_line_bytes: int) -> None:
        # A copy without what a worker cannot inherit (the open cache, the driver's budget).
        self.stage = copy.copy(stage)
        self.stage._cache = None
        self.stage.budget = None
        self.src, self.root, self.journal_dir, self.max_line_bytes = src, root, journal_dir, max_line_bytes
        self._cache: ResponseCache | None = None

    def setup(self) -> None:
        if self.stage.cache_dir is not None:
            self._cache = ResponseCache(self.stage.cache_dir)

    def run(self, item: int) -> dict[str, Any]:
        if item < 0:
            return {"answers": self.read(-item - 1)}
        return self.prepare(item)

    def read(self, seq: int) -> list[tuple[str, dict[str, Any] | None, str | None]]:
        names = [p.name.removesuffix(".jsonl") for p in (self.root / "outputs").glob(f"r*-{seq:06d}.jsonl")]
        if len(names) != 1:
            raise FileNotFoundError(f"no output of batch file {seq} in {self.root / 'outputs'}")
        out = self.root / "outputs"
        return list(read_answers(self.stage.backend, [out / f"{names[0]}.jsonl", out / f"{names[0]}.errors.jsonl"]))

    def prepare(self, shard_id: int) -> dict[str, Any]:
        lines_path, ids_path, marker = prepared_paths(self.root, shard_id)
        if marker.exists():
            return dict(json.loads(marker.read_text()))
        backend = self.stage.backend
        max_tokens = backend.options.max_tokens
        journal = Journal(self.journal_dir / f"{shard_name(shard_id)}.jsonl")
        done = journal.load()
        tmp_lines, tmp_ids = lines_path.with_name(f".{lines_path.name}.tmp"), ids_path.with_name(f".{ids_path.name}.tmp")
        requests = size = tokens = 0
        try:
            with open(tmp_lines, "wb") as out, open(tmp_ids, "wb") as ids:
                for sample in self.src.iter_samples(shard_id):
                    if not sample.ok or sample.key in done:
                        continue
                    key = self.stage.cache_key(sample)
                    hit = self._cache.get(key) if self._cache is not None else None
                    if hit is not None:
                        journal.append({**hit, "key": sample.key, "cached": True})
                        continue
                    request = self.stage.request_for(sample)
                    try:
                        body, estimate = backend.build_body(request)
                    except UnreadableImage as e:
                        journal.append({**CaptionResult(sample.key, ERROR, error=str(e)).to_dict(), "cached": False})
                        continue
                    cid = custom_id(shard_id, sample.key)
                    line = json.dumps(backend.batch_line(cid, body)).encode() + b"\n"
                    if len(line) > self.max_line_bytes:
                        journal.append(
                            {
                                **CaptionResult(sample.key, ERROR, error="request larger than --max-file-mib").to_dict(),
                                "cached": False,
                            }
                        )
                        continue
                    out.write(line)
                    # The OCR hint's text travels with the id, to be recorded with the answer (--hints ocr).
                    ids.write(
                        IdLine(
                            cid,
                            key,
                            json.dumps(request.ocr_text),
                            len(line),
                            estimate,
                            backend.price(estimate, max_tokens) or 0.0,
                        ).encode()
                    )
                    requests, size, tokens = requests + 1, size + len(line), tokens + estimate
                for f in (out, ids):
                    f.flush()
                    os.fsync(f.fileno())
        finally:
            journal.close()
        os.replace(tmp_lines, lines_path)
        os.replace(tmp_ids, ids_path)
        info = {"shard": shard_id, "requests": requests, "bytes": size, "tokens": tokens}
        tmp = marker.with_name(f".{marker.name}.tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, marker)  # last: the shard's lines are whole
        return info
