"""``lenscap caption``'s options: the command's own, and the backend options that are flags of it.

A backend option with a ``panel`` (``Option(..., panel=MODEL_PANEL)``) is a flag of ``lenscap
caption`` of its own (``--max-tokens``): its help and type come from the first built-in backend
that declares it, its shown default from every built-in backend that has it
(``300; transformers, vllm: 256``). Left unset (None), each backend takes its own default. Any
option, a plugin's too, can also be given as ``-O NAME=VALUE``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lenscap.caption.backends import REGISTRY, backend_class, promoted
from lenscap.caption.cache import CACHE_DIR_TEXT
from lenscap.caption.prompts import PRESETS
from lenscap.core.errors import UsageError
from lenscap.core.options import (
    Argument,
    Executed,
    FromDataset,
    OwnedOutput,
    RowsOnly,
    all_cores,
    check,
    option,
    with_fields,
)
from lenscap.core.registry import Option

__all__ = ["CaptionOptions", "HINTS", "BACKEND_FLAGS", "DEFAULT_WORKERS"]

HINTS = ("ocr",)  # what --hints knows: text read from the image (the ocr extra)


def _per_backend(shown: dict[str, str | None]) -> str | bool:
    """Backend -> its default as text, as one text: the first backend's, then ``names: text`` for each
    other value (False: no backend has one to show)."""
    groups: dict[str, list[str]] = {}
    for backend, text in shown.items():
        groups.setdefault(text or "", []).append(backend)
    parts = [(text, names) for text, names in groups.items() if text]
    if not parts:
        return False
    return "; ".join([parts[0][0], *(f"{', '.join(names)}: {text}" for text, names in parts[1:])])


# --processes when not given, by whether the backend runs as a batch job (None: all cores): building
# batch request lines is CPU work, online and local captioning is not.
DEFAULT_WORKERS: dict[bool, int | None] = {False: 1, True: None}


def _default_workers(runs_as_batch: bool) -> int:
    workers = DEFAULT_WORKERS[runs_as_batch]
    return all_cores() if workers is None else workers


def _processes_text() -> str | bool:
    """``1; openai-batch, batch-files: all cores``: --processes's default for each built-in backend."""
    defaults = {name: DEFAULT_WORKERS[backend_class(name).runs_as_batch] for name in REGISTRY.builtins}
    return _per_backend({name: "all cores" if n is None else str(n) for name, n in defaults.items()})


@dataclass(kw_only=True, frozen=True)
class _CaptionFlags(RowsOnly, OwnedOutput, FromDataset, Executed):
    command: ClassVar[str] = "caption"
    help: ClassVar[
        str
    ] = """Recaption a dataset with a vision-language model. Rerun to resume: nothing already paid is asked again.

    openai: any chat-completions server. openai-batch: OpenAI's Batch API at half price (rerun, or --wait,
    to collect). anthropic, anthropic-batch: Claude, online or through Message Batches at half price.
    batch-files: files for vllm run-batch (rerun to merge). transformers, vllm: local models.
    describe: an offline description computed from the pixels (no model).
    """
    example: ClassVar[str] = "lenscap caption data/filtered data/captioned --backend openai --model gpt-4.1-mini --max-cost 5"
    arguments: ClassVar[tuple[Argument, ...]] = (
        Argument("in_dir", "Input dataset directory (e.g. from lenscap download)."),
        Argument("out_dir", "Output dataset directory."),
    )

    backend: str = option(
        "openai",
        "Caption backend: openai, openai-batch, anthropic, anthropic-batch, batch-files, transformers, vllm, describe, or a plugin (lenscap backends lists them).",
    )
    prompt: str = option(
        "lens",
        "Preset (lens, short, alt-aware) or a prompt file ({alt_text} marks where the alt-text goes).",
        path=True,
        keywords=tuple(PRESETS),
    )
    hints: str | None = option(
        None,
        "Grounding hints added to the prompt: ocr (text read from the image; needs the ocr extra).",
        show_default=False,
    )
    max_cost: float | None = option(
        None, "Stop when this output directory has spent this many USD (all runs together).", show_default="no limit"
    )
    processes: int | None = option(
        None,
        "Worker processes (each gets an equal part of --rpm/--tpm; with --executor ray, the workers share them "
        "instead). Batch backends: the processes that build request lines and read answers.",
        show_default=_processes_text(),
    )
    cache: str | None = option(None, "Response cache directory.", show_default=CACHE_DIR_TEXT, path=True)
    no_cache: bool = option(
        False, "Neither read nor write the response cache.", names=("--no-cache",), switch=True, show_default=False
    )
    max_error_share: float = option(
        0.0,
        "The share of captions that may end in error (after the retries) with the run still a success (exit 0); "
        "more is exit 1 (rerun with --retry-errors to ask them again).",
    )
    retry_errors: bool = option(
        False,
        "In an output captioned before, ask again the samples whose caption_status is error, and no other.",
        switch=True,
        show_default=False,
    )
    redo: str | None = option(
        None,
        "The input is captioned: caption again only its rows where this SQL expression over its columns is true "
        "(DuckDB), e.g. \"caption_status = 'refused'\", not from the response cache; the other rows are carried "
        "over as they are, and caption_run says which run wrote each caption.",
        show_default=False,
    )
    # Last: the field's name hides the function ``option`` in the rest of the class body.
    option: list[str] | None = option(
        None,
        "Any backend option as NAME=VALUE (plugins' options too).",
        names=("--option", "-O"),
        show_default=False,
    )

    def validate(self) -> None:
        super().validate()
        check(self.max_cost is None or self.max_cost > 0, f"--max-cost must be positive, not {self.max_cost}")
        check(0 <= self.max_error_share <= 1, f"--max-error-share must be between 0 and 1, not {self.max_error_share}")
        for h in self.hint_names:
            check(h in HINTS, f"--hints knows only {', '.join(HINTS)}, not {h!r}")
        self.backend_values()  # -O NAME=VALUE's syntax; the backend checks names and values when it is built
        if self.redo is not None:
            check(bool(self.redo.strip()), "--redo is empty; give an SQL expression over the input's columns, or leave it out")
            check(
                not self.retry_errors,
                "--redo and --retry-errors do not go together: --redo writes a new output from a captioned "
                "input; to ask its errors again there, give --redo \"caption_status = 'error'\"",
            )

    @property
    def hint_names(self) -> tuple[str, ...]:
        return tuple(h.strip() for h in (self.hints or "").split(",") if h.strip())

    def backend_values(self) -> dict[str, Any]:
        """The backend's option values given: its flags that were set, then every ``-O NAME=VALUE``."""
        values = {name: getattr(self, name) for name in BACKEND_FLAGS if getattr(self, name) is not None}
        for item in self.option or []:
            name, eq, value = item.partition("=")
            if not eq or not name.strip():
                raise UsageError(f"-O/--option takes NAME=VALUE, not {item!r}")
            values[name.strip().replace("-", "_")] = value
        return values

    def workers_for(self, runs_as_batch: bool) -> int:
        """--processes, or: building batch request lines is CPU work (all cores); online and local captioning is not (1)."""
        if self.processes is not None:
            return self.processes
        return _default_workers(runs_as_batch)

    def default_processes(self) -> int:
        return self.workers_for(backend_class(self.backend).runs_as_batch)


def _default_text(specs: dict[str, Option]) -> str | bool:
    """``300; transformers, vllm: 256``: each built-in backend's default (False: none has one to show)."""
    return _per_backend({b: spec.default_text if spec.default in (None, []) else str(spec.default) for b, spec in specs.items()})


def _flag_fields() -> list[tuple[str, Any, Any]]:
    fields = []
    for name, (spec, specs) in promoted().items():
        tp: Any = list[spec.type] if spec.repeated else spec.type  # type: ignore[name-defined]
        # An old name any backend still accepts (transformers' max_new_tokens) is an old flag name too.
        olds = tuple(dict.fromkeys("--" + old.replace("_", "-") for s in specs.values() for old in s.deprecated_names))
        how: dict[str, Any] = {"panel": spec.panel, "old_names": olds}
        if spec.type is bool:
            how |= {"switch": True, "show_default": False}
        else:
            how["show_default"] = _default_text(specs)
        fields.append((name, tp | None, option(None, spec.help, **how)))
    return fields


_FLAG_FIELDS = _flag_fields()
BACKEND_FLAGS = tuple(name for name, _, _ in _FLAG_FIELDS)
CaptionOptions = with_fields(_CaptionFlags, "CaptionOptions", __name__, _FLAG_FIELDS)
