"""``--backend anthropic-batch``: the same requests as ``--backend anthropic``, through Anthropic's Message
Batches API (half price, results within 24 hours), on the batch job every batch backend shares
(``lenscap.caption.batch``: the state file, the rolling queue, ``batch status``, rounds, SIGKILL anywhere).

Anthropic's batches differ from OpenAI's in three ways this transport absorbs:

- No file upload: a batch is created with its requests in the body (``{"requests": [{"custom_id",
  "params"}]}``, at most 100,000 requests or 256 MB). "Uploading" a file is a no-op; the create call
  reads the batch file the job cut.
- A custom id must match ``^[a-zA-Z0-9_-]{1,64}$``, and lenscap's ids (``SHARD/KEY``) do not: each
  request is sent as ``lc<job>-<file>-t<try>-<line>`` and its results are read back through the batch
  file's id lines.
- No metadata: a batch created just before a SIGKILL (made on the server, not yet recorded) cannot be
  found by a tag. The job records the intent and its time before the create call (``creating``); the
  rerun lists the account's batches created since (newest first, down to ``SEARCH_MARGIN_S`` before
  the intent, for clocks that differ) and takes one with the file's request count that the job has not
  recorded for another file. An ended one is taken only if its results' custom ids carry this file's
  prefix; one still in progress is taken on its count and time alone. The window left: another
  client of the same account creating, within that margin, an unended batch of exactly the same
  number of requests while this run was killed in its create call; the rerun would then adopt that
  batch, find none of its requests in the results, and ask them again in the next round (paying this
  file's requests twice, never losing or mixing an answer: a result counts only under this file's ids).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from lenscap.caption.backends.anthropic_messages import (
    ANTHROPIC_OPTIONS,
    AnthropicBackend,
    anthropic_sdk,
)
from lenscap.caption.backends.openai_batch import BATCH_OPTIONS, ApiTransport, BatchBackend

__all__ = ["AnthropicBatchBackend", "MessageBatchesTransport"]

_SDK_RETRIES = 5
# A custom id as sent: the job, the batch file, the try, the request's line in the file.
_SENT_ID_RE = re.compile(r"^lc[0-9a-f]{12}-(r\d+-\d+)-t\d+-(\d+)$")
_OWN_HELP = {
    "max_requests_per_file": "Requests per batch (Anthropic allows 100,000).",
    "max_file_mib": "MiB (1,048,576 bytes) of requests per batch (Anthropic allows 256 MB, 244 MiB).",
}
ANTHROPIC_BATCH_OPTIONS = tuple(
    replace(o, help=_OWN_HELP.get(o.name, o.help))
    for o in BATCH_OPTIONS
    if o.name != "max_enqueued_tokens"  # OpenAI's queue limit in tokens; Anthropic's counts requests
)


class AnthropicBatchBackend(BatchBackend, AnthropicBackend):
    """Anthropic's Message Batches API: half price, results within 24 hours; rerun (or --wait) to collect."""

    name = "anthropic-batch"
    batch_priced = True
    options = ANTHROPIC_OPTIONS + ANTHROPIC_BATCH_OPTIONS
    most_requests = 100_000
    most_mib = 244

    def transport(self, work_dir: Path) -> MessageBatchesTransport:
        return MessageBatchesTransport(self, work_dir)


class MessageBatchesTransport(ApiTransport):
    """One batch file's trip through the Message Batches endpoints (synchronous client: a few calls per
    batch). Shares ``ApiTransport``'s bounded calls and one-line failures; the SDKs' exceptions have the
    same names."""

    # How far back, before the create began, the search for a batch a killed run made looks.
    SEARCH_MARGIN_S = 600

    def __init__(self, backend: AnthropicBackend, root: Path) -> None:
        self.backend, self.root = backend, root
        self._openai = anthropic_sdk()  # ApiTransport's name for the SDK whose exceptions it catches
        timeout = max(backend.options.timeout, 600.0)  # 256 MB of requests takes minutes to send
        self.deadline_s = timeout * (_SDK_RETRIES + 1) + 120.0
        self.client = backend.sync_client(backend.base_urls[0], timeout, _SDK_RETRIES)

    @staticmethod
    def remote_name(job_id: str, name: str) -> str:
        return name

    def find_upload(self, filename: str, since: float = 0.0) -> str | None:
        return filename  # nothing is uploaded: the requests go with the create

    def upload(self, path: Path, filename: str) -> str:
        return filename

    @staticmethod
    def _prefix(metadata: dict[str, str]) -> str:
        return f"lc{metadata['lenscap_job'][:12]}-{metadata['lenscap_file']}-t{metadata['lenscap_try']}-"

    def _ids(self, name: str) -> list[str]:
        """The custom ids of batch file ``name``, in line order (its id lines' first column)."""
        with open(self.root / "inputs" / f"{name}.ids", "rb") as f:
            return [line.split(b"\t", 1)[0].decode() for line in f if line.strip()]

    def create(self, file_id: str, metadata: dict[str, str]) -> str:
        prefix = self._prefix(metadata)
        with open(self.root / "inputs" / f"{file_id}.jsonl", "rb") as f:
            lines = [json.loads(raw) for raw in f if raw.strip()]
        requests = [{"custom_id": f"{prefix}{i}", "params": line["body"]} for i, line in enumerate(lines)]
        try:
            return self._ask("creating a message batch", lambda: self.client.messages.batches.create(requests=requests).id)
        except self._openai.APIError as e:
            raise self._fail("creating a message batch failed", e) from None

    def find_batch(self, metadata: dict[str, str], since: float = 0.0, taken: set[str] | None = None) -> str | None:
        """The batch an earlier run created for this file and died before recording (see the module's docstring)."""
        prefix, expected, taken = self._prefix(metadata), len(self._ids(metadata["lenscap_file"])), taken or set()

        def search() -> str | None:
            for b in self.client.messages.batches.list(limit=100):
                if b.created_at.timestamp() < since - self.SEARCH_MARGIN_S:
                    return None
                if b.id in taken or sum(b.request_counts.model_dump().values()) != expected:
                    continue
                if b.processing_status != "ended" or self._first_id(b.id).startswith(prefix):
                    return str(b.id)
            return None

        return self._ask("listing the account's message batches", search)

    def _first_id(self, batch_id: str) -> str:
        for raw in self._results(batch_id).splitlines():
            try:
                return str(json.loads(raw)["custom_id"])
            except (ValueError, KeyError, TypeError):
                continue
        return ""

    def _results(self, batch_id: str) -> bytes:
        return bytes(self.client.messages.batches.with_raw_response.results(batch_id).http_response.read())

    def poll(self, batch_id: str, expected: int | None = None) -> dict[str, Any]:
        def ask() -> dict[str, Any]:
            b = self.client.messages.batches.retrieve(batch_id)
            counts = b.request_counts.model_dump()
            ended = b.processing_status == "ended"
            if ended:  # the job's words for how a batch ended
                status = "expired" if counts.get("expired") else "cancelled" if counts.get("canceled") else "completed"
            else:
                status = "cancelling" if b.processing_status == "canceling" else "in_progress"
            return {
                "status": status,
                "output_file_id": batch_id if ended else None,
                "error_file_id": None,
                "counts": counts,
                "errors": [],
                "codes": [],
            }

        return self._ask(f"polling message batch {batch_id}", ask)

    def fetch(self, file_id: str | None) -> bytes:
        """A batch's results as ``{"custom_id": lenscap's id, "result": ...}`` lines; a line that names no
        request of the job's (torn, or another's) is left out, and its request is asked again."""
        if not file_id:
            return b""
        raw = self._ask(f"downloading the results of message batch {file_id}", lambda: self._results(file_id))
        ids: dict[str, list[str]] = {}
        out = []
        for line in raw.splitlines():
            try:
                parsed = json.loads(line)
                name, index = _SENT_ID_RE.match(parsed["custom_id"]).groups()  # type: ignore[union-attr]
                ours = ids.setdefault(name, self._ids(name))[int(index)]
            except (ValueError, KeyError, TypeError, AttributeError, IndexError, OSError):
                continue
            out.append(json.dumps({"custom_id": ours, "result": parsed.get("result")}).encode())
        return b"".join(line + b"\n" for line in out)

    def cancel(self, batch_id: str) -> None:
        self._ask(f"cancelling message batch {batch_id}", lambda: self.client.messages.batches.cancel(batch_id))

    def forget(self, file_ids: list[str | None]) -> None:
        """Nothing to delete: a batch's requests live in it, and Anthropic keeps its results 29 days."""
