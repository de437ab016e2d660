"""``lenscap caption``: replace each sample's caption with one written by a backend.

Per shard: samples already in the shard's journal (a killed run) or in the response cache are not
asked for again; the rest stream to the backend, and every result is appended to the journal the
moment it arrives. When all are answered the output shard is written: ``caption`` is the new caption
where ``caption_status`` is ``ok`` (the replaced text is kept in ``alt_text``, or in
``previous_caption`` when the input already has an ``alt_text``), with provenance columns for
every caption. The journal goes once the shard is committed.

With ``redo`` (``--redo WHERE``), the input is a captioned dataset and only its rows where the SQL
expression is true are asked again, never from the response cache (a cached answer is the one being
redone); the other rows are carried over as they are. A ``caption_run`` column says which output
directory's run wrote each row's caption.
"""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from lenscap.caption.backends.base import ERROR, OK, REFUSED, SKIPPED, TRUNCATED, CaptionBackend, CaptionRequest, CaptionResult
from lenscap.caption.budget import Budget
from lenscap.caption.cache import ResponseCache, cache_key
from lenscap.caption.image_prep import UnreadableImage, image_size
from lenscap.caption.journal import Journal
from lenscap.caption.prompts import Prompt, ocr_hint
from lenscap.caption.vision import ocr_available, read_text_from_bytes
from lenscap.core.dataset import Dataset
from lenscap.core.errors import BudgetReached, DiskFull, MissingDependency, UsageError
from lenscap.core.install import install_hint
from lenscap.core.layout import shard_name
from lenscap.core.record import Sample
from lenscap.core.schema import Column
from lenscap.core.sql import SqlLimits, check_condition, rows_where, user_expression
from lenscap.core.stage import Stage

if TYPE_CHECKING:
    from lenscap.core.executors import Executor

__all__ = ["CaptionStage", "PROVENANCE_FIELDS"]

PROVENANCE_FIELDS = [
    pa.field("caption_backend", pa.string()),
    pa.field("caption_model", pa.string()),
    pa.field("caption_prompt", pa.string()),
    pa.field("caption_prompt_sha", pa.string()),
    pa.field("caption_input_tokens", pa.int64()),
    pa.field("caption_output_tokens", pa.int64()),
    pa.field("caption_cost_usd", pa.float64()),
    pa.field("caption_cached", pa.bool_()),
]
_CACHEABLE = (OK, TRUNCATED, REFUSED)  # answers that were paid for; errors are asked again
CAPTION_RUN = pa.field("caption_run", pa.string())  # --redo outputs only: the output whose run wrote the caption
OCR_TEXT = pa.field("caption_ocr_text", pa.string())  # --hints ocr only: what OCR read ("" nothing), as the hint said


class CaptionStage(Stage):
    name = "caption"
    needs = (*Stage.needs, Column("caption", "string", optional=True))  # the alt-text a prompt may use

    def __init__(
        self,
        backend: CaptionBackend,
        prompt: Prompt,
        cache_dir: Path | None = None,
        max_cost: float | None = None,
        hints: tuple[str, ...] = (),
        redo: str | None = None,
    ) -> None:
        self.backend = backend
        self.prompt = prompt
        # What the rows and the manifest record: the prompt the backend was sent, or none (describe).
        self.prompt_sent = prompt if backend.sends_prompt else None
        self.hints = hints
        if "ocr" in hints and not ocr_available():
            raise MissingDependency(f"--hints ocr needs the ocr extra: {install_hint('ocr')}")
        self._identity = self.answer_identity()  # fixed once built; part of every sample's cache key
        self.redo = redo
        if redo is not None and not redo.strip():
            raise UsageError("--redo is empty; give an SQL expression over the input's columns, or leave it out")
        self._redo_condition = f"coalesce(({user_expression(redo, '--redo')}), false)" if redo is not None else None
        self._sql_limits = SqlLimits.from_env()  # read here, in the main process: the workers get the same
        # Set by begin(): what caption_run says for the rows this run asks, and for carried rows that have none.
        self._run_location: str | None = None
        self._carried_from: str | None = None
        self.cache_dir = cache_dir
        self.max_cost = max_cost
        self.budget: Budget | None = None
        self._cache: ResponseCache | None = None
        # Ask again the samples whose caption_status is error in the output's complete shards, and no other.
        self.retry_errors = False

    def parameters(self) -> dict[str, Any]:
        parameters = {
            **self.backend.parameters(),
            "prompt": self.prompt_sent.id if self.prompt_sent else None,
            "prompt_sha": self.prompt_sent.sha if self.prompt_sent else None,
            "hints": list(self.hints),
            "cache": self.cache_dir is not None,
            "max_cost": self.max_cost,
        }
        return parameters | {"redo": self.redo} if self.redo is not None else parameters

    def identity(self) -> dict[str, Any]:
        # Only a redo has the key, so outputs claimed before --redo existed still resume.
        identity = self.answer_identity()
        return identity | {"redo": self.redo} if self.redo is not None else identity

    def answer_identity(self) -> dict[str, Any]:
        """What decides one sample's answer (part of its cache key); which samples a run asks does not."""
        # The prompt's hash even where the backend reads no prompt: outputs claimed and answers cached
        # before that was recorded still resume, and are found.
        identity = {**self.backend.identity(), "prompt_sha": self.prompt.sha}
        return identity | {"hints": list(self.hints)} if self.hints else identity

    @staticmethod
    def _alt_text(sample: Sample) -> str | None:
        # The web's alt-text, also when the input was captioned before and kept it aside.
        return sample.row.get("alt_text") or sample.caption

    def cache_key(self, sample: Sample) -> str:
        assert sample.image is not None
        alt = self._alt_text(sample) if self.prompt.uses_alt_text else None
        return cache_key(hashlib.sha256(sample.image).hexdigest(), self._identity, alt)

    def request_for(self, sample: Sample) -> CaptionRequest:
        """The request for one sample: the prompt with its alt-text and, with --hints ocr, the text
        OCR reads in the image (an unreadable image gets no hint; the backend reports it)."""
        assert sample.image is not None
        instruction = self.prompt.render(self._alt_text(sample))
        read = None
        if "ocr" in self.hints:
            try:
                text = read_text_from_bytes(sample.image)
                read = " / ".join(text)  # as the ocr annotator writes its ocr_text
            except UnreadableImage:
                text = []
            instruction += ocr_hint(text)
        return CaptionRequest(sample.key, sample.image, self.prompt.system, instruction, self.prompt.id, read)

    def answer_entry(self, result: CaptionResult, ocr_text: str | None) -> dict[str, Any]:
        """What the journal and the cache keep of an answer: with --hints ocr, also the text the hint
        gave, so the output can say what OCR read (``caption_ocr_text``, for ``lenscap audit``)."""
        entry = result.to_dict()
        return entry | {"ocr_text": ocr_text} if "ocr" in self.hints else entry

    def columns(self, input_schema: pa.Schema) -> list[pa.Field]:
        kept = "previous_caption" if "alt_text" in input_schema.names else "alt_text"
        extra = [*([OCR_TEXT] if "ocr" in self.hints else []), *([CAPTION_RUN] if self.redo is not None else [])]
        return [pa.field(kept, pa.string()), *PROVENANCE_FIELDS, *extra]

    # -- run lifecycle --------------------------------------------------------------------------

    def check_redo(self, src: Dataset) -> None:
        """--redo: the input must be captioned, and the expression must run on no rows of its first
        shard, before the output is touched or anything is asked."""
        assert self.redo is not None
        shards = src.completed_ids()
        if not shards:
            return
        schema = src.read_schema(shards[0])
        if "caption_status" not in schema.names:
            raise UsageError(
                f"--redo recaptions some samples of a captioned dataset, and {src.location} has no "
                "caption_status column: caption it without --redo"
            )
        check_condition(self.redo, "--redo", schema, src.location, self._sql_limits)

    def check(self) -> None:
        self.backend.check()

    def begin(self, src: Dataset, dst: Dataset) -> None:
        # Here, once: every shard this run writes says the same locations.
        self._run_location, self._carried_from = dst.location, src.location
        journals = self._journal_dir(dst)
        if self.retry_errors:
            self._reopen_errors(dst)
        spent, answered = 0.0, False
        for shard_id in dst.completed_ids():
            stats = dst.read_stats(shard_id)
            spent += float(stats.get("caption_spent_usd", 0.0))
            answered = answered or any(stats.get("stage_status", {}).get("caption_status", {}).get(s) for s in _CACHEABLE)
            (journals / f"{shard_name(shard_id)}.jsonl").unlink(missing_ok=True)  # committed, then killed
        if journals.is_dir():
            for path in journals.glob("*.jsonl"):
                entries = Journal(path).load().values()
                spent += sum(e.get("cost_usd") or 0.0 for e in entries if not e.get("cached"))
                answered = answered or any(e.get("status") in _CACHEABLE and not e.get("cached") for e in entries)
        if answered:
            self.backend.answered_before()
        self.budget = Budget(self.max_cost, spent)

    def use_executor(self, executor: Executor) -> None:
        self.backend.share_limits(executor)
        if executor.distributed and self.budget is not None:
            self.budget = self.budget.on_cluster()  # workers on other machines share no memory

    def setup(self) -> None:
        self.backend.setup()
        if self.cache_dir is not None:
            self._cache = ResponseCache(self.cache_dir)

    @staticmethod
    def _journal_dir(dst: Dataset) -> Path:
        return dst.work_dir / "caption"

    def _reopen_errors(self, dst: Dataset) -> None:
        """--retry-errors: each complete shard with errors gets back a journal of its other answers (so
        none is asked or paid for again) and is made incomplete, so this run asks only its errors."""
        journals = self._journal_dir(dst)
        for shard_id in dst.completed_ids():
            if not dst.read_stats(shard_id).get("stage_status", {}).get("caption_status", {}).get(ERROR):
                continue
            columns = [
                "key",
                "caption",
                "caption_status",
                "caption_error",
                "caption_cached",
                "caption_input_tokens",
                "caption_output_tokens",
                "caption_cost_usd",
            ]
            if "ocr" in self.hints:
                columns.append(OCR_TEXT.name)
            table = dst.read_table(shard_id, columns=columns)
            journal = Journal(journals / f"{shard_name(shard_id)}.jsonl")
            journal.remove()
            for row in table.to_pylist():
                if row["caption_status"] in _CACHEABLE:
                    journal.append(
                        {
                            "key": row["key"],
                            "status": row["caption_status"],
                            "caption": row["caption"] if row["caption_status"] == OK else None,
                            "error": row["caption_error"],
                            "input_tokens": row["caption_input_tokens"],
                            "output_tokens": row["caption_output_tokens"],
                            "cost_usd": row["caption_cost_usd"],
                            "cached": bool(row["caption_cached"]),
                        }
                        | ({"ocr_text": row[OCR_TEXT.name]} if "ocr" in self.hints else {})
                    )
            journal.close()
            dst.discard(shard_id)

    # -- one shard ------------------------------------------------------------------------------

    def run_shard(self, src: Dataset, dst: Dataset, shard_id: int) -> dict[str, Any]:
        budget = self.budget or Budget(self.max_cost)
        journal = Journal(self._journal_dir(dst) / f"{shard_name(shard_id)}.jsonl")
        done = journal.load()
        pending: dict[str, tuple[float, str, str | None]] = {}  # key -> (reserved USD, cache key, OCR hint text)
        out_of_budget = 0.0  # the worst case of the request that did not fit under --max-cost
        no_space: DiskFull | None = None  # set: no new request; the ones in flight finish and are kept
        selected = self._redo_selection(src, shard_id) if self._redo_condition is not None else None

        def requests():  # noqa: ANN202 - a generator the backend pulls lazily
            nonlocal out_of_budget, no_space
            for sample in src.iter_samples(shard_id):
                if sample.key in done or not sample.ok or (selected is not None and sample.key not in selected):
                    continue
                key = self.cache_key(sample)
                # A redone sample's cached answer is the very one being redone: ask the backend (and cache the new one).
                hit = self._cache.get(key) if self._cache is not None and selected is None else None
                try:
                    if hit is not None:
                        self._record(journal, done, {**hit, "key": sample.key, "cached": True})
                        continue
                    journal.reserve()  # room for the answer, before it is paid for
                except DiskFull as e:
                    no_space = e
                    return
                request = self.request_for(sample)
                try:
                    width, height = image_size(sample.image)
                except UnreadableImage:
                    width = height = 1  # preparation reports it; costs nothing
                reserve = self.backend.estimate_cost(width, height, request)
                if not budget.reserve(reserve):
                    journal.release()
                    out_of_budget = reserve or 1e-12
                    return
                pending[sample.key] = (reserve, key, request.ocr_text)
                yield request

        def on_result(result: CaptionResult) -> None:
            nonlocal no_space
            reserved, key, ocr_text = pending.pop(result.key, (0.0, None, None))
            answer = self.answer_entry(result, ocr_text)
            entry = {**answer, "cached": False}
            try:
                self._record(journal, done, entry)
            except DiskFull as e:  # the reserved room was not enough: stop asking, keep going with what is in flight
                no_space = no_space or e
            budget.settle(reserved, result.cost_usd or 0.0)
            self.tick(0, result.cost_usd or 0.0)
            if self._cache is not None and key is not None and result.status in _CACHEABLE:
                self._cache_put(key, answer)

        try:
            self.backend.caption_all(requests(), on_result)
        finally:
            journal.close()
        if no_space is not None:
            raise no_space
        if out_of_budget:
            # Spending stays under the cap: a request is sent only when its worst case fits, so the cap
            # is "reached" when the next one's would not, with what was spent short of it.
            raise BudgetReached(
                f"--max-cost ${budget.max_usd:g} reached: ${budget.spent:.4f} spent by this output directory, and the next "
                f"request (worst case ${out_of_budget:.4f}) would not fit under it; finished shards are kept: rerun with a "
                "higher --max-cost to go on"
            )
        stats = self._write_shard(src, dst, shard_id, done, selected)
        journal.remove()
        return stats

    def _redo_selection(self, src: Dataset, shard_id: int) -> set[str]:
        """The keys of the shard's rows that --redo selects."""
        import duckdb  # DuckDB takes a quarter second to import: only where a query runs

        assert self._redo_condition is not None
        try:
            what = f"--redo on shard {shard_name(shard_id)} of {src.location}"
            rows = rows_where(src.read_table(shard_id), self._redo_condition, what, limits=self._sql_limits)
        except duckdb.Error as e:  # a value the expression cannot take (a failed cast): about the job, not this shard
            raise UsageError(
                f"--redo cannot run on shard {shard_name(shard_id)} of {src.location}: {str(e).splitlines()[0]}"
            ) from None
        return {str(key) for (key,) in rows}

    def _record(self, journal: Journal, done: dict[str, dict[str, Any]], entry: dict[str, Any]) -> None:
        done[str(entry["key"])] = entry
        self.tick(1)
        journal.append(entry)

    def _cache_put(self, key: str, value: dict[str, Any]) -> None:
        """The cache is a saving, not a record: a cache that cannot be written (a full disk, a locked
        file) is turned off for this process, said once, and the run goes on (the journal keeps the answer)."""
        assert self._cache is not None
        try:
            self._cache.put(key, value)
        except Exception as e:  # noqa: BLE001 - sqlite3.Error, OSError: any failure to save is the same
            print(f"lenscap: note: the response cache cannot be written ({e}); going on without it", file=sys.stderr)
            self._cache = None

    def _write_shard(
        self, src: Dataset, dst: Dataset, shard_id: int, done: dict[str, dict[str, Any]], selected: set[str] | None = None
    ) -> dict[str, Any]:
        """``selected``: with --redo, the keys this run captions; every other row is carried over as it is."""
        kept = "previous_caption" if "alt_text" in src.read_schema(shard_id).names else "alt_text"
        writer = self.writer(src, dst, shard_id)
        outcomes: Counter[str] = Counter()
        spent = 0.0
        try:
            for sample in src.iter_samples(shard_id):
                entry = done.get(sample.key)
                if selected is None or sample.key in selected:
                    self._apply(sample, entry, kept)
                    if selected is not None:
                        sample.row[CAPTION_RUN.name] = self._run_location or dst.location
                else:
                    sample.row[CAPTION_RUN.name] = sample.row.get(CAPTION_RUN.name) or self._carried_from or src.location
                outcomes[sample.row["caption_status"]] += 1
                if entry is not None and not entry.get("cached"):
                    spent += entry.get("cost_usd") or 0.0
                if entry is None:
                    self.tick(1)
                writer.write(sample)
        except BaseException:
            writer.abort()
            raise
        return writer.commit({"stage": self.name, "caption_spent_usd": round(spent, 8)})

    def _apply(self, sample: Sample, entry: dict[str, Any] | None, kept: str) -> None:
        row = sample.row
        row[kept] = row.get("caption")
        if entry is None:  # no image: nothing was asked
            row["caption_status"] = SKIPPED
            if row.get("filter_status") in ("dropped", "error"):
                row["caption_error"] = f"no image (filter: {row.get('filter_reason') or row.get('filter_error')})"
            elif row.get("dedup_status") == "duplicate":
                row["caption_error"] = f"no image (dedup: duplicate of {row.get('dup_of')})"
            else:
                row["caption_error"] = f"no image (download status: {sample.status})"
            for f in PROVENANCE_FIELDS:
                row[f.name] = None
            if "ocr" in self.hints:
                row[OCR_TEXT.name] = None
            return
        if "ocr" in self.hints:
            row[OCR_TEXT.name] = entry.get("ocr_text")
        row["caption_status"] = entry["status"]
        row["caption_error"] = entry.get("error")
        if entry["status"] == OK:
            row["caption"] = entry["caption"]
        row["caption_backend"] = self.backend.name
        row["caption_model"] = self.backend.model
        row["caption_prompt"] = self.prompt_sent.id if self.prompt_sent else None
        row["caption_prompt_sha"] = self.prompt_sent.sha if self.prompt_sent else None
        row["caption_input_tokens"] = entry.get("input_tokens")
        row["caption_output_tokens"] = entry.get("output_tokens")
        row["caption_cost_usd"] = entry.get("cost_usd")
        row["caption_cached"] = bool(entry.get("cached"))
