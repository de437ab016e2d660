"""``--backend gemini-batch``: Gemini's batch mode (half price, results within 24 hours) on the batch job
machinery of ``openai-batch`` (``lenscap.caption.batch``: the state file, the rolling queue, ``lenscap
batch status``, nothing paid twice whatever is killed when). Only the file's trip differs, here:

- each request line is ``{"key": CUSTOM_ID, "request": GenerateContentRequest}`` and each results line
  ``{"key", "response"}`` or ``{"key", "error"}`` (``batch_line``, ``read_batch_line``);
- a file goes up through the Files API's resumable upload with the display name
  ``lenscap-JOB-NAME.jsonl``; the batch is ``models/MODEL:batchGenerateContent`` over that file, with the
  display name ``lenscap-JOB-NAME-tTRY`` (Gemini batches have no metadata: the display name carries what
  the OpenAI path keeps in metadata);
- states ``BATCH_STATE_*`` (the SDK's ``JOB_STATE_*``) map onto the job's ``completed``, ``failed``,
  ``expired``, ``cancelled``; one results file holds answers and per-request errors alike.

A run killed after the server made the upload or the batch, before the state file recorded it, finds it
again on the rerun: the state file says "uploading" (or "creating") and when that step began, so the
rerun lists the account's files (or batches), newest first, for that display name before sending it
again (``find_upload``, ``find_batch``).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from lenscap.caption.backends.api_guards import OffHostRedirect, bounded_call, redirect_message
from lenscap.caption.backends.base import ERROR, CaptionResult
from lenscap.caption.backends.gemini import GEMINI_COMMON_OPTIONS, GeminiBackend, api_name, error_message, gemini_sdk
from lenscap.caption.backends.openai_batch import BATCH_OPTIONS, BatchBackend
from lenscap.caption.batch.ids import parse_custom_id
from lenscap.caption.batch.merge import FINAL_HTTP
from lenscap.core.errors import BackendError

__all__ = ["GeminiBatchBackend", "GeminiTransport", "STATES"]

T = TypeVar("T")
# The API's batch states (and the SDK's names for them) as the batch job's statuses.
STATES = {
    "SUCCEEDED": "completed",
    "FAILED": "failed",
    "EXPIRED": "expired",
    "CANCELLED": "cancelled",
    "PENDING": "validating",
    "RUNNING": "in_progress",
    "UNSPECIFIED": "validating",
}


class GeminiBatchBackend(BatchBackend, GeminiBackend):
    """Gemini's batch mode (a JSONL file per batch): half price, results within 24 hours; rerun (or --wait) to collect."""

    name = "gemini-batch"
    batch_priced = True
    options = GEMINI_COMMON_OPTIONS + BATCH_OPTIONS

    def transport(self, work_dir: Path) -> GeminiTransport:
        return GeminiTransport(self)

    @staticmethod
    def batch_line(custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"key": custom_id, "request": body}

    def read_batch_line(self, line: dict[str, Any]) -> tuple[str, dict[str, Any] | None, str | None] | None:
        """(custom id, journal entry, None) for an answer; (custom id, None, message) to ask again; None for a
        line that names no request (its request counts as missing)."""
        _, types, _ = gemini_sdk()
        custom_id = line.get("key") if isinstance(line, dict) else None
        try:
            _, key = parse_custom_id(str(custom_id))
        except ValueError:
            return None
        error = line.get("error") or line.get("status")
        if isinstance(error, dict) and error.get("code"):
            code = int(error.get("code") or 0)
            message = str(error.get("message") or error.get("status") or f"HTTP {code}")
            if code in FINAL_HTTP:
                return custom_id, {**CaptionResult(key, ERROR, error=f"HTTP {code}: {message}").to_dict(), "cached": False}, None
            return custom_id, None, message
        try:
            reply = types.GenerateContentResponse.model_validate(line["response"])
            if not reply.candidates and not (reply.prompt_feedback and reply.prompt_feedback.block_reason):
                raise ValueError("no candidates")
        except (KeyError, TypeError, ValueError) as e:
            return custom_id, None, f"malformed reply in the batch output: {type(e).__name__}"
        return custom_id, {**self.interpret(key, reply, 0).to_dict(), "cached": False}, None


class GeminiTransport:
    """One file's trip through the Files API and batch mode (synchronous SDK client: a few calls per file)."""

    SEARCH_MARGIN_S = 3600  # how far before a step began its search looks: clocks differ, uploads take minutes

    def __init__(self, backend: GeminiBackend) -> None:
        self.backend = backend
        timeout = max(backend.options.timeout, 600.0)  # a file of 200 MiB takes minutes
        self.deadline_s = timeout + 120.0
        self.client = backend.sync_client(backend.base_urls[0], timeout)
        _, self.types, self.errors = gemini_sdk()

    def _ask(self, what: str, call: Callable[[], T]) -> T:
        """One exchange, bounded in all, a redirect to another host refused, Google's error as one line."""
        try:
            return bounded_call(call, self.deadline_s, f"{what}: no answer within {self.deadline_s:g}s")
        except OffHostRedirect as e:
            raise BackendError(redirect_message(self.backend.base_urls[0], e)) from None
        except self.errors.APIError as e:
            raise BackendError(f"{what} failed: HTTP {e.code} {e.status}: {self.backend.scrub(error_message(e))}") from None
        except (AttributeError, TypeError, ValueError, KeyError) as e:
            raise BackendError(
                f"{what}: the server's answer is not the API's ({type(e).__name__}); is --base-url right?"
            ) from None

    @staticmethod
    def remote_name(job_id: str, name: str) -> str:
        """Uploads carry the job id, so a crashed run can tell its own file among the account's."""
        return f"lenscap-{job_id[:12]}-{name}.jsonl"

    @staticmethod
    def batch_name(metadata: dict[str, str]) -> str:
        """The batch's display name: what the OpenAI path keeps in metadata (job, file, try)."""
        return f"lenscap-{metadata['lenscap_job'][:12]}-{metadata['lenscap_file']}-t{metadata['lenscap_try']}"

    def _older(self, created: datetime.datetime | None, since: float) -> bool:
        return created is not None and created.timestamp() < since - self.SEARCH_MARGIN_S

    def find_upload(self, filename: str, since: float = 0.0) -> str | None:
        """A file uploaded by an earlier run that died before recording it (newest first, down to files
        made well before the upload began)."""

        def search() -> str | None:
            for f in self.client.files.list():
                if f.display_name == filename and api_name(f.state) in ("ACTIVE", "None"):
                    return str(f.name)
                if self._older(f.create_time, since):
                    return None
            return None

        return self._ask("listing the account's files", search)

    def upload(self, path: Path, filename: str) -> str:
        config = {"display_name": filename, "mime_type": "application/jsonl"}
        return str(self._ask(f"uploading {filename}", lambda: self.client.files.upload(file=str(path), config=config).name))

    def find_batch(self, metadata: dict[str, str], since: float = 0.0, taken: set[str] | None = None) -> str | None:
        """A batch created by an earlier run that died before recording it, found by its display name (which
        holds the try: ``taken``, the batches the job recorded, need not be looked at)."""
        wanted = self.batch_name(metadata)

        def search() -> str | None:
            for b in self.client.batches.list():
                if b.display_name == wanted:
                    return str(b.name)
                if self._older(b.create_time, since):
                    return None
            return None

        return self._ask("listing the account's batches", search)

    def create(self, file_id: str, metadata: dict[str, str]) -> str:
        config = {"display_name": self.batch_name(metadata)}
        model = self.backend.model
        return str(
            self._ask("creating a batch", lambda: self.client.batches.create(model=model, src=file_id, config=config).name)
        )

    def poll(self, batch_id: str, expected: int | None = None) -> dict[str, Any]:
        def ask() -> dict[str, Any]:
            b = self.client.batches.get(name=batch_id)
            state = api_name(b.state).removeprefix("JOB_STATE_").removeprefix("BATCH_STATE_")
            message = b.error.message if getattr(b, "error", None) and b.error.message else None
            return {
                "status": STATES.get(state, state.lower()),
                "output_file_id": b.dest.file_name if b.dest and b.dest.file_name else None,
                "error_file_id": None,  # one results file holds the errors too
                "counts": None,
                "errors": [message] if message else [],
                "codes": [],
            }

        return self._ask(f"polling batch {batch_id}", ask)

    def fetch(self, file_id: str | None) -> bytes:
        if not file_id:
            return b""
        return bytes(self._ask(f"downloading file {file_id}", lambda: self.client.files.download(file=file_id)))

    def cancel(self, batch_id: str) -> None:
        self._ask(f"cancelling batch {batch_id}", lambda: self.client.batches.cancel(name=batch_id))

    def forget(self, file_ids: list[str | None]) -> None:
        """A merged batch's input and results files leave the account's storage, best effort."""
        for file_id in file_ids:
            if file_id:
                try:
                    self.client.files.delete(name=file_id)
                except (self.errors.APIError, ValueError):
                    pass
