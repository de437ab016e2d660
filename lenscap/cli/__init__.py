"""The ``lenscap`` command: a thin Typer layer over the library.

Exit codes: 0 done; 1 some shards failed (the others are kept; rerun to finish); 2 usage error
(bad flag, missing input, wrong directory, rejected key, unknown model); 3 internal error;
4 --max-cost reached; 5 locked (another live lenscap process is writing the same output); 6 an audit's --fail-on
rule was broken; 7 the output holds 0 samples (a warning: a filter that kept nothing, an empty export, a recipe
stage that left nothing);
130 interrupted.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import typer
import typer.main

from lenscap import __version__
from lenscap.caption.backends.base import CAPTION_FLAGS  # the backend options that have a flag of their own on caption
from lenscap.core.errors import LenscapError
from lenscap.core.result import EXIT_EMPTY

# What each exit code means, in the log's last line of a run (a cron log read the next morning).
EXIT_MEANINGS = {
    0: "ok",
    1: "some shards failed: rerun to finish",
    2: "usage error",
    3: "internal error",
    4: "--max-cost reached",
    5: "locked by another run",
    6: "an audit rule broken",
    7: "0 samples",
    130: "interrupted",
}


def _plain_default_text() -> None:
    """Show a default given as words ("all cores") as [default: all cores], not click's [default: (all cores)]."""
    import typer.core

    original = getattr(typer.core, "_get_default_string", None)
    if original is None or getattr(original, "lenscap", False):
        return

    def plain(obj: Any, *, ctx: Any, show_default_is_str: bool, default_value: Any) -> str:
        text = original(obj, ctx=ctx, show_default_is_str=show_default_is_str, default_value=default_value)
        return text[1:-1] if show_default_is_str and text.startswith("(") and text.endswith(")") else text

    plain.lenscap = True  # type: ignore[attr-defined]
    typer.core._get_default_string = plain  # type: ignore[attr-defined]


_plain_default_text()

app = typer.Typer(
    name="lenscap",
    help="Build captioned, filtered, deduplicated, training-ready image-text datasets from URL lists.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# The same idea has the same flag, default and help in every command. Options that every command
# takes (--json, --quiet, --log-file) are accepted after the subcommand, where cron lines put them.
JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json",
        metavar="",
        show_default=False,
        help='Print one JSON object on stdout, on failure too ({"ok": false, "exit_code": N, "error": ...}).',
    ),
]
QuietOpt = Annotated[
    bool,
    typer.Option(
        "--quiet", "-q", metavar="", show_default=False, help="No progress output (notes on what went wrong still go to stderr)."
    ),
]
LogFileOpt = Annotated[
    str | None,
    typer.Option(
        "--log-file",
        help="Also append timestamped progress and notes to this file, and one last line saying how the run ended (for cron).",
        show_default=False,
    ),
]
ProcessesOpt = Annotated[
    int | None,
    typer.Option(help="Worker processes on this machine (never more than there are shards to do).", show_default="all cores"),
]
ExecutorOpt = Annotated[
    str,
    typer.Option(
        "--executor",
        help="Where shard tasks run: local (--processes on this machine) or ray (one Ray task per shard; needs the ray extra).",
    ),
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        metavar="",
        show_default=False,
        help="The output holds another job's results (other input or settings): clear it and start again.",
    ),
]
AllowIncompleteOpt = Annotated[
    bool,
    typer.Option(
        "--allow-incomplete",
        metavar="",
        show_default=False,
        help="Go on without the input's incomplete shards (a stage still writing it); they are named in the output's manifest.",
    ),
]
CopyImagesOpt = Annotated[
    bool,
    typer.Option(
        "--copy-images",
        metavar="",
        show_default=False,
        help="Write the images into this output too (a self-contained dataset that webdataset reads on its own); by default the output's rows refer to the images where they already are.",
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="With --executor ray: the cluster (auto, ray://HOST:10001, HOST:6379; default $RAY_ADDRESS, else a Ray started on this machine).",
        show_default=False,
    ),
]
MinSideOpt = Annotated[
    int | None, typer.Option(help="Drop images whose shorter side is below this many pixels.", show_default="no limit")
]
MaxAspectOpt = Annotated[
    float | None, typer.Option(help="Drop images more elongated than this (long side / short side).", show_default="no limit")
]


def _old_name(old: str, new: str) -> Any:
    """A flag's old name, kept (hidden) for one release: it still works and says what it is called now."""
    return typer.Option(old, hidden=True, help=f"Old name of {new}.")


# Hidden old flag names (their parameter) -> the parameter that replaced them, and its flag.
ALIASES: dict[str, tuple[str, str, str]] = {
    "min_image_size": ("min_side", "--min-image-size", "--min-side"),
    "max_aspect_ratio": ("max_aspect", "--max-aspect-ratio", "--max-aspect"),
    "retries": ("max_retries", "--retries", "--max-retries"),
    "max_new_tokens": ("max_tokens", "--max-new-tokens", "--max-tokens"),
    "image_size_wxh": ("source_size", "--image-size", "--source-size"),
}


def all_cores() -> int:
    return os.cpu_count() or 1


def _executor(executor: str, processes: int | None, ray_address: str | None) -> Any:
    from lenscap.core.executors import RayExecutor, make_executor

    runner = make_executor(executor, all_cores() if processes is None else processes, ray_address)
    if isinstance(runner, RayExecutor):
        runner.connect()  # an unreachable cluster is an error before any output is touched
    return runner


def _ray_cluster(executor: str, processes: int | None, ray_address: str | None) -> str | None:
    """For download (img2dataset joins the cluster itself): the GCS address of the cluster, or None."""
    from lenscap.core.executors import RayExecutor

    runner = _executor(executor, processes, ray_address)
    return runner.cluster_address() if isinstance(runner, RayExecutor) else None


# What the last command said on stdout with --json, or would have: the run's last log line sums it up.
_last_summary: dict[str, Any] = {}


def _money(value: Any) -> Any:
    """Money rounded to a hundredth of a cent, in every summary (float sums print 0.05480200000000001)."""
    if isinstance(value, dict):
        return {
            k: (round(v, 4) if isinstance(v, float) and (k.endswith("usd") or k == "usd") else _money(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_money(v) for v in value]
    return value


def _emit(summary: dict[str, Any], as_json: bool) -> None:
    """The command's one JSON object: ``ok`` and ``exit_code`` first, money rounded."""
    global _last_summary
    code = int(summary.get("exit_code", 0))
    _last_summary = {
        "ok": code == 0,
        "exit_code": code,
        **{k: v for k, v in _money(summary).items() if k not in ("ok", "exit_code")},
    }
    if as_json:
        print(json.dumps(_last_summary, default=str), flush=True)


@dataclass
class Outcome:
    """What a command did: its ``--json`` summary (with ``exit_code``), the lines a person reads on
    stderr (not with ``--quiet`` or ``--json``), ``stdout`` lines (not with ``--json``), and notes said
    whatever the flags (what went wrong, what to do). Recipes take the summary; the CLI shows the rest."""

    summary: dict[str, Any]
    lines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stdout: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return int(self.summary.get("exit_code", 0))


def common_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """A command's parsed flags without the ones every command handles the same way: ``--log-file``
    (applied here) and the hidden old names (their values moved to the new names, with a note)."""
    flags = {k: v for k, v in flags.items() if k != "as_json"}
    log_file = flags.pop("log_file", None)
    if log_file is not None:
        from lenscap.core.progress import set_log_file

        set_log_file(log_file)
    return under_new_names(flags, say=True)


def under_new_names(flags: dict[str, Any], say: bool = False) -> dict[str, Any]:
    """``flags`` with a hidden old name's value moved to the name that replaced it (``say``: with a note)."""
    flags = dict(flags)
    for old, (new, old_flag, new_flag) in ALIASES.items():
        value = flags.pop(old, None)
        if value is not None:
            if say:
                print(f"lenscap: note: {old_flag} is now {new_flag} (the old name goes in the next release)", file=sys.stderr)
            flags[new] = value
    return flags


def _run(outcome_of: Callable[..., Outcome], flags: dict[str, Any], as_json: bool, quiet: bool) -> None:
    """Run a command's outcome function on its flags and show the outcome; exits with its code."""
    from lenscap.core.progress import log

    outcome = outcome_of(**common_flags(flags))
    _emit(outcome.summary, as_json)
    for line in outcome.notes:
        print(line, file=sys.stderr)
        log(line, to_stderr=False)
    if not as_json:
        for line in outcome.stdout:
            print(line)
        if not quiet:
            for line in outcome.lines:
                print(line, file=sys.stderr)
    raise typer.Exit(outcome.exit_code)


def _version(value: bool) -> None:
    if value:
        print(f"lenscap {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = None,
    log_file: LogFileOpt = None,
) -> None:
    if log_file is not None:
        from lenscap.core.progress import set_log_file

        set_log_file(log_file)


@app.command(epilog="Example: lenscap download urls.csv data/raw --processes 8 --min-side 256")
def download(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="INPUT OUT_DIR: a URL list (txt/csv/tsv/jsonl/parquet, a directory or glob of them, or - for stdin) and the output dataset directory (a path, or a URL such as s3://bucket/raw). With --retry-failed: just OUT_DIR.",
            show_default=False,
            metavar="[INPUT] OUT_DIR",
        ),
    ],
    url_col: Annotated[
        str | None, typer.Option(help="URL column (default: url, URL, image_url or img_url, whichever exists).")
    ] = None,
    caption_col: Annotated[
        str | None,
        typer.Option(help="Caption (alt-text) column (default: caption, alt_text, alt, text or TEXT, whichever exists)."),
    ] = None,
    extra_cols: Annotated[str | None, typer.Option(help="Comma-separated input columns to keep in the output.")] = None,
    samples_per_shard: Annotated[int, typer.Option(help="Samples per shard.")] = 10_000,
    processes: ProcessesOpt = None,
    threads: Annotated[int, typer.Option(help="Download threads per process.")] = 32,
    image_size: Annotated[int, typer.Option(help="Size in pixels that --resize-mode fits images to.")] = 1024,
    resize_mode: Annotated[
        str,
        typer.Option(
            help="keep_ratio (longest side <= --image-size), keep_ratio_smallest (shortest side), center_crop, border, or no."
        ),
    ] = "keep_ratio",
    upscale: Annotated[
        bool, typer.Option(metavar="", show_default="off", help="Also enlarge images smaller than --image-size.")
    ] = False,
    min_side: MinSideOpt = None,
    max_aspect: MaxAspectOpt = None,
    max_pixels: Annotated[
        int, typer.Option(help="Reject images with more pixels than this (decompression bombs).")
    ] = 178_956_970,
    timeout: Annotated[int, typer.Option(help="Seconds to wait for a server.")] = 10,
    max_retries: Annotated[int, typer.Option(help="Extra attempts per failed download.")] = 2,
    user_agent_token: Annotated[
        str, typer.Option(help="Token added to the User-Agent and matched against X-Robots-Tag directives.")
    ] = "lenscap",
    respect_opt_out: Annotated[
        bool,
        typer.Option(
            metavar="", show_default="on", help="Skip images whose server sends X-Robots-Tag noai/noimageai/noindex/noimageindex."
        ),
    ] = True,
    retry_failed: Annotated[
        bool,
        typer.Option(
            "--retry-failed",
            metavar="",
            show_default=False,
            help="After downloading, fetch the failed downloads of completed shards again and merge the successes.",
        ),
    ] = False,
    allow_private_network: Annotated[
        bool,
        typer.Option(
            metavar="",
            show_default="off",
            help="Also fetch from loopback, private, link-local and other non-public addresses (refused by default: a URL list must not reach your network).",
        ),
    ] = False,
    overwrite: OverwriteOpt = False,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_file: LogFileOpt = None,
    min_image_size: Annotated[int | None, _old_name("--min-image-size", "--min-side")] = None,
    max_aspect_ratio: Annotated[float | None, _old_name("--max-aspect-ratio", "--max-aspect")] = None,
    retries: Annotated[int | None, _old_name("--retries", "--max-retries")] = None,
) -> None:
    """Download images from a URL list into a dataset directory (through img2dataset). Rerun to resume."""
    _run(download_outcome, locals(), as_json, quiet)


# Backend options: None means "not given", so the backend's own default applies (lenscap backends lists them).
_MODEL = "Model options (every backend; lenscap backends lists each one's defaults)"
_API = "API options (openai, openai-batch)"
_BATCH = "Batch options (openai-batch, batch-files)"
_LOCAL = "Local model options (transformers, vllm)"


def _backend_option(help: str, panel: str, default: str | None = None, *names: str) -> Any:
    return typer.Option(*names, help=help, rich_help_panel=panel, show_default=default if default is not None else False)


@app.command(epilog="Example: lenscap caption data/filtered data/captioned --backend openai --model gpt-4.1-mini --max-cost 5")
def caption(
    in_dir: Annotated[str, typer.Argument(help="Input dataset directory (e.g. from lenscap download).")],
    out_dir: Annotated[str, typer.Argument(help="Output dataset directory.")],
    backend: Annotated[
        str,
        typer.Option(
            help="Caption backend: openai, openai-batch, batch-files, transformers, vllm, describe, or a plugin (lenscap backends lists them)."
        ),
    ] = "openai",
    prompt: Annotated[
        str, typer.Option(help="Preset (lens, short, alt-aware) or a prompt file ({alt_text} marks where the alt-text goes).")
    ] = "lens",
    hints: Annotated[
        str | None,
        typer.Option(
            help="Grounding hints added to the prompt: ocr (text read from the image; needs the ocr extra).", show_default=False
        ),
    ] = None,
    max_cost: Annotated[
        float | None,
        typer.Option(
            help="Stop when this output directory has spent this many USD (all runs together).", show_default="no limit"
        ),
    ] = None,
    processes: Annotated[
        int | None,
        typer.Option(
            help="Worker processes (each gets an equal part of --rpm/--tpm; with --executor ray, the workers share them instead). Batch backends: the processes that build request lines and read answers.",
            show_default="1; batch backends: all cores",
        ),
    ] = None,
    cache: Annotated[
        str | None, typer.Option(help="Response cache directory.", show_default="$LENSCAP_CACHE_DIR or ~/.cache/lenscap")
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", metavar="", show_default=False, help="Neither read nor write the response cache.")
    ] = False,
    option: Annotated[
        list[str] | None,
        typer.Option("--option", "-O", help="Any backend option as NAME=VALUE (plugins' options too).", show_default=False),
    ] = None,
    model: Annotated[
        str | None,
        _backend_option(
            "Model: name on the server, hub id or local directory.",
            _MODEL,
            "gpt-4.1-mini (API backends); transformers, vllm: required",
        ),
    ] = None,
    max_tokens: Annotated[int | None, _backend_option("Most output tokens per caption.", _MODEL, "300; local models 256")] = None,
    temperature: Annotated[float | None, _backend_option("Sampling temperature.", _MODEL, "the model's")] = None,
    max_side: Annotated[
        int | None,
        _backend_option("Longest image side in pixels, after downscaling, that the model sees.", _MODEL, "512; transformers 768"),
    ] = None,
    detail: Annotated[str | None, _backend_option("Image detail: low, high or auto.", _API, "low")] = None,
    base_url: Annotated[
        list[str] | None,
        _backend_option("API base URL; repeat for a pool of deployments.", _API, "$OPENAI_BASE_URL or OpenAI", "--base-url"),
    ] = None,
    api_key_env: Annotated[
        str | None, _backend_option("Name of the variable holding the API key (not the key).", _API, "OPENAI_API_KEY")
    ] = None,
    rpm: Annotated[
        float | None, _backend_option("Requests per minute per endpoint.", _API, "from the server's rate-limit headers")
    ] = None,
    tpm: Annotated[
        float | None, _backend_option("Tokens per minute per endpoint.", _API, "from the server's rate-limit headers")
    ] = None,
    concurrency: Annotated[int | None, _backend_option("Requests in flight per process.", _API, "32")] = None,
    prices: Annotated[
        str | None, _backend_option("JSON or TOML price file (USD per 1M tokens) over the built-in table.", _API)
    ] = None,
    timeout: Annotated[float | None, _backend_option("Seconds to wait for one reply.", _API, "60")] = None,
    max_retries: Annotated[
        int | None,
        _backend_option(
            "Retries per request on 429, 5xx, timeouts, malformed replies (batch backends: rounds of new batches).",
            _API,
            "5; batch backends 3",
        ),
    ] = None,
    outage_timeout: Annotated[
        float | None,
        _backend_option(
            "Seconds every endpoint may fail every request before the run stops (exit 1) with the unanswered samples left for the rerun.",
            _API,
            "300",
        ),
    ] = None,
    wait: Annotated[
        bool | None,
        typer.Option(
            "--wait",
            metavar="",
            show_default=False,
            rich_help_panel=_BATCH,
            help="Poll until every batch is done (by default: submit, collect what is ready, exit).",
        ),
    ] = None,
    poll_interval: Annotated[float | None, _backend_option("Seconds between polls with --wait.", _BATCH, "60")] = None,
    max_requests_per_file: Annotated[
        int | None, _backend_option("Requests per batch file (the API allows 50,000).", _BATCH, "50000")
    ] = None,
    max_file_mb: Annotated[float | None, _backend_option("MiB per batch file (the API allows 200).", _BATCH, "200")] = None,
    max_enqueued_tokens: Annotated[
        int | None,
        _backend_option(
            "The account's batch queue limit, in input tokens of the batches in flight; files are submitted as the queue has room.",
            _BATCH,
            "learned from the API's token_limit_exceeded",
        ),
    ] = None,
    device: Annotated[
        str | None, _backend_option("auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.", _LOCAL, "auto")
    ] = None,
    dtype: Annotated[str | None, _backend_option("auto, float32, float16 or bfloat16.", _LOCAL, "auto")] = None,
    batch_size: Annotated[int | None, _backend_option("Images per generation batch.", _LOCAL, "8")] = None,
    copy_images: CopyImagesOpt = False,
    overwrite: OverwriteOpt = False,
    allow_incomplete: AllowIncompleteOpt = False,
    retry_errors: Annotated[
        bool,
        typer.Option(
            "--retry-errors",
            metavar="",
            show_default=False,
            help="In an output captioned before, ask again the samples whose caption_status is error, and no other.",
        ),
    ] = False,
    redo: Annotated[
        str | None,
        typer.Option(
            help="The input is captioned: caption again only its rows where this SQL expression over its columns is true (DuckDB), e.g. \"caption_status = 'refused'\", not from the response cache; the other rows are carried over as they are, and caption_run says which run wrote each caption.",
            show_default=False,
        ),
    ] = None,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_file: LogFileOpt = None,
    max_new_tokens: Annotated[int | None, _old_name("--max-new-tokens", "--max-tokens")] = None,
) -> None:
    """Recaption a dataset with a vision-language model. Rerun to resume: nothing already paid is asked again.

    openai: any chat-completions server. openai-batch: OpenAI's Batch API at half price (rerun, or --wait,
    to collect). batch-files: files for vllm run-batch (rerun to merge). transformers, vllm: local models.
    describe: an offline description computed from the pixels (no model).
    """
    _run(caption_outcome, locals(), as_json, quiet)


def _parse_hints(hints: str | None) -> tuple[str, ...]:
    from lenscap.core.errors import UsageError

    names = tuple(h.strip() for h in (hints or "").split(",") if h.strip())
    for h in names:
        if h != "ocr":
            raise UsageError(f"--hints knows only ocr, not {h!r}")
    return names


@app.command(
    "filter", epilog="Example: lenscap filter data/raw data/filtered --min-side 256 --annotate blur,uniform --min-sharpness 20"
)
def filter_command(
    in_dir: Annotated[str, typer.Argument(help="Input dataset directory.")],
    out_dir: Annotated[str, typer.Argument(help="Output dataset directory (not written with --dry-run).")],
    min_side: MinSideOpt = None,
    max_aspect: MaxAspectOpt = None,
    min_bytes: Annotated[int | None, typer.Option(help="Drop images smaller than this many bytes.")] = None,
    caption_min_words: Annotated[int | None, typer.Option(help="Drop samples whose caption has fewer words.")] = None,
    caption_max_words: Annotated[int | None, typer.Option(help="Drop samples whose caption has more words.")] = None,
    status: Annotated[str, typer.Option(help="Keep only this download status (success), or any.")] = "success",
    where: Annotated[
        str | None,
        typer.Option(
            help="Keep only rows where this SQL expression over the columns is true (DuckDB), e.g. \"width >= 512 AND caption NOT ILIKE '%stock%'\"."
        ),
    ] = None,
    blocklist: Annotated[str | None, typer.Option(help="File of MD5 or SHA-256 hex digests of images to drop.")] = None,
    annotate: Annotated[
        str | None,
        typer.Option(help="Comma-separated annotators whose scores to add: blur, uniform, ocr, faces, nsfw, clip, or a plugin."),
    ] = None,
    min_sharpness: Annotated[float | None, typer.Option(help="blur: drop images whose Laplacian variance is below.")] = None,
    max_uniformity: Annotated[
        float | None, typer.Option(help="uniform: drop images whose most common colour covers more than this share.")
    ] = None,
    max_text_area: Annotated[float | None, typer.Option(help="ocr: drop images whose text covers more than this share.")] = None,
    max_faces: Annotated[int | None, typer.Option(help="faces: drop images with more faces.")] = None,
    max_nsfw: Annotated[float | None, typer.Option(help="nsfw: drop images scoring above (NudeNet, the nsfw extra).")] = None,
    min_clip_score: Annotated[
        float | None, typer.Option(help="clip: drop samples whose image-caption similarity (x100) is below.")
    ] = None,
    clip_model: Annotated[
        str | None,
        typer.Option(help="clip: weights to use, a hub id or a local directory (default openai/clip-vit-base-patch32)."),
    ] = None,
    threshold: Annotated[
        list[str] | None, typer.Option(help="NAME=VALUE: the drop threshold of any annotator (plugins too).")
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", metavar="", show_default=False, help="Count what would be dropped, per reason; write nothing."),
    ] = False,
    copy_images: CopyImagesOpt = False,
    overwrite: OverwriteOpt = False,
    allow_incomplete: AllowIncompleteOpt = False,
    processes: ProcessesOpt = None,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_file: LogFileOpt = None,
) -> None:
    """Keep the samples that pass cheap rules, then content annotators; every drop is recorded with its reason."""
    _run(filter_outcome, locals(), as_json, quiet)


def _say_batch(batch: Any, backend: Any, out_dir: str) -> list[str]:
    outcomes = ", ".join(f"{n} {k}" for k, n in batch.counts.get("caption_status", {}).items())
    files = ", ".join(f"{n} {k}" for k, n in batch.files.items()) or "none"
    lines = [
        f"{batch.out_dir}: {batch.shards_completed}/{batch.shards_total} shards ({outcomes or 'none yet'}); "
        f"batch files: {files}; ${batch.spent_usd:.4f} spent"
    ]
    if batch.complete:
        return lines
    from pathlib import Path

    commands = getattr(backend.transport(Path(out_dir) / ".lenscap" / "batch"), "commands", None)
    if commands is not None:
        return [*lines, "run these, then rerun this command to merge the results:", *(f"  {c}" for c in commands(backend.model))]
    return [*lines, "not finished: rerun this command (or from cron, or with --wait) to collect"]


@app.command(epilog="Example: lenscap backends --json")
def backends(as_json: JsonOpt = False, quiet: QuietOpt = False, log_file: LogFileOpt = None) -> None:
    """List the installed caption backends: where each comes from, whether it needs a key, its options."""
    from lenscap.caption.backends import describe_backends

    common_flags({"log_file": log_file})
    found = describe_backends()
    _emit({"command": "backends", "backends": found}, as_json)
    if as_json:
        return
    for b in found:
        if "error" in b:
            print(f"{b['name']}  ({b['source']})  cannot be loaded: {b['error']}")
            continue
        traits = ", ".join(
            t for t, on in (("needs a key", b["needs_key"]), ("priced", b["priced"]), ("batch job", b["batch"])) if on
        )
        print(f"{b['name']}  ({b['source']}{'; ' + traits if traits else ''})")
        if b["summary"]:
            print(f"    {b['summary']}")
        for o in b["options"]:
            default = "" if o["default"] in (None, []) else f" [default: {o['default']}]"
            choices = f" ({'|'.join(o['choices'])})" if o["choices"] else ""
            flag = o["flag"] if o["name"] in CAPTION_FLAGS else f"-O {o['name']}=..."
            print(f"    {flag:<26} {o['type']:<6} {o['help']}{choices}{default}")


@app.command(epilog="Example: lenscap filters --json")
def filters(as_json: JsonOpt = False, quiet: QuietOpt = False, log_file: LogFileOpt = None) -> None:
    """List the installed filters (annotators): where each comes from, what it scores, its threshold flag."""
    from lenscap.filter.annotators import describe_filters, filters_lines

    common_flags({"log_file": log_file})
    found = describe_filters()
    _emit({"command": "filters", "filters": found}, as_json)
    if not as_json:
        for line in filters_lines(found):
            print(line)


batch_app = typer.Typer(help="Look after a caption batch job (openai-batch, batch-files).", no_args_is_help=True)
app.add_typer(batch_app, name="batch")


@batch_app.command("status", epilog="Example: lenscap batch status data/captioned --json")
def batch_status_command(
    out_dir: Annotated[str, typer.Argument(help="The output directory of a batch caption job.")],
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_file: LogFileOpt = None,
) -> None:
    """Files by state, the batch queue, requests answered and left, money spent, and an ETA from the rate of
    the last day's answers (from the job's state file: no network, instant at any scale)."""
    from lenscap.caption.batch import batch_status

    common_flags({"log_file": log_file})
    info = batch_status(out_dir)
    _emit({"command": "batch status", **info}, as_json)
    if as_json:
        return
    shards, queue = info["shards"], info["queue"]
    files = ", ".join(f"{n:,} {state}" for state, n in info["files"].items()) or "none yet"
    limit = f" of {queue['limit']:,}" if queue["limit"] else ""
    eta = info["eta_hours"]
    print(f"{info['out_dir']}: {info['backend']} {info['model']}, job {info['job_id'][:12]}")
    print(
        f"shards {shards['completed']:,}/{shards['expected'] if shards['expected'] is not None else '?'} written; "
        f"batch files: {files} (round {max(info['rounds'], 1)})"
    )
    print(
        f"requests: {info['answered']:,} answered ({info['failed']:,} failed after the last round, {info['asked_again']:,} "
        f"asked again), about {info['left']:,} left; "
        f"queue {queue['tokens']:,}{limit} tokens; ${info['spent_usd']:.2f} spent"
    )
    print(
        f"rate {info['answers_per_hour']:,.0f} answers/h; "
        + (f"ETA {eta:,.1f} h" if eta is not None else "ETA unknown until a batch is merged")
    )
    for b in info["batches"][:20]:
        print(f"  {b['name']}  {b['state']:<9} {b['status'] or '':<11} {b['requests']:>6} requests  {b['batch_id'] or ''}")
    if len(info["batches"]) > 20:
        print(f"  ... and {len(info['batches']) - 20} more in flight (--json lists them)")


@batch_app.command("cancel", epilog="Example: lenscap batch cancel data/captioned")
def batch_cancel_command(
    out_dir: Annotated[str, typer.Argument(help="The output directory of a batch caption job.")],
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_file: LogFileOpt = None,
) -> None:
    """Cancel the job's running batches. The next caption run merges what they finished (and submits the rest)."""
    from lenscap.caption.backends import backend_class
    from lenscap.caption.batch import cancel_batches
    from lenscap.caption.batch.job import open_state
    from lenscap.core.dataset import Dataset
    from lenscap.core.errors import UsageError
    from lenscap.core.storage import require_local

    common_flags({"log_file": log_file})
    require_local(out_dir, "batch cancel's directory")
    root = Dataset.open(out_dir).work_dir / "batch"
    if not (root / "state.sqlite").exists():
        raise UsageError(f"{out_dir} holds no batch job")
    state = open_state(root)
    try:
        job = state.get("job")
    finally:
        state.close()
    cls = backend_class(job["backend"])
    settings: dict[str, Any] = {"model": job["model"]}
    if {o.name for o in cls.options} >= {"base_url", "api_key_env"}:
        settings |= {"base_url": [job["base_url"]] if job.get("base_url") else [], "api_key_env": job["key_variable"]}
    backend = cls.from_options(settings)
    cancelled = cancel_batches(out_dir, backend)
    _emit({"command": "batch cancel", "out_dir": out_dir, "cancelled": cancelled}, as_json)
    if not as_json:
        print(f"cancelled {len(cancelled)} batch(es): {', '.join(cancelled) or 'none running'}", file=sys.stderr)


@app.command(epilog="Example: lenscap dedup data/captioned data/deduped --phash --max-distance 4")
def dedup(
    in_dir: Annotated[str, typer.Argument(help="Input dataset directory.")],
    out_dir: Annotated[str, typer.Argument(help="Output dataset directory.")],
    exact: Annotated[
        bool, typer.Option("--exact", metavar="", show_default=False, help="Find byte-identical images (SHA-256).")
    ] = False,
    phash: Annotated[
        bool,
        typer.Option(
            "--phash",
            metavar="",
            show_default=False,
            help="Find perceptual duplicates (resized, recompressed): 64-bit pHash within --max-distance bits.",
        ),
    ] = False,
    captions: Annotated[
        bool,
        typer.Option(
            "--captions",
            metavar="",
            show_default=False,
            help="Find samples whose captions are equal after normalising case, punctuation and spacing.",
        ),
    ] = False,
    max_distance: Annotated[
        int | None, typer.Option(help="--phash: largest Hamming distance (bits of 64) between duplicates. [default: 4]")
    ] = None,
    against: Annotated[
        list[str] | None,
        typer.Option(help="An earlier dataset directory (repeatable): drop input samples that duplicate it, never the reverse."),
    ] = None,
    keep: Annotated[
        str, typer.Option(help="Which sample of a cluster to keep: first (input order) or largest (most pixels).")
    ] = "first",
    mark_only: Annotated[
        bool,
        typer.Option(
            "--mark-only", metavar="", show_default=False, help="Remove nothing: only fill dedup_status, dup_of and dup_reason."
        ),
    ] = False,
    bucket_cap: Annotated[
        int, typer.Option(help="--phash: hash buckets larger than this are not expanded (reported instead).")
    ] = 2000,
    memory_limit: Annotated[
        str, typer.Option(help="Memory for the global search (DuckDB); beyond it, it spills to OUT_DIR/.lenscap.")
    ] = "2GB",
    copy_images: CopyImagesOpt = False,
    overwrite: OverwriteOpt = False,
    allow_incomplete: AllowIncompleteOpt = False,
    processes: ProcessesOpt = None,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_file: LogFileOpt = None,
) -> None:
    """Find duplicate images across the whole dataset and keep one of each. Default: --exact --phash. Rerun to resume."""
    _run(dedup_outcome, locals(), as_json, quiet)


@app.command(epilog="Example: lenscap shard data/deduped data/shards --format webdataset --target-size 500MB --shuffle")
def shard(
    in_dir: Annotated[str, typer.Argument(help="Input dataset directory.")],
    out_dir: Annotated[str, typer.Argument(help="Output directory for the training-ready shards.")],
    format: Annotated[
        str,
        typer.Option(
            "--format", help="webdataset (NNNNN.tar) or parquet (data/train-*.parquet, the Hugging Face Image feature)."
        ),
    ] = "webdataset",
    target_size: Annotated[
        str, typer.Option(help="Size each shard is filled to, e.g. 500MB or 1GiB (the last takes the rest).")
    ] = "500MB",
    samples_per_shard: Annotated[
        int | None, typer.Option(help="Cut shards by sample count instead of size.", show_default=False)
    ] = None,
    min_shards: Annotated[
        int,
        typer.Option(
            help="Split a small export into at least this many shards (never more than its samples), so that a loader with that many workers has a shard for each."
        ),
    ] = 8,
    shuffle: Annotated[
        bool,
        typer.Option(
            "--shuffle",
            metavar="",
            show_default=False,
            help="Shuffle samples across the whole dataset (deterministic for a --seed).",
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="--shuffle: the seed; the same seed gives the same order.")] = 0,
    caption_status: Annotated[
        str, typer.Option(help="ok: where captioning ran, export only its successes; any: export every sample with a caption.")
    ] = "ok",
    overwrite: OverwriteOpt = False,
    allow_incomplete: AllowIncompleteOpt = False,
    processes: ProcessesOpt = None,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_file: LogFileOpt = None,
) -> None:
    """Export the kept, successful samples to evenly sized WebDataset or Parquet shards, with a dataset card."""
    _run(shard_outcome, locals(), as_json, quiet)


@app.command(epilog="Example: lenscap report data/captioned --out report.html --sample 24")
def report(
    path: Annotated[str, typer.Argument(help="Dataset directory.")],
    out: Annotated[str | None, typer.Option("--out", help="HTML file to write. [default: DIR/report.html]")] = None,
    sample: Annotated[int, typer.Option("--sample", help="How many sampled images to show.")] = 24,
    seed: Annotated[int, typer.Option(help="Which samples: the same seed shows the same ones.")] = 0,
    png: Annotated[str | None, typer.Option("--png", help="Also write a PNG contact sheet of the sampled images here.")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_file: LogFileOpt = None,
) -> None:
    """Write a self-contained HTML page about a dataset: counts, outcomes, caption lengths, sampled images with their captions."""
    _run(report_outcome, locals(), as_json, quiet)


@app.command(epilog='Example: lenscap audit data/captioned --fail-on "refusal>0.01,words_p50<80,template_top1>0.3"')
def audit(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="DIR, or DIR_A DIR_B to compare two captionings of the same images (rules judge DIR_B).",
            show_default=False,
            metavar="DIR [DIR_B]",
        ),
    ],
    target_words: Annotated[
        int | None,
        typer.Option(
            help="Caption length aimed at; off_length flags captions under half or over 1.5 times it. [default: the prompt preset's: lens 109, short 20]"
        ),
    ] = None,
    script: Annotated[
        str,
        typer.Option(
            help="Expected Unicode script of the captions (Latin, Cyrillic, Han, ...); wrong_script flags captions with under half their letters in it."
        ),
    ] = "Latin",
    fail_on: Annotated[
        str | None,
        typer.Option(
            help='Rules such as "refusal>0.01,words_p50<80,template_top1>0.3": exit 6 when one holds (a cron gate). Measures: every flag as a share, captions, words_mean/p5/p50/p95, template_top1, distinct_1, distinct_2, alt_carry.'
        ),
    ] = None,
    sample: Annotated[
        int, typer.Option(help="How many flagged captions (comparing: differing images) to show for reading.")
    ] = 10,
    seed: Annotated[int, typer.Option(help="Which samples: the same seed shows the same ones.")] = 0,
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            help="Also write DIR with one column per flag (audit_refusal, audit_loop, ..., audit_flagged) into this new dataset, for filter --where or caption --redo.",
        ),
    ] = None,
    memory_limit: Annotated[
        str,
        typer.Option(
            help="Comparing two datasets: memory for joining their rows (DuckDB); beyond it, it spills to a temporary directory."
        ),
    ] = "1GB",
    overwrite: OverwriteOpt = False,
    processes: ProcessesOpt = None,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_file: LogFileOpt = None,
) -> None:
    """Measure caption quality: length, refusals, templated openings, loops, truncations, near-duplicates,
    script, OCR grounding and alt-text carry-over, overall and per model/prompt. Writes nothing into DIR.

    Example: lenscap audit data/captioned --fail-on "refusal>0.01,words_p50<80,template_top1>0.3"
    """
    _run(audit_outcome, locals(), as_json, quiet)


@app.command(epilog="Example: lenscap estimate --images 800M --model gpt-4.1 --batch --prompt alt-aware")
def estimate(
    images: Annotated[
        str | None,
        typer.Option(
            help="How many images to caption: 800000000, 800,000,000, 8e8, 800M, 1.5B, 10k (with --from and --where: counted there).",
            show_default=False,
        ),
    ] = None,
    model: Annotated[str, typer.Option(help="The model (caption's default is the same).")] = "gpt-4.1-mini",
    batch: Annotated[
        bool,
        typer.Option(
            "--batch",
            metavar="",
            show_default=False,
            help="Price as the Batch API (half price), and count its files and wall time.",
        ),
    ] = False,
    detail: Annotated[str, typer.Option(help="Image detail: low, high or auto.")] = "low",
    output_words: Annotated[float, typer.Option(help="Caption length in words (Lens: about 109).")] = 109,
    source_size: Annotated[
        str, typer.Option(help="Typical image size WIDTHxHEIGHT before downscaling to --max-side.")
    ] = "1024x768",
    max_side: Annotated[int, typer.Option(help="Longest side sent to the model (caption's -O max_side).")] = 512,
    prompt: Annotated[str, typer.Option(help="Prompt preset or file, as for caption.")] = "lens",
    rpm: Annotated[float | None, typer.Option(help="Requests per minute you may send.")] = None,
    tpm: Annotated[float | None, typer.Option(help="Tokens per minute you may send.")] = None,
    prices: Annotated[str | None, typer.Option(help="JSON or TOML price file (USD per 1M tokens).")] = None,
    from_dir: Annotated[
        str | None, typer.Option("--from", help="A dataset already captioned with this model: use its measured tokens per image.")
    ] = None,
    where: Annotated[
        str | None,
        typer.Option(
            help="With --from: the images are its rows where this SQL expression over its columns is true (DuckDB), as caption --redo would select them."
        ),
    ] = None,
    sample_from: Annotated[
        str | None,
        typer.Option(
            help="A downloaded dataset: build the batch request lines of its first 200 images as caption would, and use their measured bytes and image tokens."
        ),
    ] = None,
    max_requests_per_file: Annotated[
        int, typer.Option(help="With --batch: requests per batch file, as for caption (the API allows 50,000).")
    ] = 50_000,
    max_file_mb: Annotated[
        float, typer.Option(help="With --batch: MiB per batch file, as for caption (the API allows 200).")
    ] = 200.0,
    max_enqueued_tokens: Annotated[
        str | None,
        typer.Option(
            help="With --batch: your account's batch queue limit in input tokens (such as 2e9 or 2B); sets how many files run at once, for a wall time.",
            show_default=False,
        ),
    ] = None,
    batch_hours: Annotated[
        str, typer.Option(help="With --batch: hours one batch takes to complete, LOW-HIGH or one number.")
    ] = "1-24",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_file: LogFileOpt = None,
    image_size_wxh: Annotated[str | None, _old_name("--image-size", "--source-size")] = None,
) -> None:
    """Tokens, cost and wall time of captioning N images, before spending anything."""
    from lenscap.core.errors import UsageError
    from lenscap.estimate.cost import EstimateRequest, hours_span, parse_count, parse_hours
    from lenscap.estimate.cost import estimate as run_estimate

    source_size = common_flags({"log_file": log_file, "source_size": source_size, "image_size_wxh": image_size_wxh})[
        "source_size"
    ]
    width, x, height = source_size.lower().partition("x")
    if not (x and width.isdigit() and height.isdigit()):
        raise UsageError(f"--source-size takes WIDTHxHEIGHT, not {source_size!r}")
    count = parse_count(images) if images is not None else None
    queue = parse_count(max_enqueued_tokens, "--max-enqueued-tokens") if max_enqueued_tokens is not None else None
    result = run_estimate(
        EstimateRequest(
            count,
            model,
            batch,
            detail,
            output_words,
            int(width),
            int(height),
            max_side,
            prompt,
            rpm=rpm,
            tpm=tpm,
            prices=prices,
            from_dir=from_dir,
            where=where,
            sample_from=sample_from,
            max_requests_per_file=max_requests_per_file,
            max_file_mb=max_file_mb,
            max_enqueued_tokens=queue,
            batch_hours=parse_hours(batch_hours),
        )
    )
    _emit({"command": "estimate", **result, "exit_code": 0}, as_json)
    if as_json:
        return
    per, total = result["per_image"], result["total"]
    if "selected" in result:
        print(f"{result['selected']:,} images of {from_dir} selected by --where")
    print(f"{result.get('selected', count):,} images with {model}, priced {result['priced_as']}")
    print(f"  per image:  {per['input_tokens']:,} input + {per['output_tokens']:,} output tokens ({result['basis']})")
    print(f"  total:      {total['input_tokens']:,} input + {total['output_tokens']:,} output tokens")
    print(f"  cost:       ${total['cost_usd']:,.2f}")
    wall = result["wall_time"]
    if "files" in wall:
        limit = (
            f"bound by {max_file_mb:g} MiB a file, not {max_requests_per_file:,} requests"
            if wall["bound_by"] == "bytes"
            else f"bound by {max_requests_per_file:,} requests a file, not {max_file_mb:g} MiB"
        )
        print(f"  files:      {wall['files']:,} of up to {wall['requests_per_file']:,} requests ({limit})")
        print(f"  line size:  {wall['line_bytes']:,} B a request ({wall['line_bytes_basis']})")
    if "waves" in wall:
        at_once = wall["files_at_once"]
        print(
            f"  wall time:  {wall['human']}: {wall['waves']:,} waves of {at_once:,} file{'s' if at_once != 1 else ''} at once "
            f"(queue limit {queue:,} input tokens), {hours_span(*wall['batch_hours'])} a wave"
        )
    elif "hours" in wall:
        print(f"  wall time:  {wall['human']} at {wall['requests_per_minute']:,} requests/min (limited by {wall['limited_by']})")
    if "note" in wall:
        print(f"  {'note:      ' if 'hours' in wall else 'wall time: '} {wall['note']}")


@app.command(epilog="Example: lenscap inspect data/captioned --json")
def inspect(
    path: Annotated[str, typer.Argument(help="A dataset directory or an export (lenscap shard's output).")],
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_file: LogFileOpt = None,
) -> None:
    """Summarise a dataset directory: shards, samples, statuses, errors, caption lengths, columns, bytes."""
    from lenscap.inspect import inspect_dataset

    common_flags({"log_file": log_file})
    info = inspect_dataset(path)
    _emit({"command": "inspect", **info}, as_json)
    if as_json:
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{info['path']}  (stage: {info['stage'] or 'unknown'})", show_header=False)
    shards = info["shards"]
    expected = f" of {shards['expected']}" if shards["expected"] is not None else ""
    table.add_row(
        "shards",
        f"{shards['complete']} complete{expected}, {shards['incomplete']} incomplete"
        + (f", {shards['damaged']} damaged" if shards.get("damaged") else ""),
    )
    for name, why in info.get("damaged_shards", {}).items():
        table.add_row("damaged", f"shard {name}: {why}; rerun the command that wrote it")
    if info["input_incomplete_shards"]:
        table.add_row(
            "left out", f"input shards {', '.join(info['input_incomplete_shards'])} were incomplete (--allow-incomplete)"
        )
    table.add_row("samples", str(info["samples"]))
    if info.get("export"):
        table.add_row("export", f"{info['export']['format']} ({shards['complete']} shards)")
    for section, outcomes in info["outcomes"].items():  # in pipeline order
        name = {"status": "download status", "filter_reasons": "  dropped by"}.get(section, section)
        table.add_row(name, ", ".join(f"{n} {k}" for k, n in outcomes.items()))
    if info["caption_cost"]:
        c = info["caption_cost"]
        cached = (
            f" (+${c['cached_usd']:.4f} of {c['cached_answers']:,} cached answers, paid by earlier runs)"
            if c.get("cached_answers")
            else ""
        )
        table.add_row(
            "caption cost",
            f"${c['spent_usd']:.4f} spent{cached}; {c['input_tokens']:,} input + {c['output_tokens']:,} output tokens",
        )
    if info["dedup"]:
        d = info["dedup"]
        reasons = ", ".join(f"{n} {r}" for r, n in (d["by_reason"] or {}).items()) or "none"
        table.add_row("duplicates", f"{d['duplicates']} ({reasons}) in {d['clusters']} clusters; {d['report']}")
    cw = info["caption_words"]
    if cw["count"]:
        table.add_row("caption words", f"mean {cw['mean']}, p50 {cw['p50']}, p95 {cw['p95']} ({cw['count']} captions)")
    table.add_row("columns", ", ".join(info["columns"]))
    table.add_row("bytes on disk", f"{info['bytes']['shards']:,} in shards, {info['bytes']['total']:,} in all")
    images = info["images"]
    table.add_row(
        "images",
        "in this directory"
        if images["held"]
        else images["problem"] or f"in {images['location']} (this directory holds rows only)",
    )
    if info["history"]:
        table.add_row("history", " -> ".join(str(h) for h in info["history"]))
    console.print(table)
    for key, title in (("errors", "most common errors"), ("skips", "skipped (not errors)")):
        if info.get(key):
            listing = Table("count", title)
            for message, n in info[key].items():
                listing.add_row(str(n), message)
            console.print(listing)


@app.command(
    "run", epilog="Example: lenscap run lens-recaption --input urls.parquet --work-dir /data/lens --set caption.max_cost=500"
)
def run_command(
    recipe: Annotated[str, typer.Argument(help="A recipe file, or a shipped recipe by name: demo, lens-recaption, refresh.")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="STAGE.OPTION=VALUE: override a stage's option (repeatable); STAGE.OPTION= removes it."),
    ] = None,
    input: Annotated[str | None, typer.Option("--input", help="The recipe's input instead of its own.")] = None,
    work_dir: Annotated[str | None, typer.Option(help="The recipe's work directory instead of its own.")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_file: LogFileOpt = None,
) -> None:
    """Run a whole pipeline from a TOML recipe; rerun to resume (finished stages are skipped)."""
    from lenscap.core.progress import log
    from lenscap.run.recipe import load_recipe, run_recipe

    common_flags({"log_file": log_file})
    summary = run_recipe(load_recipe(recipe, set_, work_dir, input), quiet)
    # What this run spent, all stages together (each caption stage says its own).
    spent = [
        s["summary"]["spent_usd"]
        for s in summary["stages"]
        if not s.get("skipped") and isinstance((s.get("summary") or {}).get("spent_usd"), (int, float))
    ]
    if spent:
        summary["spent_usd"] = sum(spent)
    _emit(summary, as_json)
    if "stopped_at" in summary:
        log(f"run stopped at {summary['stopped_at']} (exit {summary['exit_code']}); fix what it says and rerun to go on")
    raise typer.Exit(summary["exit_code"])


@app.command(epilog="Example: lenscap demo demo-out --images 100")
def demo(
    work_dir: Annotated[
        str, typer.Argument(help="Where the demo writes its URL list, datasets, shards and report.")
    ] = "demo-out",
    images: Annotated[int, typer.Option(help="How many generated images to serve.")] = 100,
    captioner: Annotated[
        str,
        typer.Option(
            help="auto (openai when OPENAI_API_KEY is set, else describe), describe, openai (gpt-4.1-mini, at most $0.10), or fake (a fake API server on loopback)."
        ),
    ] = "auto",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_file: LogFileOpt = None,
) -> None:
    """Run the demo recipe: generated images on loopback, download -> filter -> caption -> dedup -> shard -> report."""
    import contextlib

    from lenscap.demo.command import CAPTIONERS, DEMO_MAX_COST
    from lenscap.inspect import inspect_dataset
    from lenscap.run.recipe import load_recipe, run_recipe

    common_flags({"log_file": log_file})
    if images < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--images")
    if captioner not in CAPTIONERS:
        raise typer.BadParameter(f"must be one of {', '.join(CAPTIONERS)}", param_hint="--captioner")
    if captioner == "auto":
        captioner = "openai" if os.environ.get("OPENAI_API_KEY") else "describe"
    overrides = {
        "describe": [],
        "openai": ["caption.backend=openai", "caption.model=gpt-4.1-mini", f"caption.max_cost={DEMO_MAX_COST}"],
        "fake": ["caption.backend=openai", "caption.model=gpt-4.1-mini", "caption.cache=false"],
    }[captioner]
    with contextlib.ExitStack() as stack:
        if captioner == "fake":
            from lenscap.testing.fake_openai import FakeOpenAI, FakeSettings

            api = stack.enter_context(FakeOpenAI(FakeSettings(rpm=1200, latency_s=0.05)))
            overrides.append(f"caption.base_url={api.base_url}")
        summary = run_recipe(load_recipe("demo", overrides, work_dir, f"@demo:{images}"), quiet)
    exit_code = summary["exit_code"]
    base = summary["work_dir"]
    report_path = os.path.join(base, "report.html")
    if as_json:
        _emit(
            {
                "command": "demo",
                "work_dir": base,
                "captioner": captioner,
                "download": inspect_dataset(os.path.join(base, "download")),
                "captioned": inspect_dataset(os.path.join(base, "caption"))
                if os.path.isdir(os.path.join(base, "caption"))
                else None,
                "deduped": inspect_dataset(os.path.join(base, "dedup")) if os.path.isdir(os.path.join(base, "dedup")) else None,
                "shards": os.path.join(base, "shard"),
                "report": report_path,
                "stages": summary["stages"],
                "exit_code": exit_code,
            },
            True,
        )
        raise typer.Exit(exit_code)
    if exit_code == 0:
        inspect(os.path.join(base, "caption"), as_json=False)
        print(
            f"pipeline: {base}/{{download,filter,caption,dedup}}, training shards in {base}/shard\n"
            f"report:   {report_path}  (open it in a browser)"
        )
        print(
            {
                "describe": "Captions by --backend describe: what the pixels say (size, colours, light, text), not what the image shows.\n"
                "With OPENAI_API_KEY set, the demo captions with gpt-4.1-mini instead (at most $0.10).",
                "fake": "Captions from a fake OpenAI-compatible server on loopback: placeholders; the cost is hypothetical.",
                "openai": "Captions by gpt-4.1-mini through the OpenAI API.",
            }[captioner]
        )
    _emit({"command": "demo", "work_dir": base, "stages": summary["stages"], "exit_code": exit_code}, False)
    raise typer.Exit(exit_code)


# -- what each command does with its flags (the CLI shows it; recipes take the summary) ------------


def download_options(
    *,
    url_col=None,
    caption_col=None,
    extra_cols=None,
    samples_per_shard,
    processes,
    threads,
    image_size,
    resize_mode,
    upscale=False,
    min_side,
    max_aspect,
    max_pixels,
    timeout,
    max_retries,
    user_agent_token="lenscap",
    respect_opt_out=True,
    allow_private_network=False,
    **_other_flags: Any,
) -> Any:
    """download's flags as the stage's options (named as img2dataset names them): the command's, and
    what a recipe checks before its first stage runs."""
    from lenscap.download.command import DownloadOptions

    return DownloadOptions(
        url_col=url_col,
        caption_col=caption_col,
        extra_cols=[c.strip() for c in extra_cols.split(",") if c.strip()] if extra_cols else [],
        samples_per_shard=samples_per_shard,
        processes=all_cores() if processes is None else processes,
        threads=threads,
        image_size=image_size,
        resize_mode=resize_mode,
        upscale=upscale,
        min_image_size=min_side or 0,
        max_aspect_ratio=math.inf if max_aspect is None else max_aspect,
        max_pixels=max_pixels,
        timeout=timeout,
        retries=max_retries,
        user_agent_token=user_agent_token or None,
        respect_opt_out=respect_opt_out,
        allow_private_network=allow_private_network,
    )


def download_outcome(
    *,
    paths,
    url_col,
    caption_col,
    extra_cols,
    samples_per_shard,
    processes,
    threads,
    image_size,
    resize_mode,
    upscale,
    min_side,
    max_aspect,
    max_pixels,
    timeout,
    max_retries,
    user_agent_token,
    respect_opt_out,
    retry_failed,
    allow_private_network,
    overwrite,
    executor,
    ray_address,
    quiet,
) -> Outcome:
    if len(paths) == 2:
        source, out_dir = paths
    elif len(paths) == 1 and retry_failed:
        source, out_dir = None, paths[0]
    else:
        raise typer.BadParameter(
            "expected INPUT and OUT_DIR (or just OUT_DIR with --retry-failed)", param_hint="'[INPUT] OUT_DIR'"
        )
    from lenscap.download.img2dataset_process import Img2datasetProcess

    # Started before the heavy imports below, so that img2dataset's own imports overlap them.
    img2dataset = Img2datasetProcess() if source is not None else None
    try:
        from lenscap import api

        options = download_options(
            url_col=url_col,
            caption_col=caption_col,
            extra_cols=extra_cols,
            samples_per_shard=samples_per_shard,
            processes=processes,
            threads=threads,
            image_size=image_size,
            resize_mode=resize_mode,
            upscale=upscale,
            min_side=min_side,
            max_aspect=max_aspect,
            max_pixels=max_pixels,
            timeout=timeout,
            max_retries=max_retries,
            user_agent_token=user_agent_token,
            respect_opt_out=respect_opt_out,
            allow_private_network=allow_private_network,
        )
        options.ray_address = _ray_cluster(executor, processes, ray_address)
        result = api.download(
            source, out_dir, options, retry_failed=retry_failed, overwrite=overwrite, quiet=quiet, img2dataset=img2dataset
        )
    finally:
        if img2dataset is not None:
            img2dataset.stop()
    ok = result.status.get("success", 0)
    return Outcome(
        {"command": "download", **asdict(result), "exit_code": result.exit_code},
        [f"{result.out_dir}: {result.shards_completed}/{result.shards_total} shards, {result.samples} samples, {ok} downloaded"],
    )


def caption_outcome(
    *,
    in_dir,
    out_dir,
    backend,
    prompt,
    hints,
    max_cost,
    processes,
    cache,
    no_cache,
    option,
    model,
    base_url,
    api_key_env,
    max_tokens,
    temperature,
    detail,
    max_side,
    rpm,
    tpm,
    concurrency,
    prices,
    timeout,
    max_retries,
    outage_timeout,
    wait,
    poll_interval,
    max_requests_per_file,
    max_file_mb,
    max_enqueued_tokens,
    device,
    dtype,
    batch_size,
    copy_images,
    overwrite,
    allow_incomplete,
    retry_errors,
    redo,
    executor,
    ray_address,
    quiet,
) -> Outcome:
    import warnings

    from lenscap import api
    from lenscap.caption.backends.base import OptionRenamed
    from lenscap.caption.prompts import load_prompt
    from lenscap.core.errors import BudgetReached, UsageError
    from lenscap.core.progress import make_progress

    if max_cost is not None and max_cost <= 0:
        raise UsageError(f"--max-cost must be positive, not {max_cost}")
    flags = {
        "model": model,
        "base_url": base_url,
        "api_key_env": api_key_env,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "detail": detail,
        "max_side": max_side,
        "rpm": rpm,
        "tpm": tpm,
        "concurrency": concurrency,
        "prices": prices,
        "timeout": timeout,
        "max_retries": max_retries,
        "outage_timeout": outage_timeout,
        "wait": wait,
        "poll_interval": poll_interval,
        "max_requests_per_file": max_requests_per_file,
        "max_file_mb": max_file_mb,
        "max_enqueued_tokens": max_enqueued_tokens,
        "device": device,
        "dtype": dtype,
        "batch_size": batch_size,
    }
    assert set(flags) == CAPTION_FLAGS
    values: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    for item in option or []:
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise UsageError(f"-O/--option takes NAME=VALUE, not {item!r}")
        values[name.strip().replace("-", "_")] = value
    hint_names = _parse_hints(hints)
    load_prompt(prompt)  # a missing prompt file fails before the backend is built
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always", OptionRenamed)
        caption_backend = api.backend(backend, **values)
    for w in said:  # an option's old name: a note, as for the flags' old names
        if issubclass(w.category, OptionRenamed):
            print(f"lenscap: note: {w.message}", file=sys.stderr)
    if processes is None:  # building batch request lines is CPU work; online and local captioning is not
        processes = all_cores() if caption_backend.runs_as_batch else 1
    runner = _executor(executor, processes, ray_address)
    if caption_backend.priced and not caption_backend.has_price():
        if max_cost is not None:
            raise UsageError(f"--max-cost needs a price for model {caption_backend.model!r}: give one with --prices FILE")
        print(
            f"lenscap: note: no price known for model {caption_backend.model!r}; cost columns stay empty (see --prices)",
            file=sys.stderr,
        )
    try:
        result = api.caption(
            in_dir,
            out_dir,
            caption_backend,
            prompt,
            hints=hint_names,
            max_cost=max_cost,
            cache=not no_cache,
            cache_dir=cache,
            copy_images=copy_images,
            overwrite=overwrite,
            allow_incomplete=allow_incomplete,
            retry_errors=retry_errors,
            redo=redo,
            processes=processes,
            executor=runner,
            progress=make_progress("caption", quiet),
        )
    except BudgetReached as e:
        e.summary = {
            "command": "caption",
            "out_dir": out_dir,
            "spent_usd": e.spent_usd or 0.0,
            "exit_code": e.exit_code,
            "reason": str(e),
        }
        raise
    if caption_backend.runs_as_batch:
        batch = result
        return Outcome(
            {
                "command": "caption",
                "backend": backend,
                **asdict(batch),
                "caption_status": batch.counts.get("caption_status", {}),
                "exit_code": batch.exit_code,
            },
            _say_batch(batch, caption_backend, out_dir),
        )
    outcomes = result.counts.get("caption_status", {})
    summary = {"command": "caption", **asdict(result), "caption_status": outcomes, "exit_code": result.exit_code}
    parts = ", ".join(f"{n} {k}" for k, n in outcomes.items())
    # A model without a known price has spent something unknown, not $0.
    spent = f"${result.spent_usd:.4f} spent" if not caption_backend.priced or caption_backend.has_price() else "cost unknown"
    summary["cost_known"] = spent != "cost unknown"
    return Outcome(
        summary,
        [
            f"{result.out_dir}: {result.shards_completed}/{result.shards_total} shards, {result.samples} "
            f"samples ({parts}); {spent}"
        ],
    )


def filter_outcome(
    *,
    in_dir,
    out_dir,
    min_side,
    max_aspect,
    min_bytes,
    caption_min_words,
    caption_max_words,
    status,
    where,
    blocklist,
    annotate,
    min_sharpness,
    max_uniformity,
    max_text_area,
    max_faces,
    max_nsfw,
    min_clip_score,
    clip_model,
    threshold,
    dry_run,
    copy_images,
    overwrite,
    allow_incomplete,
    processes,
    executor,
    ray_address,
    quiet,
) -> Outcome:
    from lenscap import api
    from lenscap.core.errors import UsageError
    from lenscap.core.progress import make_progress
    from lenscap.filter.annotators import annotator_class
    from lenscap.filter.stage import load_blocklist

    processes = all_cores() if processes is None else processes
    runner = _executor(executor, processes, ray_address)
    thresholds: dict[str, float | None] = {}
    for name in (annotate or "").split(","):
        if name.strip():
            thresholds[name.strip()] = None
    for name, value in (
        ("blur", min_sharpness),
        ("uniform", max_uniformity),
        ("ocr", max_text_area),
        ("faces", max_faces),
        ("nsfw", max_nsfw),
        ("clip", min_clip_score),
    ):
        if value is not None:
            thresholds[name] = float(value)
    for item in threshold or []:
        name, eq, value = item.partition("=")
        try:
            thresholds[name.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--threshold takes NAME=NUMBER, not {item!r}") from None
    if clip_model is not None:
        thresholds.setdefault("clip", None)
    annotators = []
    for name, value in thresholds.items():
        cls = annotator_class(name)
        annotators.append(cls(value, model=clip_model) if name == "clip" else cls(value))  # type: ignore[call-arg]
    rules = api.FilterRules(min_side, max_aspect, min_bytes, caption_min_words, caption_max_words, status, where)
    blocked = load_blocklist(blocklist) if blocklist else frozenset()
    if dry_run:
        counts = api.filter_counts(in_dir, rules, annotators, blocked)
        summary = {
            "command": "filter",
            "dry_run": True,
            "in_dir": in_dir,
            "samples": sum(counts.values()),
            "kept": counts.get("kept", 0),
            "reasons": dict(counts.most_common()),
            "exit_code": 0,
        }
        stdout = [f"{in_dir}: {summary['samples']} samples, {summary['kept']} would be kept"] + [
            f"  {n:>8}  dropped: {reason}" if reason != "error" else f"  {n:>8}  unreadable"
            for reason, n in counts.most_common()
            if reason != "kept"
        ]
        return Outcome(summary, stdout=stdout)
    result = api.filter(
        in_dir,
        out_dir,
        rules,
        annotators,
        blocked,
        copy_images=copy_images,
        overwrite=overwrite,
        allow_incomplete=allow_incomplete,
        executor=runner,
        progress=make_progress("filter", quiet),
    )
    dropped = ", ".join(f"{n} {r}" for r, n in result.reasons.items() if r != "kept") or "none"
    code = EXIT_EMPTY if result.exit_code == 0 and result.kept == 0 else result.exit_code
    lines = [f"{result.out_dir}: {result.samples} samples, {result.kept} kept; dropped: {dropped}"]
    if code == EXIT_EMPTY:
        return Outcome(
            {"command": "filter", **asdict(result), "exit_code": code},
            notes=[f"lenscap: warning: {lines[0]}: nothing left (exit code {EXIT_EMPTY})"],
        )
    return Outcome({"command": "filter", **asdict(result), "exit_code": code}, lines)


def dedup_outcome(
    *,
    in_dir,
    out_dir,
    exact,
    phash,
    captions,
    max_distance,
    against,
    keep,
    mark_only,
    bucket_cap,
    memory_limit,
    copy_images,
    overwrite,
    allow_incomplete,
    processes,
    executor,
    ray_address,
    quiet,
) -> Outcome:
    from lenscap import api
    from lenscap.core.errors import UsageError
    from lenscap.dedup.search import DedupOptions

    processes = all_cores() if processes is None else processes
    runner = _executor(executor, processes, ray_address)
    if not (exact or phash or captions):
        exact = phash = True
    if max_distance is not None and not phash:
        raise UsageError("--max-distance applies to --phash, which is not selected")
    options = DedupOptions(
        exact=exact,
        phash=phash,
        captions=captions,
        max_distance=4 if max_distance is None else max_distance,
        keep=keep,
        mark_only=mark_only,
        bucket_cap=bucket_cap,
        memory_limit=memory_limit,
        threads=processes,
    )
    result = api.dedup(
        in_dir,
        out_dir,
        options,
        against or [],
        copy_images=copy_images,
        overwrite=overwrite,
        allow_incomplete=allow_incomplete,
        processes=processes,
        executor=runner,
        quiet=quiet,
    )
    report = result.report
    summary = {
        "command": "dedup",
        **asdict(result),
        "duplicates": report.get("duplicates"),
        "duplicates_by_reason": report.get("duplicates_by_reason"),
        "clusters": report.get("clusters"),
        "report": os.path.join(result.out_dir, "dedup", "report.json") if report else None,
        "hashing_failed": {k: {str(i): m for i, m in v.items()} for k, v in result.hashing_failed.items()},
        "exit_code": result.exit_code,
    }
    if result.hashing_failed:
        return Outcome(
            summary,
            notes=[
                f"lenscap: dedup: {len(shards)} shard(s) of {label} could not be hashed; nothing written yet; rerun to resume"
                for label, shards in result.hashing_failed.items()
            ],
        )
    reasons = ", ".join(f"{n} {r}" for r, n in (report.get("duplicates_by_reason") or {}).items()) or "none"
    return Outcome(
        summary,
        [
            f"{result.out_dir}: {result.samples} samples, {report['duplicates']} duplicates "
            f"{'marked' if mark_only else 'removed'} ({reasons}) in {report['clusters']} clusters; "
            f"report: {summary['report']}"
        ],
    )


def shard_outcome(
    *,
    in_dir,
    out_dir,
    format,
    target_size,
    samples_per_shard,
    min_shards,
    shuffle,
    seed,
    caption_status,
    overwrite,
    allow_incomplete,
    processes,
    executor,
    ray_address,
    quiet,
) -> Outcome:
    from lenscap import api
    from lenscap.shard.command import ExportOptions, parse_size

    processes = all_cores() if processes is None else processes
    runner = _executor(executor, processes, ray_address)
    options = ExportOptions(
        format=format,
        target_bytes=None if samples_per_shard is not None else parse_size(target_size),
        samples_per_shard=samples_per_shard,
        min_shards=min_shards,
        shuffle=shuffle,
        seed=seed,
        caption_status=caption_status,
    )
    result = api.shard(
        in_dir,
        out_dir,
        options,
        overwrite=overwrite,
        allow_incomplete=allow_incomplete,
        processes=processes,
        executor=runner,
        quiet=quiet,
    )
    summary = {"command": "shard", **asdict(result), "shards": result.shards_total, "exit_code": result.exit_code}
    if result.failed_shards:
        return Outcome(
            summary,
            notes=[
                f"lenscap: shard: {len(result.failed_shards)} input shard(s) could not be indexed; "
                "nothing exported yet; rerun to resume"
            ],
        )
    left = ", ".join(f"{n} {r}" for r, n in result.left_out.items()) or "none"
    if result.exit_code == EXIT_EMPTY:
        return Outcome(
            summary,
            notes=[
                f"lenscap: warning: {result.out_dir} holds 0 samples (left out: {left}); nothing to train on (exit code {EXIT_EMPTY})"
            ],
        )
    return Outcome(
        summary,
        [
            f"{result.out_dir}: {result.samples} samples in {result.shards_total} {result.format} shards "
            f"({result.bytes:,} bytes); left out: {left}"
        ],
    )


def report_outcome(*, path, out, sample, seed, png, quiet) -> Outcome:
    from lenscap.core.errors import UsageError
    from lenscap.report.html import write_report

    if sample < 0:
        raise UsageError(f"--sample must be 0 or more, not {sample}")
    from lenscap.core.storage import require_local

    for target, what in ((out, "report's --out"), (png, "report's --png")):
        require_local(target, what)
        if target is not None and not os.path.isdir(os.path.dirname(os.path.abspath(target))):
            raise UsageError(f"cannot write {target}: its directory does not exist")
    written = write_report(path, out, sample, seed, png)
    return Outcome(
        {"command": "report", **written, "exit_code": 0},
        [f"report: {written['html']}" + (f", contact sheet: {written['png']}" if "png" in written else "")],
    )


def audit_outcome(
    *, paths, target_words, script, fail_on, sample, seed, out, memory_limit, overwrite, processes, executor, ray_address, quiet
) -> Outcome:
    from lenscap import api
    from lenscap.audit.render import audit_lines
    from lenscap.core.errors import UsageError
    from lenscap.core.progress import make_progress

    if len(paths) > 2:
        raise UsageError(f"audit takes DIR or DIR_A DIR_B, not {len(paths)} directories")
    if out is not None and len(paths) == 2:
        raise UsageError("--out writes one audited dataset: give it with one DIR")
    processes = all_cores() if processes is None else processes
    runner = _executor(executor, processes, ray_address)
    options = api.AuditOptions(
        target_words=target_words, script=script, sample=sample, seed=seed, fail_on=fail_on, memory_limit=memory_limit
    )
    result = api.audit(
        paths[0],
        options,
        compare_with=paths[1] if len(paths) == 2 else None,
        out=out,
        executor=runner,
        progress=make_progress("audit", quiet),
        overwrite=overwrite,
    )
    notes = [f"lenscap: audit: rule broken: {r['rule']} (measured {r['value']})" for r in result["rules"] if r["broken"]]
    return Outcome(result, notes=notes, stdout=audit_lines(result))


def _taking_common_flags(outcome_of: Callable[..., Outcome]) -> Callable[..., Outcome]:
    """``outcome_of`` for a command's whole parsed flags, as a recipe parses them (old names, --log-file)."""

    def outcome(**flags: Any) -> Outcome:
        return outcome_of(**common_flags(flags))

    return outcome


OUTCOMES: dict[str, Callable[..., Outcome]] = {
    name: _taking_common_flags(f)
    for name, f in {
        "download": download_outcome,
        "filter": filter_outcome,
        "caption": caption_outcome,
        "dedup": dedup_outcome,
        "shard": shard_outcome,
        "report": report_outcome,
        "audit": audit_outcome,
    }.items()
}


def _wants_json(argv: list[str]) -> bool:
    return "--json" in argv[: argv.index("--") if "--" in argv else len(argv)]


def _fail(message: str, code: int, as_json: bool, summary: dict[str, Any] | None = None) -> int:
    """A run that ended in an error: one line on stderr and in the log, and with --json the one object on stdout."""
    from lenscap.core.progress import log

    print(f"lenscap: {message}", file=sys.stderr)
    log(message, to_stderr=False)
    if as_json:  # the object says what went wrong; "error: " is for people reading stderr
        _emit({**(summary or {}), "exit_code": code, "error": message.removeprefix("error: ")}, True)
    return code


def _last_line(argv: list[str], code: int, seconds: float) -> str:
    """The log's last line for a run: how it ended, what it produced, how long it took, what it cost."""
    names = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    command = next((a for a in argv if a in names), "lenscap")
    s = _last_summary
    meaning = EXIT_MEANINGS.get(code)
    parts = [f"{command}: exit {code}" + (f" ({meaning})" if meaning else "")]
    where = s.get("out_dir") or s.get("path") or s.get("release") or s.get("html") or s.get("work_dir")
    if s.get("samples") is not None and where:
        parts.append(f"{s['samples']:,} samples in {where}")
    elif where:
        parts.append(f"wrote {where}")
    parts.append(f"{seconds:.1f} s")
    spent = s.get("spent_usd")
    if isinstance(spent, (int, float)):
        parts.append(f"${spent:.4f} spent")
    return "; ".join(parts)


def main() -> None:
    """Entry point: user mistakes become one line on stderr and exit code 2, never a traceback. With
    --json, stdout holds exactly one object however the command ends; with --log-file, the log ends
    with one line saying how it ended."""
    import time

    from lenscap.core.progress import capture_warnings, log, log_file

    capture_warnings()  # a library's warnings go to the --log-file, never to stderr
    argv = sys.argv[1:]
    as_json = _wants_json(argv)
    started = time.monotonic()
    _last_summary.clear()
    try:
        # Outside standalone mode Typer returns a command's exit code instead of exiting; it turns
        # Ctrl-C into 130 the same way.
        code = app(standalone_mode=False)
    except LenscapError as e:
        code = _fail(f"error: {e}", e.exit_code, as_json, getattr(e, "summary", None))
    except typer.Exit as e:
        code = e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except Exception as e:  # noqa: BLE001
        # Typer's (vendored click) parse errors: bad flags and values, usage mistakes.
        if hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int):
            code = _fail(f"error: {e.format_message()}", 2 if e.exit_code in (1, 2) else e.exit_code, as_json)
        else:
            if os.environ.get("LENSCAP_DEBUG"):
                raise
            code = _fail(f"internal error: {type(e).__name__}: {e} (set LENSCAP_DEBUG=1 for a traceback)", 3, as_json)
    code = code if isinstance(code, int) else 0
    if code == 130:
        _fail("interrupted; rerun the same command to resume", 130, as_json)
    if log_file() is not None:
        log(_last_line(argv, code, time.monotonic() - started), to_stderr=False)
    sys.exit(code)


if __name__ == "__main__":
    main()
