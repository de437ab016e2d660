"""The batch job's driver: prepare, cut, submit under the queue limit, poll, merge, commit shards.

Each pass (``step``) does, in order: poll the batches in flight; merge the finished ones into the
per-shard journals, committing every shard whose requests all have their final answer; submit the
files waiting, while the batch queue (tokens in batches created and not finished) and ``--max-cost``
allow; cut and submit new files the same way, preparing more shards on the executor when the next
file needs them. A pass touches the files in flight and the shards they hold, never every shard, so
``--wait`` (or cron reruns) can drive an 800M-request job for weeks.

Rounds: a request that got no answer (expired, cancelled, 429/5xx, a torn output line) is spooled with
its prepared line and asked again in a file of the next round, up to ``--max-retries`` rounds; after
the last, it gets ``caption_status=error`` with the API's message.

The queue limit is ``--max-enqueued-tokens`` or, without it, learned from the API: a batch that fails
with ``token_limit_exceeded`` names the limit; its uploaded file gets a new batch once the queue
has room, and nothing is asked twice.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from lenscap.caption.backends.base import ERROR, CaptionResult
from lenscap.caption.backends.openai_batch import TERMINAL, BatchOptions
from lenscap.caption.batch.cut import Cutter, NeedLines, spool_paths
from lenscap.caption.batch.ids import IdLine, parse_custom_id
from lenscap.caption.batch.prepare import BatchWorker, read_item
from lenscap.caption.batch.state import IN_QUEUE, WAITING, BatchState
from lenscap.caption.journal import Journal
from lenscap.caption.stage import CaptionStage
from lenscap.core.dataset import Dataset
from lenscap.core.errors import LenscapError, UsageError
from lenscap.core.job import Job
from lenscap.core.layout import shard_name
from lenscap.core.progress import Progress

__all__ = ["BatchJob", "open_state"]

_LIMIT_RE = re.compile(r"Limit:\s*([\d,]+)")


def open_state(root: Path) -> BatchState:
    """The job's state, refusing the per-file JSON records of lenscap before the state file."""
    if not (root / "state.sqlite").exists() and any((root / "files").glob("*.json")):
        raise UsageError(
            f"{root.parent.parent} holds a batch job started by an older lenscap (.lenscap/batch/files/*.json): "
            "finish it with that version, or start again with --overwrite"
        )
    return BatchState(root / "state.sqlite")


class BatchJob:
    def __init__(
        self, stage: CaptionStage, src: Dataset, dst: Dataset, options: BatchOptions, progress: Progress, driver: Job
    ) -> None:
        self.stage, self.src, self.dst, self.options, self.progress, self.driver = stage, src, dst, options, progress, driver
        self.backend: Any = stage.backend
        self.root = dst.work_dir / "batch"
        for sub in ("inputs", "outputs", "prepared", "retry"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.state = open_state(self.root)
        self.transport = self.backend.transport(self.root)
        self.job_id = self._job_id()
        with self.state.transaction():
            self.state.put("limit_given", options.max_enqueued_tokens)  # for batch status
            self.state.put("max_rounds", options.max_rounds)
        self.journals = stage._journal_dir(dst)
        self.shards_total = len(shards := src.completed_ids())
        self.open = [i for i in shards if not dst.is_complete(i)]
        self.remaining = set(self.open)
        self.failed: dict[int, str] = {}
        self.cutter = Cutter(self.state, self.root, options, self.open)
        self.worker = BatchWorker(stage, src, self.root, self.journals, options.max_file_bytes)
        assert stage.budget is not None, "stage.begin() first"
        self.budget = stage.budget

    def _job_id(self) -> str:
        job_id = self.state.get("job_id")
        if job_id is None:
            job_id = uuid.uuid4().hex
            with self.state.transaction():
                self.state.put("job_id", job_id)
                self.state.put(
                    "job",
                    {
                        "backend": self.backend.name,
                        "model": self.backend.model,
                        "base_url": self.backend.parameters().get("base_urls", [None])[0],
                        "key_variable": self.backend.options.api_key_env,
                    },
                )
        return str(job_id)

    def close(self) -> None:
        self.driver.close()
        self.state.close()

    # -- after a crash --------------------------------------------------------------------------

    def recover(self) -> None:
        """Files a killed run left half made are removed (and made again); finished work is finished."""

        def state_of(path: Path) -> str | None:
            row = self.state.db.execute("SELECT state FROM files WHERE name = ?", (path.name.split(".")[0],)).fetchone()
            return row[0] if row else None

        for path in (self.root / "inputs").glob("*.ids"):  # merged, then killed before its clean-up ended
            if state_of(path) == "merged":
                self._clean_up(self.state.file(path.name.split(".")[0]))
        for path in (self.root / "inputs").iterdir():  # cut and not recorded
            if path.name.startswith(".") or state_of(path) in (None, "merged"):
                path.unlink()
        for path in (self.root / "outputs").iterdir():
            if path.name.startswith(".") or (state_of(path) == "merged" and not path.name.endswith(".gz")):
                path.unlink()
        for path in [*(self.root / "prepared").glob(".*"), *(self.root / "retry").glob(".*")]:
            path.unlink()
        self.cutter.forget_consumed()
        self.commit_finished(self.open)  # merged, then killed before the shard was written
        for r in self.state.files(*IN_QUEUE, "uploading", "uploaded", "done"):  # committed to: reserved until merged
            self.budget.reserve_forced(r["est_cost"])

    # -- preparing ------------------------------------------------------------------------------

    def prepare(self, first: int) -> None:
        """Prepare the next few unprepared shards from ``open[first]`` on, all workers at once."""
        todo: list[int] = []
        for shard_id in self.open[first:]:
            if len(todo) >= 2 * self.driver.executor.width:
                break
            if shard_id not in self.failed and self.state.shard(shard_id) is None:
                todo.append(shard_id)
        if not todo:  # only failed shards ahead: packing goes on without them
            self.cutter.shards = self.open = [s for s in self.open if s not in self.failed]
            return

        def on_done(shard_id: int, info: dict[str, Any]) -> None:
            with self.state.transaction():
                self.state.add_shard(shard_id, info["requests"], info["bytes"], info["tokens"])
            if not info["requests"]:
                self.commit_finished([shard_id])  # every sample answered from the cache, or without an image

        failed = self.driver.map(self.worker, todo, on_done, keep_workers=True)
        if failed:
            self.failed.update(failed)
            self.remaining -= set(failed)
            self.cutter.shards = self.open = [s for s in self.open if s not in self.failed]

    # -- submitting -----------------------------------------------------------------------------

    def limit(self) -> int | None:
        learned = self.state.get("learned_limit")
        given = self.options.max_enqueued_tokens
        return given if learned is None else learned if given is None else min(given, learned)

    def gate(self, record: dict[str, Any]) -> str | None:
        """Why ``record`` must wait (queue, budget), or None."""
        limit = self.limit()
        if limit is not None:
            if record["est_tokens"] > limit:
                raise UsageError(
                    f"batch file {record['name']} holds about {record['est_tokens']:,} input tokens, more than the "
                    f"batch queue limit {limit:,} (--max-enqueued-tokens, or the API's): lower --max-requests-per-file"
                )
            if self.state.queued_tokens() + record["est_tokens"] > limit:
                return "queue"
        if record["state"] == "packed" and not self.budget.reserve(record["est_cost"]):
            return "budget"
        return None

    def _save(self, record: dict[str, Any]) -> None:
        with self.state.transaction():
            self.state.save(record)

    def submit(self, record: dict[str, Any]) -> None:
        remote = str(self.transport.remote_name(self.job_id, record["name"]))
        if record["state"] in ("packed", "uploading"):
            file_id = self.transport.find_upload(remote, record["step_at"]) if record["state"] == "uploading" else None
            if file_id is None:
                record.update(state="uploading", step_at=time.time())
                self._save(record)  # before: a run that dies during the upload looks for it by name
                file_id = self.transport.upload(self.root / "inputs" / f"{record['name']}.jsonl", remote)
            record.update(state="uploaded", file_id=file_id)
            self._save(record)
        # The try number tells a batch refused for the queue limit from the one created to replace it.
        metadata = {"lenscap_job": self.job_id, "lenscap_file": record["name"], "lenscap_try": str(record["tries"])}
        batch_id = None
        if record["state"] == "creating":
            # The job's batches are not this file's (a provider without metadata matches by its size).
            taken = {r["batch_id"] for r in self.state.files(*IN_QUEUE, "done") if r.get("batch_id")}
            batch_id = self.transport.find_batch(metadata, record["step_at"], taken)
        if batch_id is None:
            record.update(state="creating", step_at=time.time())
            self._save(record)  # before: a run that dies before recording the batch finds it by metadata
            batch_id = self.transport.create(record["file_id"], metadata)
        record.update(state="submitted", batch_id=batch_id, status="validating", submitted_at=time.time())
        self._save(record)

    def fill_queue(self) -> str | None:
        """Submit the files waiting, then cut and submit new ones, while the queue and the budget allow.
        Returns why it stopped (queue, budget), or None when nothing is left to submit now."""
        for record in self.state.files("creating"):  # counted in the queue already: found (or made) first
            self.submit(record)
        for record in self.state.files(*WAITING):
            blocked = self.gate(record)
            if blocked:
                return blocked
            self.submit(record)
        while True:
            made = self.cutter.next_file()
            if isinstance(made, NeedLines):
                self.prepare(made.first)
                continue
            if made is None:
                return None
            blocked = self.gate(made)
            if blocked:
                return blocked
            self.submit(made)

    # -- collecting -----------------------------------------------------------------------------

    def poll(self, record: dict[str, Any]) -> None:
        info = self.transport.poll(record["batch_id"], expected=record["requests"])
        if info["status"] == "failed" and "token_limit_exceeded" in info.get("codes", []):
            self._queue_full(record, info)
            return
        if info["status"] not in TERMINAL:
            if (info["status"], info["counts"]) != (record["status"], record["counts"]):
                record.update(status=info["status"], counts=info["counts"])
                self._save(record)
            return
        out = self.root / "outputs"
        for suffix, file_id in ((".jsonl", info["output_file_id"]), (".errors.jsonl", info["error_file_id"])):
            tmp = out / f".{record['name']}{suffix}.tmp"
            tmp.write_bytes(self.transport.fetch(file_id))
            tmp.replace(out / f"{record['name']}{suffix}")
        record.update(
            state="done",
            status=info["status"],
            counts=info["counts"],
            errors=info["errors"],
            output_file_id=info["output_file_id"],
            error_file_id=info["error_file_id"],
        )
        self._save(record)

    def _queue_full(self, record: dict[str, Any], info: dict[str, Any]) -> None:
        """The API refused the batch for its queue limit: learn the limit, and create a new batch for the
        same uploaded file once the queue has room."""
        message = " ".join(info["errors"])
        found = _LIMIT_RE.search(message)
        learned = int(found.group(1).replace(",", "")) if found else max(1, self.state.queued_tokens() - record["est_tokens"])
        with self.state.transaction():
            current = self.state.get("learned_limit")
            self.state.put("learned_limit", learned if current is None else min(current, learned))
            record.update(state="uploaded", batch_id=None, status=None, tries=record["tries"] + 1)
            self.state.save(record)
        if current is None or learned < current:
            self.progress.note(f"the API's batch queue limit is {learned:,} tokens; batches are submitted within it")

    def merge_finished(self) -> None:
        """Read every finished batch's answers on the workers, and merge each as it is read."""
        done = {int(r["name"].split("-")[1]): r for r in self.state.files("done")}
        if not done:
            return
        failed = self.driver.map(
            self.worker,
            [read_item(seq) for seq in done],
            lambda item, result: self.merge(done[-item - 1], result["answers"]),
            keep_workers=True,
        )
        if failed:
            item, why = next(iter(failed.items()))
            raise LenscapError(f"reading the output of batch file {done[-item - 1]['name']} failed: {why}")

    def merge(self, record: dict[str, Any], answers: list[tuple[str, dict[str, Any] | None, str | None]]) -> None:
        """Answers into the journals, unanswered requests into the next round's spool, then one transaction."""
        name = record["name"]
        ids = {i.custom_id: i for i in IdLine.read(self.root / "inputs" / f"{name}.ids")}
        by_shard: dict[int, list[dict[str, Any]]] = {}
        retry: dict[str, str] = {}
        seen: set[str] = set()
        spent = 0.0
        for cid, entry, message in answers:
            line = ids.get(cid)
            if line is None or cid in seen:
                continue  # not this file's, or answered twice: the first answer stands
            seen.add(cid)
            if entry is None:
                retry[cid] = message or "no answer"
                continue
            if "ocr" in self.stage.hints:
                entry["ocr_text"] = line.ocr_text
            if self.stage._cache is not None and entry["status"] != ERROR:
                self.stage._cache_put(line.cache_key, {k: v for k, v in entry.items() if k not in ("key", "cached")})
            by_shard.setdefault(parse_custom_id(cid)[0], []).append(entry)
            spent += entry.get("cost_usd") or 0.0
        batch_errors = "; ".join(record.get("errors") or [])
        for cid in ids:
            if cid not in seen:
                retry[cid] = f"no result in the batch output (batch {record['status']})" + (
                    f": {batch_errors}" if batch_errors else ""
                )
        last_round = record["round"] >= self.options.max_rounds
        spool_bytes = 0
        if retry and last_round:
            for cid, message in retry.items():
                shard_id, key = parse_custom_id(cid)
                error = f"{message} (after {record['round'] + 1} batch rounds)"
                by_shard.setdefault(shard_id, []).append({**CaptionResult(key, ERROR, error=error).to_dict(), "cached": False})
        elif retry:
            spool_bytes = self._spool(record, list(ids.values()), set(retry))
        for shard_id, entries in by_shard.items():
            journal = Journal(self.journals / f"{shard_name(shard_id)}.jsonl")
            for entry in entries:
                journal.append(entry)
                self.stage.tick(1, 0.0 if entry.get("cached") else entry.get("cost_usd") or 0.0)
            journal.close()
        record.update(
            state="merged",
            answered=sum(len(v) for v in by_shard.values()),
            unanswered=len(retry),
            spent=spent,
            finished_at=time.time(),
        )
        with self.state.transaction():
            self.state.save(record)
            self.state.answered({s: len(v) for s, v in by_shard.items()})
            if retry and not last_round:
                self.state.add_spool(f"r{record['round'] + 1:02d}-{name}", record["round"] + 1, len(retry), spool_bytes)
        self.budget.settle(record["est_cost"], spent)
        self.commit_finished(sorted(by_shard))
        self._clean_up(record)

    def _spool(self, record: dict[str, Any], lines: list[IdLine], wanted: set[str]) -> int:
        """Copy the ``wanted`` of the batch input's ``lines`` (its ids, in file order) into a retry file."""
        lines_path, ids_path = spool_paths(self.root, f"r{record['round'] + 1:02d}-{record['name']}")
        size = 0
        with (
            open(self.root / "inputs" / f"{record['name']}.jsonl", "rb") as src,
            open(lines_path.with_name(f".{lines_path.name}.tmp"), "wb") as out,
            open(ids_path.with_name(f".{ids_path.name}.tmp"), "wb") as ids_out,
        ):
            for line in lines:
                raw = src.read(line.size)
                if line.custom_id in wanted:
                    out.write(raw)
                    ids_out.write(line.encode())
                    size += line.size
            for f in (out, ids_out):  # on disk before the transaction that records the spool
                f.flush()
                os.fsync(f.fileno())
        lines_path.with_name(f".{lines_path.name}.tmp").replace(lines_path)
        ids_path.with_name(f".{ids_path.name}.tmp").replace(ids_path)
        return size

    def _clean_up(self, record: dict[str, Any]) -> None:
        """A merged batch's files go (bounded disk), outputs kept compressed with keep_outputs."""
        name = record["name"]
        for suffix in (".jsonl", ".errors.jsonl"):
            path = self.root / "outputs" / f"{name}{suffix}"
            if self.options.keep_outputs and path.exists():
                with open(path, "rb") as f, gzip.open(path.with_name(path.name + ".gz"), "wb") as z:
                    shutil.copyfileobj(f, z)
            path.unlink(missing_ok=True)
        # The account's files before the local ids: an ids file left behind marks a clean-up to finish (recover).
        self.transport.forget([record.get("file_id"), record.get("output_file_id"), record.get("error_file_id")])
        for suffix in (".jsonl", ".ids"):
            (self.root / "inputs" / f"{name}{suffix}").unlink(missing_ok=True)

    def commit_finished(self, shard_ids: list[int]) -> None:
        """Write every one of ``shard_ids`` whose requests all have their final answer."""
        for shard_id in self.state.finished_shards(shard_ids):
            if not self.dst.is_complete(shard_id):
                journal = Journal(self.journals / f"{shard_name(shard_id)}.jsonl")
                self.stage._write_shard(self.src, self.dst, shard_id, journal.load())
                journal.remove()
                self.progress.advance(shards=1)
            with self.state.transaction():
                self.state.set_committed(shard_id)
            self.remaining.discard(shard_id)

    # -- the loop -------------------------------------------------------------------------------

    def step(self) -> str:
        """One pass. Returns done, waiting or budget."""
        for record in self.state.files("submitted"):
            self.poll(record)
        self.fill_queue()  # before merging: the queue refills as soon as batches leave it
        self.merge_finished()
        blocked = self.fill_queue()  # merging settles reservations and spools requests to ask again
        if not self.remaining:
            return "done"
        if blocked is None and not self.unfinished():
            self.finish_leftovers()
            return "done"
        if blocked == "budget" and not self.state.files(*IN_QUEUE):
            return "budget"
        return "waiting"

    def unfinished(self) -> bool:
        """Whether anything is still to be packed, submitted or merged."""
        return self.cutter.fresh_left() or bool(self.state.spools()) or self.state.unfinished()

    def finish_leftovers(self) -> None:
        """Everything is merged, yet shards are open (their answers were journalled by a run that died before
        recording them): a sample with no answer gets an error, and each shard is written."""
        for shard_id in sorted(self.remaining - set(self.failed)):
            journal = Journal(self.journals / f"{shard_name(shard_id)}.jsonl")
            done = journal.load()
            for sample in self.src.iter_samples(shard_id):
                if sample.ok and sample.key not in done:
                    journal.append({**CaptionResult(sample.key, ERROR, error="no result").to_dict(), "cached": False})
            journal.close()
            self.stage._write_shard(self.src, self.dst, shard_id, journal.load())
            journal.remove()
            self.progress.advance(shards=1)
            self.remaining.discard(shard_id)

    def describe(self) -> str:
        """The progress's status after each pass (``--wait`` polls): requests answered of those prepared
        so far, the batches in flight and the queue, the spend. One query over the shards, none per file."""
        limit = self.limit()
        queued = self.state.queued_tokens()
        flying = len(self.state.files(*IN_QUEUE))
        answered, requests = self.state.db.execute(
            "SELECT coalesce(sum(answered), 0), coalesce(sum(requests), 0) FROM shards"
        ).fetchone()
        queue = f"{queued:,}/{limit:,} tokens queued" if limit else f"{queued:,} tokens queued"
        return (
            f"{answered:,}/{requests:,} requests answered, {flying} batches in flight ({queue}), ${self.budget.spent:.4f} spent"
        )
