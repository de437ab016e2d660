"""The caption backend protocol: one small class per way of turning images into captions.

A backend receives a stream of requests and reports each result as it finishes, in any order. It
owns its own concurrency (an async pool for an API, batches for a local model); the caption stage
owns everything else: which samples need a request, the journal, the cache, the budget and the
output shard. So a backend is short, and every backend resumes and accounts the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

__all__ = ["CaptionBackend", "CaptionRequest", "CaptionResult", "OK", "ERROR", "REFUSED", "TRUNCATED", "SKIPPED", "OUTCOMES"]

OK, ERROR, REFUSED, TRUNCATED, SKIPPED = "ok", "error", "refused", "truncated", "skipped"
OUTCOMES = (OK, ERROR, REFUSED, TRUNCATED, SKIPPED)


@dataclass
class CaptionRequest:
    key: str
    image: bytes
    system: str | None
    instruction: str  # the prompt for this image, alt-text already inserted when the prompt uses it


@dataclass
class CaptionResult:
    key: str
    status: str
    caption: str | None = None
    error: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CaptionResult:
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})


class CaptionBackend(ABC):
    name: ClassVar[str]
    model: str = ""

    def identity(self) -> dict[str, Any]:
        """Everything that changes what the backend writes for an image (model, generation
        parameters): the response cache key and the provenance. Never secrets."""
        return {"backend": self.name, "model": self.model}

    def parameters(self) -> dict[str, Any]:
        """What the manifest records about this backend (identity plus speed settings; never secrets)."""
        return self.identity()

    def check(self) -> None:
        """Once, in the main process, before any work: raise BackendError if the job cannot run."""

    def setup(self) -> None:
        """Once per worker process."""

    def estimate_cost(self, width: int, height: int, request: CaptionRequest) -> float:
        """The most a request for an image of this size can cost (USD): what the budget reserves."""
        return 0.0

    @abstractmethod
    def caption_all(self, requests: Iterable[CaptionRequest], on_result: Callable[[CaptionResult], None]) -> None:
        """Caption every request, calling ``on_result`` once per request as results finish.

        Requests are pulled lazily (the iterator may stop early: the budget ran out). A problem with
        one image is a result with status ``error``; a problem with the whole job (bad key, unknown
        model) raises ``BackendError``.
        """
