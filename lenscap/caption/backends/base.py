"""The caption backend protocol: one small class per way of turning images into captions.

A backend receives a stream of requests and reports each result as it finishes, in any order. It
owns its own concurrency (an async pool for an API, batches for a local model); the caption stage
owns everything else: which samples need a request, the journal, the cache, the budget and the
output shard. So a backend is short, and every backend resumes and accounts the same way.

Plugin authors import these names from ``lenscap.plugin`` (see ``docs/plugins.md``).
"""

from __future__ import annotations

import inspect
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from lenscap.core.errors import UsageError
from lenscap.core.registry import Option, OptionRenamed

if TYPE_CHECKING:
    from lenscap.core.executors import Executor

__all__ = [
    "image_own_error",
    "CaptionBackend",
    "CaptionRequest",
    "CaptionResult",
    "Option",
    "generated",
    "OK",
    "ERROR",
    "REFUSED",
    "TRUNCATED",
    "SKIPPED",
    "OUTCOMES",
    "MODEL_PANEL",
    "API_PANEL",
    "BATCH_PANEL",
    "LOCAL_PANEL",
    "OptionRenamed",
    "renamed_keyword",
]

OK, ERROR, REFUSED, TRUNCATED, SKIPPED = "ok", "error", "refused", "truncated", "skipped"


def image_own_error(message: str) -> bool:
    """An error that is the image's own (it cannot be decoded, or the server refused it as an image), not
    the server's or the job's: the world's ordinary failures, which ``--max-error-share`` does not count."""
    lowered = message.lower()
    return lowered.startswith(("not a readable image", "image of ", "cannot decode image")) or (
        message.startswith("HTTP 4") and "image" in lowered
    )


# The --help panels of the backend options that are flags of ``lenscap caption`` (``Option.panel``).
MODEL_PANEL = "Model options (every backend; lenscap backends lists each one's defaults)"
API_PANEL = "API options (openai, anthropic, gemini and their batch backends)"
BATCH_PANEL = "Batch options (openai-batch, anthropic-batch, gemini-batch, batch-files)"
LOCAL_PANEL = "Local model options (transformers, vllm)"


OUTCOMES = (OK, ERROR, REFUSED, TRUNCATED, SKIPPED)


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


def generated(
    key: str, text: str, cut: bool, limit_flag: str, input_tokens: int | None, output_tokens: int | None
) -> CaptionResult:
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


def renamed_keyword(
    backend: str, value: Any, old_value: Any, default: Any, new: str = "max_tokens", old: str = "max_new_tokens"
) -> Any:
    """The value of a keyword argument that may come under its deprecated name (``max_new_tokens=``):
    that one, with an ``OptionRenamed`` warning; refused when both names are given different values."""
    if old_value is None:
        return value
    warnings.warn(
        f"backend {backend!r}: {old}= is now {new}=; the old name goes in the next release", OptionRenamed, stacklevel=3
    )
    if value != default and value != old_value:
        raise UsageError(f"backend {backend!r}: {new}={value!r} and its old name {old}={old_value!r} disagree; give {new} alone")
    return old_value


class CaptionBackend(ABC):
    """The base of every caption backend, built-in or plugin.

    A subclass sets ``name`` (what ``--backend`` takes; the entry point's name should be the same),
    declares its ``options`` (``Option``: parsed and checked here, unknown ones refused), takes them as
    keyword arguments of ``__init__``, and implements ``caption_all``. Optional: ``needs_key``,
    ``priced`` (captions cost money; then ``has_price`` and ``estimate_cost``), ``sends_prompt`` (False
    for a backend that ignores the prompt), ``check`` (once, before
    any work), ``setup`` (once per worker process), ``identity`` (what changes the answers: part of
    the response cache key and the provenance).

    ``model`` is what the ``caption_model`` column records for every caption. A backend with a model
    option sets ``self.model`` in ``__init__``; one that leaves it unset (or empty) records its
    ``name`` instead, so the column is never empty.
    """

    name: ClassVar[str]
    needs_key: ClassVar[bool] = False
    priced: ClassVar[bool] = False  # True: captions cost money, and --max-cost needs the model's price
    runs_as_batch: ClassVar[bool] = False  # True: driven as a batch job (lenscap.caption.batch), not per shard
    # False: the backend reads no prompt (describe), so the rows and the manifest record none, and the
    # audit holds its captions to no prompt's length target.
    sends_prompt: ClassVar[bool] = True
    options: ClassVar[tuple[Option, ...]] = ()

    @property
    def model(self) -> str:
        """The model that writes the captions (the ``caption_model`` column); the backend's ``name``
        when the backend set none."""
        return self.__dict__.get("_caption_model") or self.name

    @model.setter
    def model(self, value: str | None) -> None:
        self.__dict__["_caption_model"] = value

    @classmethod
    def plugin_problems(cls) -> list[str]:
        """What makes this class unusable as a backend (checked when the registry loads it)."""
        problems = []
        if not isinstance(getattr(cls, "name", None), str) or not cls.name:
            problems.append('sets no name (a class attribute: name = "...")')
        if not isinstance(cls.options, tuple) or not all(isinstance(o, Option) for o in cls.options):
            problems.append("options must be a tuple of lenscap.plugin.Option")
        elif len({o.name for o in cls.options}) != len(cls.options):
            problems.append("declares an option twice")
        model = inspect.getattr_static(cls, "model", None)
        if not isinstance(model, property) and not (isinstance(model, str) and model):
            problems.append(
                "sets model to something other than a model name as a class attribute (leave it out: "
                "the caption_model column then records the backend's name)"
            )
        return problems

    @classmethod
    def from_options(cls, values: dict[str, Any]) -> CaptionBackend:
        """Build the backend from option values (unknown options refused, every value parsed)."""
        return cls(**cls.parse_options(values))

    @classmethod
    def parse_options(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Every option's value: the given one parsed, or its default. An option's deprecated name is
        accepted with an ``OptionRenamed`` warning (a ``FutureWarning``); unknown names are refused."""
        known = {o.name: o for o in cls.options}
        renamed = {old: o.name for o in cls.options for old in o.deprecated_names}
        given: dict[str, Any] = {}
        for name, value in values.items():
            if name in renamed:
                new = renamed[name]
                warnings.warn(
                    f"backend {cls.name!r}: option {name.replace('_', '-')!r} is now {new.replace('_', '-')!r}; "
                    f"the old name goes in the next release",
                    OptionRenamed,
                    stacklevel=3,
                )
                if new in values and known[new].parse(values[new]) != known[new].parse(value):
                    raise UsageError(
                        f"backend {cls.name!r}: {new.replace('_', '-')} {values[new]!r} and its old name "
                        f"{name.replace('_', '-')} {value!r} disagree; give {new.replace('_', '-')} alone"
                    )
                given.setdefault(new, value)
            elif name in known:
                given[name] = value
            else:
                names = ", ".join(o.name.replace("_", "-") for o in cls.options) or "none"
                raise UsageError(f"backend {cls.name!r} has no option {name.replace('_', '-')!r} (its options: {names})")
        return {o.name: o.parse(given[o.name]) if o.name in given else o.default for o in cls.options}

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

    def answered_before(self) -> None:
        """Once, in the main process: the output holds answers of this backend (an earlier run's, or
        shards done): its server's failures from the first request on are an outage, not the job's."""

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
