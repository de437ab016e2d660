"""Batch backends: the same requests as ``--backend openai``, written to files instead of sent one by one.

``openai-batch`` uploads the files to OpenAI's Batch API (half price, results within 24 hours);
``batch-files`` leaves them in a directory for ``vllm run-batch`` or any runner of the OpenAI batch
format, and collects the output files that appear next to them. Both are driven by
``lenscap.caption.batch``; these classes only know how to move one file.
"""

from __future__ import annotations

import os
import shutil
from abc import abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from lenscap.caption.backends.api_guards import OffHostRedirect, bounded_call, check_redirect_sync, redirect_message
from lenscap.caption.backends.base import API_PANEL, BATCH_PANEL, CaptionRequest, CaptionResult, Option
from lenscap.caption.backends.openai_chat import COMMON_OPTIONS, OpenAIChatBackend
from lenscap.core.errors import BackendError, UsageError

__all__ = [
    "BatchBackend",
    "BATCH_OPTIONS",
    "OpenAIBatchBackend",
    "BatchFilesBackend",
    "BatchOptions",
    "ApiTransport",
    "FilesTransport",
    "TERMINAL",
]

TERMINAL = ("completed", "failed", "expired", "cancelled")
_SDK_RETRIES = 5
T = TypeVar("T")

BATCH_OPTIONS = (
    Option(
        "wait",
        bool,
        False,
        "Poll until every batch is done (by default: submit, collect what is ready, exit).",
        panel=BATCH_PANEL,
    ),
    Option("poll_interval", float, 60.0, "Seconds between polls with --wait.", panel=BATCH_PANEL),
    Option("max_requests_per_file", int, 50_000, "Requests per batch file (the API allows 50,000).", panel=BATCH_PANEL),
    Option(
        "max_file_mib",
        float,
        200.0,
        "MiB (1,048,576 bytes) per batch file (the API allows 200).",
        deprecated_names=("max_file_mb",),
        panel=BATCH_PANEL,
    ),
    Option(
        "max_enqueued_tokens",
        int,
        None,
        "The account's batch queue limit, in input tokens of the batches in flight; files are submitted as the queue has room.",
        panel=BATCH_PANEL,
        default_text="learned from the API's token_limit_exceeded",
    ),
    Option(
        "max_retries",
        int,
        3,
        "Rounds of new batches for requests that got no answer (expired, 5xx, ...).",
        panel=API_PANEL,
    ),
    Option(
        "keep_outputs",
        bool,
        False,
        "Keep each merged batch's output and error files, gzip-compressed, under "
        ".lenscap/batch/outputs/ (default: deleted once their answers are in the journals).",
    ),
)


@dataclass
class BatchOptions:
    max_requests_per_file: int = 50_000
    max_file_bytes: int = 200 * 1024 * 1024
    max_enqueued_tokens: int | None = None
    max_rounds: int = 3
    wait: bool = False
    poll_interval_s: float = 60.0
    keep_outputs: bool = False

    def validate(self, most_requests: int = 50_000, most_mib: int = 200) -> None:
        """Within the provider's batch limits (OpenAI's: 50,000 requests and 200 MiB a file)."""
        if not 1 <= self.max_requests_per_file <= most_requests:
            raise UsageError(f"--max-requests-per-file must be between 1 and {most_requests}, not {self.max_requests_per_file}")
        if not 1 <= self.max_file_bytes <= most_mib * 1024 * 1024:
            raise UsageError(f"--max-file-mib must be more than 0 and at most {most_mib}")
        if self.max_enqueued_tokens is not None and self.max_enqueued_tokens < 1:
            raise UsageError("--max-enqueued-tokens must be positive")
        if self.max_rounds < 0:
            raise UsageError("--max-retries must be at least 0")
        if self.poll_interval_s <= 0:
            raise UsageError("--poll-interval must be positive")


class BatchBackend:
    """What makes an API backend a batch one (a mixin before it: ``class X(BatchBackend, ItsOnlineBackend)``):
    its batch options, read into ``batch``, and a ``transport`` that moves one batch file. A provider's
    results that are not OpenAI's batch output lines come back from its transport as
    ``{"custom_id", "result"}`` lines, which its backend reads with ``batch_result(key, result)``."""

    runs_as_batch = True
    batch: BatchOptions
    # The provider's limits on one batch: requests, and MiB of its file.
    most_requests: ClassVar[int] = 50_000
    most_mib: ClassVar[int] = 200

    @classmethod
    def from_options(cls, values: dict[str, Any]) -> Any:
        v = cls.parse_options(values)  # type: ignore[attr-defined]
        batch_names = {name for o in BATCH_OPTIONS for name in (o.name, *o.deprecated_names)}
        online = {k: v[k] for k in values if k not in batch_names}
        backend = super().from_options(online)  # type: ignore[misc]
        backend.batch = BatchOptions(
            max_requests_per_file=v["max_requests_per_file"],
            max_file_bytes=int(v["max_file_mib"] * 1024 * 1024),
            max_enqueued_tokens=v.get("max_enqueued_tokens"),
            max_rounds=v["max_retries"],
            wait=v["wait"],
            poll_interval_s=v["poll_interval"],
            keep_outputs=v["keep_outputs"],
        )
        backend.batch.validate(cls.most_requests, cls.most_mib)
        return backend

    def caption_all(self, requests: Iterable[CaptionRequest], on_result: Callable[[CaptionResult], None]) -> None:
        raise UsageError(f"the {self.name} backend runs as a batch job, not request by request")

    @staticmethod
    def batch_line(custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """One request as a line of this API's batch input file (another provider's backend has its own)."""
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}

    # A provider whose batch output lines are not OpenAI's reads them itself: (custom id, journal entry or
    # None, message or None) from a parsed line, None for a line that names no request (merge.read_answers).
    read_batch_line: Callable[[dict[str, Any]], tuple[str, dict[str, Any] | None, str | None] | None] | None = None

    @abstractmethod
    def transport(self, work_dir: Path) -> Any:
        """How this backend moves one batch file (upload, create, poll, fetch, cancel)."""


class _BatchBackend(BatchBackend, OpenAIChatBackend):
    options = COMMON_OPTIONS + BATCH_OPTIONS


class OpenAIBatchBackend(_BatchBackend):
    """OpenAI's Batch API: half price, results within 24 hours; rerun (or --wait) to collect."""

    name = "openai-batch"
    batch_priced = True

    def transport(self, work_dir: Path) -> ApiTransport:
        return ApiTransport(self)


class BatchFilesBackend(_BatchBackend):
    """Batch files for vllm run-batch (or any OpenAI-batch-format runner): no server, no key, no cost."""

    name = "batch-files"
    needs_key = False
    priced = False
    options = tuple(o for o in COMMON_OPTIONS if o.name not in ("base_url", "api_key_env", "timeout", "prices")) + BATCH_OPTIONS

    def price(self, input_tokens: int, output_tokens: int) -> float | None:
        return None  # a local model costs nothing anyone can price

    def check(self) -> None:
        pass

    def transport(self, work_dir: Path) -> FilesTransport:
        return FilesTransport(work_dir / "files")


class ApiTransport:
    """One file's trip through OpenAI's Files and Batches endpoints (synchronous client: a few calls
    per 50,000 requests)."""

    def __init__(self, backend: OpenAIChatBackend) -> None:
        import openai  # the SDK takes about a second to import: only where a request is made

        self.backend = backend
        self._openai = openai
        timeout = max(backend.options.timeout, 600.0)  # a file of 200 MiB takes minutes
        # The SDK retries these rare calls itself (connection errors, 429, 5xx), with backoff; each call
        # is bounded in all by its attempts' time, however slowly a server sends.
        self.deadline_s = timeout * (_SDK_RETRIES + 1) + 120.0
        self.client = openai.OpenAI(
            base_url=backend.base_urls[0],
            api_key=backend._api_key,
            max_retries=_SDK_RETRIES,
            timeout=timeout,
            http_client=openai.DefaultHttpxClient(event_hooks={"response": [check_redirect_sync]}),
        )

    def _fail(self, what: str, e: Exception) -> BackendError:
        return BackendError(f"{what}: {self.backend.scrub(str(e))}")

    def _ask(self, what: str, call: Callable[[], T]) -> T:
        """One exchange with the Files or Batches endpoints, its answer read inside: bounded in all by
        ``deadline_s`` (``bounded_call``), a redirect to another host refused, and an answer that is not
        the API's (a proxy's HTML page: the SDK then fails on its attributes) one line."""
        try:
            return bounded_call(call, self.deadline_s, f"{what}: no answer within {self.deadline_s:g}s")
        except OffHostRedirect as e:
            raise BackendError(redirect_message(self.backend.base_urls[0], e)) from None
        except self._openai.APIConnectionError as e:
            if isinstance(e.__cause__, OffHostRedirect):
                raise BackendError(redirect_message(self.backend.base_urls[0], e.__cause__)) from None
            raise
        except (AttributeError, TypeError, ValueError) as e:
            raise BackendError(
                f"{what}: the server's answer is not the API's ({type(e).__name__}); is --base-url right?"
            ) from None

    @staticmethod
    def remote_name(job_id: str, name: str) -> str:
        """Uploads carry the job id, so a crashed run can tell its own file among the account's."""
        return f"lenscap-{job_id[:12]}-{name}.jsonl"

    # How far back, before the step began, a search looks: clocks differ, and an upload takes minutes.
    SEARCH_MARGIN_S = 3600

    def find_upload(self, filename: str, since: float = 0.0) -> str | None:
        """A file uploaded by an earlier run that died before recording it. The list is newest first, so the
        search stops at files made well before the upload began (``since``), not at the account's oldest."""

        def search() -> str | None:
            for f in self.client.files.list(purpose="batch"):
                if f.filename == filename:
                    return f.id
                if f.created_at < since - self.SEARCH_MARGIN_S:
                    return None
            return None

        return self._ask("listing the account's batch files", search)

    def upload(self, path: Path, filename: str) -> str:
        def send() -> str:
            with open(path, "rb") as fh:
                return self.client.files.create(file=(filename, fh), purpose="batch").id

        try:
            return self._ask(f"uploading {filename}", send)
        except self._openai.APIError as e:
            raise self._fail(f"uploading {filename} failed", e) from None

    def find_batch(self, metadata: dict[str, str], since: float = 0.0, taken: set[str] | None = None) -> str | None:
        """A batch created by an earlier run that died before recording it, found by its metadata (newest
        first, down to batches made well before the create began). ``taken``: the job's batches recorded
        for other files (the metadata tells them apart here)."""

        def search() -> str | None:
            for b in self.client.batches.list(limit=100):
                if b.metadata and all(b.metadata.get(k) == v for k, v in metadata.items()):
                    return b.id
                if b.created_at < since - self.SEARCH_MARGIN_S:
                    return None
            return None

        return self._ask("listing the account's batches", search)

    def create(self, file_id: str, metadata: dict[str, str]) -> str:
        def send() -> str:
            return self.client.batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", metadata=metadata
            ).id

        try:
            return self._ask("creating a batch", send)
        except self._openai.APIError as e:
            raise self._fail("creating a batch failed", e) from None

    def poll(self, batch_id: str, expected: int | None = None) -> dict[str, Any]:
        def ask() -> dict[str, Any]:
            b = self.client.batches.retrieve(batch_id)
            data = b.errors.data if b.errors and b.errors.data else []
            return {
                "status": b.status,
                "output_file_id": b.output_file_id,
                "error_file_id": b.error_file_id,
                "counts": b.request_counts.model_dump() if b.request_counts else None,
                "errors": [e.message or "" for e in data],
                "codes": [e.code or "" for e in data],
            }

        return self._ask(f"polling batch {batch_id}", ask)

    def fetch(self, file_id: str | None) -> bytes:
        if not file_id:
            return b""
        return self._ask(f"downloading file {file_id}", lambda: self.client.files.content(file_id).content)

    def cancel(self, batch_id: str) -> None:
        self._ask(f"cancelling batch {batch_id}", lambda: self.client.batches.cancel(batch_id))

    def forget(self, file_ids: list[str | None]) -> None:
        """A merged batch's input, output and error files leave the account's file storage (which is
        capped), best effort: a file left behind costs storage, never an answer."""
        for file_id in file_ids:
            if file_id:
                try:
                    self.client.files.delete(file_id)
                except self._openai.APIError:
                    pass


class FilesTransport:
    """Batch files in a directory: ``input/NAME.jsonl`` written by lenscap, ``output/NAME.jsonl``
    written by the runner (``vllm run-batch -i ... -o ...``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "input").mkdir(parents=True, exist_ok=True)
        (root / "output").mkdir(parents=True, exist_ok=True)

    @staticmethod
    def remote_name(job_id: str, name: str) -> str:
        return f"{name}.jsonl"

    def find_upload(self, filename: str, since: float = 0.0) -> str | None:
        return filename if (self.root / "input" / filename).exists() else None

    def upload(self, path: Path, filename: str) -> str:
        tmp = self.root / "input" / f".{filename}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)  # the same bytes, not a second copy on disk
        except OSError:
            shutil.copyfile(path, tmp)
        tmp.replace(self.root / "input" / filename)
        return filename

    def find_batch(self, metadata: dict[str, str], since: float = 0.0, taken: set[str] | None = None) -> str | None:
        return None

    def create(self, file_id: str, metadata: dict[str, str]) -> str:
        return file_id

    def poll(self, batch_id: str, expected: int | None = None) -> dict[str, Any]:
        out = self.root / "output" / batch_id
        if not out.exists():
            return {"status": "in_progress", "output_file_id": None, "error_file_id": None, "counts": None, "errors": []}
        with open(out, "rb") as f:
            lines = sum(1 for line in f if line.strip())
        # A runner writing the file is not done until every request has its line.
        done = expected is None or lines >= expected
        return {
            "status": "completed" if done else "in_progress",
            "output_file_id": batch_id if done else None,
            "error_file_id": None,
            "counts": {"completed": lines},
            "errors": [],
        }

    def fetch(self, file_id: str | None) -> bytes:
        return (self.root / "output" / file_id).read_bytes() if file_id else b""

    def cancel(self, batch_id: str) -> None:
        pass

    def forget(self, file_ids: list[str | None]) -> None:
        """A merged batch's input and the runner's output leave the directory."""
        for file_id in file_ids:
            if file_id:
                (self.root / "input" / file_id).unlink(missing_ok=True)
                (self.root / "output" / file_id).unlink(missing_ok=True)

    def commands(self, model: str) -> list[str]:
        return [
            f"vllm run-batch -i {p} -o {self.root / 'output' / p.name} --model {model}"
            for p in sorted((self.root / "input").glob("*.jsonl"))
            if not (self.root / "output" / p.name).exists()
        ]
