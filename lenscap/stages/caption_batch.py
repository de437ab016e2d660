"""Captioning as a batch job: pack requests into files, submit them, collect, merge into shards.

Everything lives under ``OUT/.lenscap/batch/``, and every step is recorded before and after it
happens, so any rerun (the same command, or a cron job) carries on from where the last one stopped:

    files/NAME.json      one record per batch file: packed -> uploading -> uploaded -> creating
                         -> submitted -> done -> merged, with its file and batch ids
    inputs/NAME.jsonl    the packed requests (removed once uploaded); NAME.ids: their custom ids
    outputs/NAME.jsonl   the downloaded output and error files
    job.json             the job id that tags uploads and batches, so a run that died between
                         "create" and "record" finds its batch by metadata instead of making another

Rounds: round 0 packs every sample that has no answer yet. When all of a round's files are merged,
samples still without an answer (expired, cancelled, 429/5xx, torn output lines) go into the next
round, up to ``max_rounds``; after the last, they get ``caption_status=error`` with the API's message.
Answers go into the same per-shard journals as online captioning, and a shard is written as soon as
every sample in it has one, by the same code.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lenscap.backends.base import ERROR, CaptionResult
from lenscap.backends.openai_batch import TERMINAL, BatchOptions
from lenscap.captioning.images import UnreadableImage
from lenscap.captioning.journal import Journal
from lenscap.dataset import Dataset
from lenscap.errors import BudgetReached, UsageError
from lenscap.journal import atomic_write_bytes, atomic_write_json
from lenscap.layout import shard_name
from lenscap.progress import Progress
from lenscap.result import JobResult
from lenscap.runner import OwnedJob, owned_job
from lenscap.stages.caption import CaptionStage
from lenscap.storage import require_local

__all__ = ["BatchOptions", "BatchResult", "run_batch_caption", "batch_status", "cancel_batches"]

_FINAL_HTTP = (400, 401, 403, 404, 413, 422)  # the request itself is wrong: asking again will not help
_IN_FLIGHT = ("uploading", "uploaded", "creating", "submitted")


@dataclass
class BatchResult(JobResult):
    """A batch caption job's result: whether every request is answered and merged (``complete``; a run
    with --no-wait ends before), its batch files by state, and what it spent."""

    complete: bool = False
    files: dict[str, int] = field(default_factory=dict)
    spent_usd: float = 0.0

    @property
    def exit_code(self) -> int:
        return 0  # batches still running are not a failure: the next run (or --wait) collects them


def _custom_id(shard_id: int, key: str) -> str:
    return f"{shard_name(shard_id)}/{key}"


def _parse_custom_id(custom_id: str) -> tuple[int, str]:
    shard, _, key = custom_id.partition("/")
    return int(shard), key


class _BatchJob:
    def __init__(self, stage: CaptionStage, src: Dataset, dst: Dataset, options: BatchOptions, progress: Progress) -> None:
        self.stage, self.src, self.dst, self.options, self.progress = stage, src, dst, options, progress
        self.backend: Any = stage.backend
        self.root = dst.work_dir / "batch"
        for sub in ("files", "inputs", "outputs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.transport = self.backend.transport(self.root)
        self.job_id = self._job_id()
        self.shards = src.completed_ids()
        assert stage.budget is not None, "stage.begin() first"
        self.budget = stage.budget

    # -- state on disk --------------------------------------------------------------------------

    def _job_id(self) -> str:
        path = self.root / "job.json"
        if path.exists():
            return str(json.loads(path.read_text())["job_id"])
        job = {"job_id": uuid.uuid4().hex, "backend": self.backend.name, "base_url": self.backend.parameters().get("base_urls", [None])[0],
               "key_variable": self.backend.options.api_key_env, "model": self.backend.model}
        atomic_write_json(path, job)
        return str(job["job_id"])

    def round(self) -> dict[str, Any]:
        """The round being packed, and whether all of it is packed."""
        path = self.root / "round.json"
        return json.loads(path.read_text()) if path.exists() else {"round": 0, "closed": False}

    def set_round(self, round_no: int, closed: bool) -> None:
        atomic_write_json(self.root / "round.json", {"round": round_no, "closed": closed})

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted((self.root / "files").glob("*.json"))]

    def save(self, record: dict[str, Any]) -> None:
        atomic_write_json(self.root / "files" / f"{record['name']}.json", record)

    def recover(self) -> None:
        """Inputs without a record were being packed when a run died: they are packed again."""
        named = {p.stem for p in (self.root / "files").glob("*.json")}
        for p in (self.root / "inputs").glob("*"):
            if p.name.startswith(".") or p.name.split(".")[0] not in named:
                p.unlink()

    def journal(self, shard_id: int) -> Journal:
        return Journal(self.stage._journal_dir(self.dst) / f"{shard_name(shard_id)}.jsonl")

    def _remote_name(self, name: str) -> str:
        return str(self.transport.remote_name(self.job_id, name))

    # -- packing --------------------------------------------------------------------------------

    def pack_next(self, round_no: int, cursor: tuple[int, int]) -> dict[str, Any] | None:
        """Pack the next file of ``round_no`` from ``cursor`` (shard, row). None when nothing is left."""
        index = sum(1 for r in self.records() if r["round"] == round_no)
        name = f"r{round_no:02d}-{index:06d}"
        lines: list[bytes] = []
        ids: list[str] = []  # "custom_id<TAB>cache key<TAB>OCR hint as JSON": what merging needs, without re-reading images
        size = tokens = 0
        cost = 0.0
        end: tuple[int, int] | None = None
        for shard_id in self.shards:
            if shard_id < cursor[0] or self.dst.is_complete(shard_id):
                continue
            journal = self.journal(shard_id)
            done = journal.load()
            try:
                for row, sample in enumerate(self.src.iter_samples(shard_id)):
                    if (shard_id, row) < cursor or not sample.ok or sample.key in done:
                        continue
                    key = self.stage.cache_key(sample)
                    hit = self.stage._cache.get(key) if self.stage._cache is not None else None
                    if hit is not None:
                        journal.append({**hit, "key": sample.key, "cached": True})
                        continue
                    request = self.stage.request_for(sample)
                    try:
                        body, estimate = self.backend.build_body(request)
                    except UnreadableImage as e:
                        journal.append({**CaptionResult(sample.key, ERROR, error=str(e)).to_dict(), "cached": False})
                        continue
                    line = json.dumps({"custom_id": _custom_id(shard_id, sample.key), "method": "POST",
                                       "url": "/v1/chat/completions", "body": body}).encode() + b"\n"
                    if len(line) > self.options.max_file_bytes:
                        journal.append({**CaptionResult(sample.key, ERROR, error="request larger than --max-file-mb").to_dict(), "cached": False})
                        continue
                    if len(lines) >= self.options.max_requests_per_file or size + len(line) > self.options.max_file_bytes:
                        end = (shard_id, row)
                        break
                    lines.append(line)
                    # The OCR hint's text travels with the id, to be recorded with the answer (--hints ocr).
                    ids.append(f"{_custom_id(shard_id, sample.key)}\t{key}\t{json.dumps(request.ocr_text)}")
                    size += len(line)
                    tokens += estimate + self.backend.options.max_tokens
                    cost += self.backend.price(estimate, self.backend.options.max_tokens) or 0.0
            finally:
                journal.close()
            if end is not None:
                break
        if not lines:
            return None
        atomic_write_bytes(self.root / "inputs" / f"{name}.ids", "\n".join(ids).encode() + b"\n")
        atomic_write_bytes(self.root / "inputs" / f"{name}.jsonl", b"".join(lines))
        record = {"name": name, "round": round_no, "requests": len(lines), "bytes": size, "est_tokens": tokens,
                  "est_cost": cost, "cursor_end": list(end) if end else None, "state": "packed",
                  "file_id": None, "batch_id": None, "status": None}
        self.save(record)
        return record

    # -- submitting -----------------------------------------------------------------------------

    def can_submit(self, record: dict[str, Any], records: list[dict[str, Any]]) -> str | None:
        """Why ``record`` must wait, or None."""
        limit = self.options.max_enqueued_tokens
        if limit is not None:
            if record["est_tokens"] > limit:
                raise UsageError(f"batch file {record['name']} holds about {record['est_tokens']:,} tokens, more than "
                                 f"--max-enqueued-tokens {limit:,}: lower --max-requests-per-file")
            queued = sum(r["est_tokens"] for r in records if r["state"] in _IN_FLIGHT and r is not record)
            if queued + record["est_tokens"] > limit:
                return "queue"
        if record["state"] == "packed" and not self.budget.reserve(record["est_cost"]):
            return "budget"
        return None

    def submit(self, record: dict[str, Any]) -> None:
        remote = self._remote_name(record["name"])
        if record["state"] in ("packed", "uploading"):
            file_id = self.transport.find_upload(remote) if record["state"] == "uploading" else None
            if file_id is None:
                record["state"] = "uploading"
                self.save(record)  # before: a run that dies during the upload looks for it by name
                file_id = self.transport.upload(self.root / "inputs" / f"{record['name']}.jsonl", remote)
            record.update(state="uploaded", file_id=file_id)
            self.save(record)
        metadata = {"lenscap_job": self.job_id, "lenscap_file": record["name"]}
        batch_id = self.transport.find_batch(metadata) if record["state"] == "creating" else None
        if batch_id is None:
            record["state"] = "creating"
            self.save(record)  # before: a run that dies before recording the batch finds it by metadata
            batch_id = self.transport.create(record["file_id"], metadata)
        record.update(state="submitted", batch_id=batch_id, status="validating", submitted_at=time.time())
        self.save(record)
        self.transport.release(self.root / "inputs" / f"{record['name']}.jsonl")

    # -- collecting -----------------------------------------------------------------------------

    def poll(self, record: dict[str, Any]) -> None:
        info = self.transport.poll(record["batch_id"], expected=record["requests"])
        record["status"], record["counts"] = info["status"], info["counts"]
        if info["status"] not in TERMINAL:
            self.save(record)
            return
        out = self.root / "outputs"
        atomic_write_bytes(out / f"{record['name']}.jsonl", self.transport.fetch(info["output_file_id"]))
        atomic_write_bytes(out / f"{record['name']}.errors.jsonl", self.transport.fetch(info["error_file_id"]))
        record.update(state="done", batch_errors=info["errors"])
        self.save(record)

    def merge(self, record: dict[str, Any]) -> None:
        """Answers into the journals (idempotent: a rerun after a crash mid-merge repeats nothing)."""
        by_shard: dict[int, list[dict[str, Any]]] = {}
        retry: dict[str, str] = {}
        seen: set[str] = set()
        spent = 0.0
        cache_keys: dict[str, str] = {}
        ocr_texts: dict[str, str | None] = {}
        for line in (self.root / "inputs" / f"{record['name']}.ids").read_text().splitlines():
            if line:
                custom_id, key, *ocr = line.split("\t", 2)  # files packed before the OCR text was kept have two fields
                cache_keys[custom_id] = key
                ocr_texts[custom_id] = json.loads(ocr[0]) if ocr else None
        for name in (f"{record['name']}.jsonl", f"{record['name']}.errors.jsonl"):
            for raw in (self.root / "outputs" / name).read_bytes().splitlines():
                if not raw.strip():
                    continue
                entry, custom_id, message = self._read_line(raw)
                if custom_id is None or custom_id not in cache_keys:
                    continue  # a torn line: its request counts as missing and is asked again
                seen.add(custom_id)
                if entry is None:
                    retry[custom_id] = message or "no answer"
                    continue
                if "ocr" in self.stage.hints:
                    entry["ocr_text"] = ocr_texts[custom_id]
                if self.stage._cache is not None and entry["status"] != ERROR:
                    self.stage._cache.put(cache_keys[custom_id], {k: v for k, v in entry.items() if k not in ("key", "cached")})
                shard_id, _ = _parse_custom_id(custom_id)
                by_shard.setdefault(shard_id, []).append(entry)
                spent += entry.get("cost_usd") or 0.0
        status = record.get("status")
        for custom_id in cache_keys:
            if custom_id not in seen:
                retry.setdefault(custom_id, f"no result in the batch output (batch {status})"
                                 + (f": {'; '.join(record.get('batch_errors') or [])}" if record.get("batch_errors") else ""))
        for shard_id, entries in by_shard.items():
            journal = self.journal(shard_id)
            for entry in entries:
                journal.append(entry)
                self.stage.tick(1, 0.0 if entry.get("cached") else entry.get("cost_usd") or 0.0)
            journal.close()
        if retry:
            with open(self.root / "retry.jsonl", "ab") as f:  # the last message per request, for the final round
                for custom_id, message in retry.items():
                    f.write(json.dumps({"id": custom_id, "message": message}).encode() + b"\n")
        self.budget.settle(record["est_cost"], spent)
        record.update(state="merged", answered=sum(len(v) for v in by_shard.values()), unanswered=len(retry))
        self.save(record)

    def _read_line(self, raw: bytes) -> tuple[dict[str, Any] | None, str | None, str | None]:
        """(journal entry or None to retry, custom id, message) for one output or error line."""
        try:
            line = json.loads(raw)
            custom_id = line["custom_id"]
        except (ValueError, KeyError, TypeError):
            return None, None, None
        _, key = _parse_custom_id(custom_id)
        response = line.get("response") or {}
        error = line.get("error")
        code = response.get("status_code")
        body = response.get("body") or {}
        if error or code != 200:
            message = (error or {}).get("message") or ((body.get("error") or {}).get("message") if isinstance(body, dict) else None) or f"HTTP {code}"
            if code in _FINAL_HTTP:
                return {**CaptionResult(key, ERROR, error=f"HTTP {code}: {message}").to_dict(), "cached": False}, custom_id, None
            return None, custom_id, message
        try:
            from openai.types.chat import ChatCompletion

            completion = ChatCompletion.model_validate(body)
            if not completion.choices:
                raise ValueError("no choices")
        except Exception as e:  # noqa: BLE001 - any malformed body
            return None, custom_id, f"malformed reply in the batch output: {type(e).__name__}"
        result = self.backend.interpret(key, completion, 0)
        return {**result.to_dict(), "cached": False}, custom_id, None

    # -- finishing shards -----------------------------------------------------------------------

    def _ok_keys(self, shard_id: int) -> list[str]:
        """Keys of the samples that need a caption (downloaded ones): from the parquet, no images read."""
        table = self.src.read_table(shard_id, columns=["key", "status"])
        return [str(k) for k, st in zip(table.column("key").to_pylist(), table.column("status").to_pylist(), strict=True)
                if st == "success"]

    def commit_ready_shards(self) -> None:
        for shard_id in self.shards:
            if self.dst.is_complete(shard_id):
                continue
            journal = self.journal(shard_id)
            done = journal.load()
            if all(k in done for k in self._ok_keys(shard_id)):
                self.stage._write_shard(self.src, self.dst, shard_id, done)
                journal.remove()
                self.progress.advance(shards=1)

    def finalize_errors(self, rounds: int) -> None:
        """After the last round: what still has no answer gets an error with the last message seen."""
        last: dict[str, str] = {}
        retry_file = self.root / "retry.jsonl"
        if retry_file.exists():
            for raw in retry_file.read_bytes().splitlines():
                try:
                    item = json.loads(raw)
                    last[item["id"]] = item["message"]
                except (ValueError, KeyError):
                    continue
        for shard_id in self.shards:
            if self.dst.is_complete(shard_id):
                continue
            journal = self.journal(shard_id)
            done = journal.load()
            for key in self._ok_keys(shard_id):
                if key not in done:
                    message = last.get(_custom_id(shard_id, key), "no result")
                    journal.append({**CaptionResult(key, ERROR, error=f"{message} (after {rounds} batch rounds)").to_dict(), "cached": False})
            journal.close()

    # -- the loop -------------------------------------------------------------------------------

    def step(self) -> str:
        """One pass: merge, commit, poll, submit, pack. Returns done, waiting or budget."""
        merged = False
        for r in self.records():
            if r["state"] == "submitted":
                self.poll(r)
            if r["state"] == "done":
                self.merge(r)
                merged = True
        if merged:  # finished shards leave the packing below (each scan reads every open shard's keys)
            self.commit_ready_shards()
        blocked = None
        records = self.records()
        for r in records:  # packed earlier, or interrupted mid-submit
            if r["state"] in ("packed", "uploading", "uploaded", "creating"):
                blocked = self.can_submit(r, records) if r["state"] == "packed" else None
                if blocked:
                    break
                self.submit(r)
        current = self.round()
        round_no = current["round"]
        while blocked is None and not current["closed"]:
            mine = [r for r in self.records() if r["round"] == round_no]
            cursor = tuple(mine[-1]["cursor_end"]) if mine else (-1, -1)
            record = self.pack_next(round_no, cursor)  # type: ignore[arg-type]
            if record is None or record["cursor_end"] is None:
                current = {"round": round_no, "closed": True}
                self.set_round(round_no, True)
            if record is not None:
                blocked = self.can_submit(record, self.records())
                if blocked is None:
                    self.submit(record)
        self.commit_ready_shards()
        if all(self.dst.is_complete(i) for i in self.shards):
            return "done"
        records = self.records()
        if current["closed"] and all(r["state"] == "merged" for r in records):
            # The round is over; what has no answer yet is asked again, or, after the last round, fails.
            if round_no >= self.options.max_rounds:
                self.finalize_errors(round_no + 1)
                self.commit_ready_shards()
                return "done"
            self.set_round(round_no + 1, False)
            return self.step()  # pack and submit the new round now, not on the next run
        if blocked == "budget" and not any(r["state"] in _IN_FLIGHT for r in records):
            return "budget"
        return "waiting"


def run_batch_caption(stage: CaptionStage, in_dir: str | Path, out_dir: str | Path, progress: Progress, *,
                      overwrite: bool = False, allow_incomplete: bool = False) -> BatchResult:
    options: BatchOptions = stage.backend.batch  # type: ignore[attr-defined]
    for location, what in ((in_dir, "the input of a batch caption job"), (out_dir, "the output of a batch caption job")):
        require_local(location, what)
    with owned_job(stage, in_dir, out_dir, overwrite=overwrite, allow_incomplete=allow_incomplete) as owned:
        return _run_locked(owned, options, progress)


def _run_locked(owned: OwnedJob, options: BatchOptions, progress: Progress) -> BatchResult:
    stage, src, dst = owned.stage, owned.src, owned.dst
    assert isinstance(stage, CaptionStage)
    stage.begin(src, dst)
    stage.setup()
    job = _BatchJob(stage, src, dst, options, progress)
    job.recover()
    in_flight = [r for r in job.records() if r["state"] in ("uploading", "uploaded", "creating", "submitted", "done")]
    for r in in_flight:  # already committed to: reserved until merged
        job.budget.reserve_forced(r["est_cost"])
    write_manifest = owned.write_manifest
    write_manifest()
    progress.start(len(job.shards), sum(1 for i in job.shards if dst.is_complete(i)))
    try:
        while True:
            state = job.step()
            files = job.records()
            flying = sum(1 for r in files if r["state"] in _IN_FLIGHT)
            progress.status(f"{flying} batches in flight, ${job.budget.spent:.4f} spent")
            if state in ("done", "budget") or not options.wait:
                break
            time.sleep(options.poll_interval_s)
    finally:
        progress.finish()
    manifest = write_manifest()
    if state == "budget":
        raise BudgetReached(f"--max-cost ${job.budget.max_usd:g} reached (${job.budget.spent:.4f} spent or reserved by this "
                            "output directory); finished shards are kept: rerun with a higher --max-cost to go on")
    states: dict[str, int] = {}
    for r in job.records():
        if r["requests"]:
            states[r["state"]] = states.get(r["state"], 0) + 1
    return BatchResult.from_manifest(str(dst.path), manifest, complete=state == "done", files=states,
                                     spent_usd=job.budget.spent)


def batch_status(out_dir: str | Path) -> dict[str, Any]:
    """What the batch job in ``out_dir`` has done, from its records (no network)."""
    require_local(out_dir, "batch status's directory")
    dst = Dataset.open(out_dir)
    root = dst.work_dir / "batch"
    if not (root / "job.json").exists():
        raise UsageError(f"{dst.path} holds no batch job (run lenscap caption --backend openai-batch first)")
    job = json.loads((root / "job.json").read_text())
    records = [json.loads(p.read_text()) for p in sorted((root / "files").glob("*.json"))]
    records = [r for r in records if r["requests"]]
    spent = sum(float(dst.read_stats(i).get("caption_spent_usd", 0.0)) for i in dst.completed_ids())
    for path in (dst.work_dir / "caption").glob("*.jsonl"):
        spent += sum(e.get("cost_usd") or 0.0 for e in Journal(path).load().values() if not e.get("cached"))
    by_state: dict[str, int] = {}
    for r in records:
        by_state[r["state"]] = by_state.get(r["state"], 0) + 1
    manifest = dst.read_manifest() or {}
    return {
        "out_dir": str(dst.path), "job_id": job["job_id"], "backend": job["backend"], "model": job["model"],
        "shards": {"completed": len(dst.completed_ids()), "expected": (manifest.get("shards") or {}).get("expected")},
        "files": by_state, "requests": sum(r["requests"] for r in records),
        "rounds": max((r["round"] for r in records), default=0) + 1 if records else 0,
        "spent_usd": round(spent, 6),
        "batches": [{k: r.get(k) for k in ("name", "round", "state", "status", "requests", "batch_id", "counts")} for r in records],
    }


def cancel_batches(out_dir: str | Path, backend: Any) -> list[str]:
    """Cancel every batch of the job still running; their finished answers are merged on the next run."""
    require_local(out_dir, "batch cancel's directory")
    dst = Dataset.open(out_dir)
    root = dst.work_dir / "batch"
    transport = backend.transport(root)
    cancelled = []
    for p in sorted((root / "files").glob("*.json")):
        r = json.loads(p.read_text())
        if r["state"] == "submitted" and r.get("status") not in TERMINAL:
            transport.cancel(r["batch_id"])
            cancelled.append(r["batch_id"])
    return cancelled
