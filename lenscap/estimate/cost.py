"""``lenscap estimate``: tokens, cost and wall time of a captioning job, before anyone pays for it.

Per image, the input is the prompt (system and instruction, with an alt-text of ``alt_words`` words
when the prompt uses one) plus the image at ``max_side`` pixels, counted by the same functions that
the caption stage's budget and rate limiter use (``captioning.pricing``); the output is
``output_words`` words at 4/3 tokens a word (OpenAI's rule of thumb for English). With ``from_dir``,
the per-image means are measured instead: the provider-reported token counts of a dataset already
captioned with that model; with ``where`` too, the number of images is that of its rows where the
SQL expression is true (the price of a ``caption --redo`` with it). With ``sample_from``, the request
lines of up to ``SAMPLE_IMAGES`` downloaded images are built as the batch packer builds them, and
their mean size and image tokens replace the assumed ones.

Wall time: online, the requests a minute that both ``rpm`` and ``tpm`` allow; without either, those of
the model at OpenAI's usage tier 1 (``captioning.pricing.tier_limits``; the gpt-4.1 figures for a model
not in that table), named in the result's ``tier`` and ``note``. As batches, the files
the packer would write (each bounded by ``max_requests_per_file`` requests and ``max_file_mib`` MiB,
whichever binds first), run in waves of as many files as the account's batch queue limit
(``max_enqueued_tokens``, input tokens) holds, each wave taking ``batch_hours``.
"""

from __future__ import annotations

import json
import math
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from lenscap.caption.backends.openai_batch import BatchFilesBackend
from lenscap.caption.backends.openai_chat import DEFAULT_MODEL
from lenscap.caption.image_prep import UnreadableImage
from lenscap.caption.pricing import (
    DEFAULT_PRICES,
    PRICE_FILE_FORMAT,
    PriceTable,
    RateLimits,
    image_tokens,
    text_tokens,
    tier_limits,
)
from lenscap.caption.prompts import load_prompt
from lenscap.caption.stage import CaptionStage
from lenscap.core.dataset import Dataset
from lenscap.core.errors import UsageError
from lenscap.core.layout import shard_name
from lenscap.core.sql import SqlLimits, check_condition, rows_where
from lenscap.estimate.compare import COMPARED_MODELS, compare
from lenscap.estimate.options import BATCH_MAX_REQUESTS, BATCH_WINDOW_H, EstimateOptions, hours_span, human_hours

__all__ = [
    "estimate",
    "TOKENS_PER_WORD",
    "BATCH_MAX_REQUESTS",
    "SAMPLE_IMAGES",
    "DEFAULT_MODEL",
    "FALLBACK_LIMITS_MODEL",
]

TOKENS_PER_WORD = 4 / 3
SAMPLE_IMAGES = 200
# docs/scale.md [M]: a request line of a natural photo sent at max side 512 is 87,488 B on average,
# of which about 1,410 B are the prompt and the JSON around the image.
ASSUMED_LINE_BYTES = 87_488
ASSUMED_TEXT_BYTES = 1_410
ASSUMED_AT_SIDE = 512
# A model without published tier limits is timed at this model's: the tightest in the table.
FALLBACK_LIMITS_MODEL = "gpt-4.1"

# Words of alt-text assumed in a prompt that takes one.
ALT_WORDS = 12


def _measured(path: str, model: str) -> tuple[float, float, int]:
    """Mean input and output tokens per caption in a captioned dataset (its uncached successes)."""
    import duckdb  # DuckDB takes a quarter second to import: only where a query runs

    ds = Dataset.open(path)  # a local path: EstimateOptions.from_dir
    files = [str(ds.parquet_path(i)) for i in ds.completed_ids()]
    if not files:
        raise UsageError(f"{path} has no complete shards to measure")
    con = duckdb.connect()
    try:
        names = {r[0] for r in con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [files[:1]]).fetchall()}
        if not {"caption_input_tokens", "caption_output_tokens", "caption_status"} <= names:
            raise UsageError(f"{path} was not captioned by an API backend (no caption_input_tokens column)")
        cached = "AND NOT coalesce(caption_cached, false)" if "caption_cached" in names else ""
        model_filter = "AND caption_model = $model" if "caption_model" in names else ""
        row = con.execute(
            f"""SELECT avg(caption_input_tokens), avg(caption_output_tokens), count(*) FROM read_parquet($files)
                              WHERE caption_status = 'ok' AND caption_input_tokens IS NOT NULL {cached} {model_filter}""",
            {"files": files, "model": model} if model_filter else {"files": files},
        ).fetchall()[0]
    finally:
        con.close()
    if not row[2]:
        raise UsageError(f"{path} has no successful, uncached {model} captions with token counts to measure")
    return float(row[0]), float(row[1]), int(row[2])


def _selected(path: str, where: str) -> int:
    """The number of samples with an image in a dataset's complete shards where ``where`` is true. The user's SQL runs
    on a sandboxed connection that sees one shard's rows, read here, and nothing else."""
    import duckdb  # DuckDB takes a quarter second to import: only where a query runs

    ds = Dataset.open(path)
    shards = ds.completed_ids()
    if not shards:
        raise UsageError(f"{path} has no complete shards to select from")
    schema = ds.read_schema(shards[0])
    limits = SqlLimits.from_env()
    condition = check_condition(where, "--where", schema, ds.location, limits)
    if "status" in schema.names:  # a selected sample without an image is asked nothing by a redo: not priced
        condition = f"{condition} AND status = 'success'"
    count = 0
    for shard_id in shards:
        try:
            what = f"--where on shard {shard_name(shard_id)} of {ds.location}"
            count += rows_where(ds.read_table(shard_id), condition, what, "count(*)", limits)[0][0]
        except duckdb.Error as e:
            raise UsageError(f"--where cannot run on {ds.location}: {str(e).splitlines()[0]}") from None
    return int(count)


@dataclass(frozen=True)
class _Lines:
    """What the batch request lines of a sample of real images measured."""

    line_bytes: float
    image_tokens: float
    images: int


def _sampled_lines(req: EstimateOptions) -> _Lines:
    """Mean request-line bytes and image tokens of the first ``SAMPLE_IMAGES`` downloaded images of
    ``sample_from`` (shard order, so the same dataset always gives the same figures), each request
    built by the caption stage and the batch backend exactly as the packer builds it."""
    assert req.sample_from is not None
    # batch-files needs no key and no server, and builds the same bodies as openai-batch.
    backend = BatchFilesBackend.from_options({"model": req.model, "detail": req.detail, "max_side": req.max_side})
    stage = CaptionStage(backend, load_prompt(req.prompt))
    ds = Dataset.open(req.sample_from)
    shards = ds.completed_ids()
    if not shards:
        raise UsageError(f"--sample-from {req.sample_from} has no complete shards to sample")
    sizes: list[int] = []
    tokens: list[int] = []
    for shard_id in shards:
        with closing(ds.iter_samples(shard_id)) as samples:
            for sample in samples:
                if len(sizes) >= SAMPLE_IMAGES:
                    break
                if not sample.ok:
                    continue
                request = stage.request_for(sample)
                try:
                    body, estimate = backend.build_body(request)
                except UnreadableImage:
                    continue  # the packer records these as errors and writes no line
                # The line as the batch packer writes it (lenscap.caption.batch.prepare).
                line = (
                    json.dumps(
                        {
                            "custom_id": f"{shard_name(shard_id)}/{sample.key}",
                            "method": "POST",
                            "url": "/v1/chat/completions",
                            "body": body,
                        }
                    ).encode()
                    + b"\n"
                )
                text = text_tokens(request.instruction) + (text_tokens(request.system) if request.system else 0)
                sizes.append(len(line))
                tokens.append(estimate - text)
        if len(sizes) >= SAMPLE_IMAGES:
            break
    if not sizes:
        raise UsageError(f"--sample-from {req.sample_from} has no readable downloaded images to measure")
    return _Lines(sum(sizes) / len(sizes), sum(tokens) / len(tokens), len(sizes))


def _assumed_line_bytes(req: EstimateOptions) -> tuple[float, str]:
    """docs/scale.md's measured line, its image part scaled by the pixels actually sent."""
    side = min(req.max_side, max(req.size))  # smaller images are sent as they are, never enlarged
    line = ASSUMED_TEXT_BYTES + (ASSUMED_LINE_BYTES - ASSUMED_TEXT_BYTES) * (side / ASSUMED_AT_SIDE) ** 2
    scaled = f", the image part scaled to max side {side}" if side != ASSUMED_AT_SIDE else ""
    return line, (
        f"assumed: {ASSUMED_LINE_BYTES:,} B a line for natural photos at max side {ASSUMED_AT_SIDE}{scaled}; "
        "measure yours with --sample-from DIR"
    )


def _batch_wall_time(req: EstimateOptions, images: int, input_per: float, line_bytes: float, line_basis: str) -> dict[str, Any]:
    """Files as the packer cuts them (requests or bytes, whichever binds first), and waves of files
    within the account's batch queue limit, each taking ``batch_hours``."""
    by_bytes = math.floor(req.max_file_bytes / line_bytes)
    if by_bytes < 1:
        raise UsageError(f"a request line of about {line_bytes:,.0f} B does not fit in --max-file-mib {req.max_file_mib:g}")
    per_file = min(req.max_requests_per_file, by_bytes)
    bound_by = "requests" if req.max_requests_per_file <= by_bytes else "bytes"
    files = math.ceil(images / per_file)
    low, high = req.hours
    wall: dict[str, Any] = {
        "files": files,
        "batches": files,
        "requests_per_file": per_file,
        "bound_by": bound_by,
        "line_bytes": round(line_bytes),
        "line_bytes_basis": line_basis,
        "window_hours": BATCH_WINDOW_H,
        "batch_hours": [low, high],
    }
    if req.queue_tokens is None:
        wall["note"] = (
            f"each batch completes in {hours_span(low, high)}; your account's batch queue limit (enqueued input tokens) "
            "decides how many run at once: give --max-enqueued-tokens for a wall time"
        )
        return wall
    tokens_per_file = per_file * input_per
    at_once = max(1, math.floor(req.queue_tokens / tokens_per_file))
    waves = math.ceil(files / at_once)
    wall |= {
        "tokens_per_file": round(tokens_per_file),
        "files_at_once": at_once,
        "waves": waves,
        "hours": [waves * low, waves * high],
        "human": human_hours(waves * low) if low == high else f"{human_hours(waves * low)} to {human_hours(waves * high)}",
    }
    if tokens_per_file > req.queue_tokens:
        wall["note"] = (
            f"one file holds about {tokens_per_file:,.0f} input tokens, more than the queue limit "
            f"{req.queue_tokens:,}: lower --max-requests-per-file"
        )
    return wall


def estimate(req: EstimateOptions) -> dict[str, Any]:
    if req.compare:
        lines = _sampled_lines(req) if req.sample_from else None
        line_bytes = lines.line_bytes if lines is not None else _assumed_line_bytes(req)[0]
        models = tuple(req.compare_model or COMPARED_MODELS)
        return {"request": _request(req), **compare(req, models, line_bytes, TOKENS_PER_WORD)}
    table = PriceTable.load(req.prices)
    if table.price(req.model) is None:
        raise UsageError(
            f"no price known for model {req.model!r} (known: {', '.join(DEFAULT_PRICES)}): give --prices FILE, "
            f"a file of {PRICE_FILE_FORMAT}"
        )
    images = req.count
    lines = _sampled_lines(req) if req.sample_from else None
    if req.from_dir:
        input_per, output_per, measured = _measured(req.from_dir, req.model)
        if req.where is not None:
            images = _selected(req.from_dir, req.where)
        basis = f"measured on {measured:,} captions in {req.from_dir}"
    else:
        prompt = load_prompt(req.prompt)
        instruction = prompt.render(" ".join(["word"] * ALT_WORDS))
        text = text_tokens(instruction) + (text_tokens(prompt.system) if prompt.system else 0)
        assumed = f"prompt {req.prompt!r} ({text} tokens), {req.output_words:g} words out"
        if lines is not None:
            image: float = lines.image_tokens
            basis = (
                f"measured: {image:,.1f} image tokens on {lines.images:,} images of {req.sample_from} sent at max side "
                f"{req.max_side}, detail {req.detail}; assumed: {assumed}"
            )
        else:
            scale = min(1.0, req.max_side / max(req.size))
            fitted = (max(1, round(req.size[0] * scale)), max(1, round(req.size[1] * scale)))
            image = image_tokens(req.model, *fitted, req.detail)
            basis = (
                f"assumed: {req.source_size} images sent at {fitted[0]}x{fitted[1]}, detail {req.detail} "
                f"({image} image tokens), {assumed}"
            )
        input_per, output_per = float(image + text), float(math.ceil(req.output_words * TOKENS_PER_WORD))
    assert images is not None
    total_in, total_out = input_per * images, output_per * images
    cost = table.cost(req.model, round(total_in), round(total_out), batch=req.batch)
    out: dict[str, Any] = {
        "request": _request(req),
        "basis": basis,
        "per_image": {"input_tokens": round(input_per, 1), "output_tokens": round(output_per, 1)},
        "total": {"input_tokens": round(total_in), "output_tokens": round(total_out), "cost_usd": round(cost or 0, 2)},
        "priced_as": "batch (half price)" if req.batch else "online",
    }
    if req.where is not None:
        out["selected"] = images
    if req.batch:
        if lines is not None:
            line_bytes, line_basis = lines.line_bytes, f"measured on {lines.images:,} images in {req.sample_from}"
        else:
            line_bytes, line_basis = _assumed_line_bytes(req)
        out["wall_time"] = _batch_wall_time(req, images, input_per, line_bytes, line_basis)
    elif req.rpm or req.tpm:
        out["wall_time"] = _online_wall_time(images, (input_per, output_per), req.rpm, req.tpm)
    else:
        out["wall_time"] = _online_wall_time(images, (input_per, output_per), *_assumed_limits(req.model))
    return out


def _request(req: EstimateOptions) -> dict[str, Any]:
    """What was estimated, the values parsed (the ``request`` of the result)."""
    width, height = req.size
    values = {
        "images": req.count,
        "model": req.model,
        "batch": req.batch,
        "detail": req.detail,
        "output_words": req.output_words,
        "width": width,
        "height": height,
        "max_side": req.max_side,
        "prompt": req.prompt,
        "alt_words": ALT_WORDS,
        "rpm": req.rpm,
        "tpm": req.tpm,
        "prices": req.prices,
        "from_dir": req.from_dir,
        "where": req.where,
        "sample_from": req.sample_from,
        "max_requests_per_file": req.max_requests_per_file,
        "max_file_mib": req.max_file_mib,
        "max_enqueued_tokens": req.queue_tokens,
        "batch_hours": req.hours,
        "compare": req.compare or None,
        "compare_models": req.compare_model,
    }
    return {k: v for k, v in values.items() if v is not None}


def _assumed_limits(model: str) -> tuple[float, float, RateLimits, str]:
    """The default tier's limits for ``model`` (or, unknown there, the tightest known), and the note that says so."""
    limits = tier_limits(model)
    known = limits is not None
    if limits is None:
        limits = tier_limits(FALLBACK_LIMITS_MODEL)
        assert limits is not None
    tokens = (
        f"{limits.tpm:,.0f} TPM"
        if limits.output_tpm is None
        else (f"{limits.tpm:,.0f} input and {limits.output_tpm:,.0f} output TPM")
    )
    note = f"at {limits.tier} limits ({limits.rpm:,.0f} RPM, {tokens} for {limits.model}"
    note += ")" if known else f"; {model}'s are not known)"
    return limits.rpm, limits.tpm, limits, note + "; give --rpm/--tpm for yours"


def _online_wall_time(
    images: int,
    tokens: tuple[float, float],
    rpm: float | None,
    tpm: float | None,
    limits: RateLimits | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    """The requests a minute that every limit allows (a limit not given does not bind), and the hours they
    take. ``tokens``: (input, output) a request; a tier that limits output tokens apart (Anthropic's)
    counts input tokens alone against ``tpm``."""
    apart = limits is not None and limits.output_tpm is not None
    per_tokens = (tpm / (tokens[0] if apart else sum(tokens))) if tpm else math.inf
    per_output = limits.output_tpm / tokens[1] if apart and limits and limits.output_tpm and tokens[1] else math.inf
    per_minute = min(rpm or math.inf, per_tokens, per_output)
    hours = images / per_minute / 60
    wall: dict[str, Any] = {
        "requests_per_minute": round(per_minute, 1),
        "hours": round(hours, 2),
        "human": human_hours(hours),
        "limited_by": "rpm" if rpm and per_minute == rpm else ("output tpm" if per_minute == per_output else "tpm"),
    }
    if limits is not None:
        wall["tier"] = {"name": limits.tier, "model": limits.model, "rpm": limits.rpm, "tpm": limits.tpm}
        if limits.output_tpm is not None:
            wall["tier"]["output_tpm"] = limits.output_tpm
        wall["note"] = note
    return wall
