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
from typing import TYPE_CHECKING, Any, ClassVar

from lenscap.errors import UsageError

if TYPE_CHECKING:
    from lenscap.executors import Executor

__all__ = ["CaptionBackend", "CaptionRequest", "CaptionResult", "Option", "generated", "OK", "ERROR", "REFUSED", "TRUNCATED", "SKIPPED",
           "OUTCOMES"]

OK, ERROR, REFUSED, TRUNCATED, SKIPPED = "ok", "error", "refused", "truncated", "skipped"
OUTCOMES = (OK, ERROR, REFUSED, TRUNCATED, SKIPPED)


@dataclass(frozen=True)
class Option:
    """One option a backend accepts: ``--name-with-dashes`` on the command line, ``name`` in recipes
    and ``-O name=value``. Values from the command line arrive as strings and are parsed here."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    repeated: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, value: Any) -> Any:
        if self.repeated:
            values = value if isinstance(value, (list, tuple)) else [value]
            return [self._one(v) for v in values]
        return self._one(value)

    def _one(self, value: Any) -> Any:
        if value is None or isinstance(value, self.type) and not (self.type is int and isinstance(value, bool)):
            parsed = value
        elif self.type is bool:
            text = str(value).strip().lower()
            if text not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise UsageError(f"{self.flag} takes true or false, not {value!r}")
            parsed = text in ("1", "true", "yes", "on")
        else:
            try:
                parsed = self.type(value)
            except (TypeError, ValueError):
                raise UsageError(f"{self.flag} takes a{'n' if self.type is int else ''} {self.type.__name__}, not {value!r}") from None
        if self.choices is not None and parsed is not None and parsed not in self.choices:
            raise UsageError(f"{self.flag} must be one of {', '.join(self.choices)}, not {parsed!r}")
        return parsed

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "flag": self.flag, "type": self.type.__name__ + ("[]" if self.repeated else ""),
                "default": self.default, "choices": list(self.choices) if self.choices else None, "help": self.help}


@dataclass
class CaptionRequest:
    key: str
    image: bytes
    system: str | None
    instruction: str  # the prompt for this image, alt-text already inserted when the prompt uses it
    prompt_id: str = ""  # the preset's name (lens, short, ...): models with task tokens map it
    ocr_text: str | None = None  # with --hints ocr: what OCR read ("" nothing; None unreadable), recorded with the answer


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


def generated(key: str, text: str, cut: bool, limit_flag: str, input_tokens: int | None, output_tokens: int | None) -> CaptionResult:
    """A local model's reply as an outcome: cut at the token limit is ``truncated`` (the text is kept
    in the error), nothing at all is an ``error``, anything else is the caption. Cost 0."""
    text = " ".join(text.split())
    result = CaptionResult(key, OK, input_tokens=input_tokens, output_tokens=output_tokens, cost_usd=0.0)
    if cut:
        result.status, result.error = TRUNCATED, f"reply cut at {limit_flag}: {text}"
    elif not text:
        result.status, result.error = ERROR, "empty reply"
    else:
        result.caption = text
    return result


class CaptionBackend(ABC):
    name: ClassVar[str]
    needs_key: ClassVar[bool] = False
    priced: ClassVar[bool] = False  # True: captions cost money, and --max-cost needs the model's price
    runs_as_batch: ClassVar[bool] = False  # True: driven as a batch job (lenscap.batch), not per shard
    options: ClassVar[tuple[Option, ...]] = ()
    model: str = ""

    @classmethod
    def from_options(cls, values: dict[str, Any]) -> CaptionBackend:
        """Build the backend from option values (unknown options refused, every value parsed)."""
        return cls(**cls.parse_options(values))

    @classmethod
    def parse_options(cls, values: dict[str, Any]) -> dict[str, Any]:
        known = {o.name: o for o in cls.options}
        for name in values:
            if name not in known:
                names = ", ".join(o.name.replace("_", "-") for o in cls.options) or "none"
                raise UsageError(f"backend {cls.name!r} has no option {name.replace('_', '-')!r} (its options: {names})")
        return {o.name: o.parse(values[o.name]) if o.name in values else o.default for o in cls.options}

    def set_processes(self, processes: int) -> None:
        """The run uses this many worker processes (a rate-limited backend splits its limits)."""

    def share_limits(self, executor: Executor) -> None:
        """Once, in the main process, before the shards go to ``executor``: a rate-limited backend whose
        workers may run on other machines arranges to share the account's limits with them."""

    def has_price(self) -> bool:
        return not self.priced

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
