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

if TYPE_CHECKING:
    from lenscap.core.executors import Executor

__all__ = [
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
    "CAPTION_FLAGS",
    "OptionRenamed",
    "renamed_keyword",
]

OK, ERROR, REFUSED, TRUNCATED, SKIPPED = "ok", "error", "refused", "truncated", "skipped"


class OptionRenamed(FutureWarning):
    """An option given under its old name (``max_new_tokens``): it still works, for one release."""


OUTCOMES = (OK, ERROR, REFUSED, TRUNCATED, SKIPPED)

# The backend options that ``lenscap caption`` has a flag of its own for (``--max-tokens``); any other
# option is given as ``-O NAME=VALUE``, and a bad value of one says so ("-O digits=two: digits takes an
# int, not 'two'"), since there is no ``--digits`` to point at.
CAPTION_FLAGS = frozenset(
    {
        "model",
        "base_url",
        "api_key_env",
        "max_tokens",
        "temperature",
        "detail",
        "max_side",
        "rpm",
        "tpm",
        "concurrency",
        "prices",
        "timeout",
        "max_retries",
        "outage_timeout",
        "wait",
        "poll_interval",
        "max_requests_per_file",
        "max_file_mb",
        "max_enqueued_tokens",
        "device",
        "dtype",
        "batch_size",
    }
)


@dataclass(frozen=True)
class Option:
    """One option a backend accepts: ``--name-with-dashes`` on the command line (the options in
    ``CAPTION_FLAGS``), ``-O name=value`` (any option), ``name`` in recipes and a keyword of
    ``lenscap.api.backend``. Values from the command line arrive as strings and are parsed here;
    a value that does not parse is refused with a message that shows it.

    ``deprecated_names``: old names still accepted (for one release), with an ``OptionRenamed`` warning.
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    repeated: bool = False
    deprecated_names: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, value: Any) -> Any:
        if self.repeated:
            values = value if isinstance(value, (list, tuple)) else [value]
            return [self._one(v) for v in values]
        return self._one(value)

    def _refuse(self, value: Any, problem: str) -> UsageError:
        """``--max-tokens takes an int, not 'lots'``; ``-O digits=two: digits takes an int, not 'two'``."""
        shown = value if isinstance(value, str) else repr(value)
        if self.name in CAPTION_FLAGS:
            return UsageError(f"{self.flag} {problem}, not {value!r}")
        return UsageError(f"-O {self.name}={shown}: {self.name} {problem}, not {value!r}")

    def _one(self, value: Any) -> Any:
        if value is None or isinstance(value, self.type) and not (self.type is int and isinstance(value, bool)):
            parsed = value
        elif self.type is bool:
            text = str(value).strip().lower()
            if text not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise self._refuse(value, "takes true or false")
            parsed = text in ("1", "true", "yes", "on")
        elif (
            self.type in (int, float)
            and isinstance(value, bool)  # True is no number of anything
            or self.type is int
            and isinstance(value, float)
            and not value.is_integer()
        ):  # 2.5 is no int (2.0 is)
            raise self._refuse(value, f"takes a{'n' if self.type is int else ''} {self.type.__name__}")
        else:
            try:
                parsed = self.type(value.strip() if isinstance(value, str) else value)
            except (TypeError, ValueError):
                raise self._refuse(value, f"takes a{'n' if self.type is int else ''} {self.type.__name__}") from None
        if self.choices is not None and parsed is not None and parsed not in self.choices:
            raise self._refuse(value, f"must be one of {', '.join(self.choices)}")
        return parsed

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "flag": self.flag,
            "type": self.type.__name__ + ("[]" if self.repeated else ""),
            "default": self.default,
            "choices": list(self.choices) if self.choices else None,
            "help": self.help,
            "deprecated_names": list(self.deprecated_names),
        }


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
    ``priced`` (captions cost money; then ``has_price`` and ``estimate_cost``), ``check`` (once, before
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
