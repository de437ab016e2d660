"""``lenscap estimate --compare``: one job priced and timed across providers and models, online and batch.

Per model, the input is the same prompt plus the same image counted by that provider's rule
(``caption.pricing.image_tokens``), the output the same words at ``TOKENS_PER_WORD``; the cost uses the
price table (each provider's batch API bills half). Wall time is at each provider's published tier-1
limits (``caption.pricing.tier_limits``; Anthropic limits output tokens apart), and as batches at each
provider's per-batch limits and tier-1 batch queue (``BATCH_LIMITS``), in waves that each take
``--batch-hours``. Every figure is as published when ``PRICES_TAKEN`` says; an account past tier 1 is
faster, never cheaper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lenscap.caption.pricing import (
    DEFAULT_TIER,
    PRICES_TAKEN,
    PriceTable,
    image_tokens,
    provider_of,
    text_tokens,
    tier_limits,
)
from lenscap.caption.prompts import load_prompt
from lenscap.core.errors import UsageError
from lenscap.estimate.options import COMPARED_MODELS, EstimateOptions, human_hours

__all__ = ["compare", "compare_lines", "COMPARED_MODELS", "BATCH_LIMITS", "BatchLimits"]


@dataclass(frozen=True)
class BatchLimits:
    """One provider's batch API: what one batch may hold, and how much a tier-1 account may queue."""

    max_requests: int | None  # requests a batch (None: bounded by bytes only)
    max_bytes: int  # bytes of requests a batch
    queue_tokens: dict[str, int] | None = None  # model -> enqueued input tokens at tier 1
    queue_requests: int | None = None  # requests queued at tier 1, whatever the model


MB = 1_000_000
MIB = 1024 * 1024
BATCH_LIMITS = {
    # OpenAI: 50,000 requests and 200 MB a file; tier 1's batch queue limit in enqueued input tokens.
    "openai": BatchLimits(
        50_000,
        200 * MIB,
        queue_tokens={
            "gpt-4.1": 900_000,
            "gpt-4.1-mini": 2_000_000,
            "gpt-4.1-nano": 2_000_000,
            "gpt-4o": 90_000,
            "gpt-4o-mini": 2_000_000,
        },
    ),
    # Anthropic Message Batches: 100,000 requests or 256 MB a batch; tier 1 may hold 100,000 requests in
    # its processing queue, for every model together.
    "anthropic": BatchLimits(100_000, 256 * MB, queue_requests=100_000),
    # Gemini batch mode with a JSONL input file of up to 2 GB; tier 1's enqueued tokens per model.
    "gemini": BatchLimits(
        None,
        2_000 * MB,
        queue_tokens={"gemini-2.5-pro": 5_000_000, "gemini-2.5-flash": 3_000_000, "gemini-2.5-flash-lite": 10_000_000},
    ),
}


def compare(req: EstimateOptions, models: tuple[str, ...], line_bytes: float, tokens_per_word: float) -> dict[str, Any]:
    """Every model of ``models``, online and batch, for ``req``'s job (``line_bytes``: one batch request's size)."""
    table = PriceTable.load(req.prices)
    unpriced = [m for m in models if table.price(m) is None]
    if unpriced:
        raise UsageError(f"no price known for {', '.join(unpriced)}: give --prices FILE with them, or leave them out")
    images = req.count
    if images is None:
        raise UsageError("--compare prices a number of images: give --images")
    prompt = load_prompt(req.prompt)
    instruction = prompt.render(" ".join(["word"] * 12))
    text = text_tokens(instruction) + (text_tokens(prompt.system) if prompt.system else 0)
    scale = min(1.0, req.max_side / max(req.size))
    fitted = (max(1, round(req.size[0] * scale)), max(1, round(req.size[1] * scale)))
    output = float(math.ceil(req.output_words * tokens_per_word))
    rows = []
    for model in models:
        image = image_tokens(model, *fitted, req.detail)
        per = _PerImage(float(image + text), output)
        for batch in (False, True):
            cost = table.cost(model, round(per.input * images), round(per.output * images), batch=batch)
            rows.append(
                {
                    "provider": provider_of(model),
                    "model": model,
                    "mode": "batch" if batch else "online",
                    "image_tokens": image,
                    "input_tokens_per_image": per.input,
                    "output_tokens_per_image": per.output,
                    "cost_usd": round(cost or 0.0, 2),
                    "wall_time": _batch_time(req, model, images, per, line_bytes) if batch else _online_time(model, images, per),
                }
            )
    return {
        "compare": rows,
        "images": images,
        "sent_at": list(fitted),
        "tier": DEFAULT_TIER,
        "prices_taken": dict(PRICES_TAKEN),
        "note": (
            f"every provider at its published {DEFAULT_TIER} limits; image tokens by each provider's rule for "
            f"{fitted[0]}x{fitted[1]} images; {req.output_words:g} words out in every model's tokens"
        ),
    }


@dataclass(frozen=True)
class _PerImage:
    input: float
    output: float


def _online_time(model: str, images: int, per: _PerImage) -> dict[str, Any]:
    limits = tier_limits(model)
    if limits is None:
        return {"note": f"{model}'s {DEFAULT_TIER} limits are not known"}
    if limits.output_tpm is None:
        per_minute = min(limits.rpm, limits.tpm / (per.input + per.output))
    else:  # input and output tokens limited apart (Anthropic)
        per_minute = min(limits.rpm, limits.tpm / per.input, limits.output_tpm / per.output)
    hours = images / per_minute / 60
    return {"requests_per_minute": round(per_minute, 1), "hours": round(hours, 2), "human": human_hours(hours)}


def _batch_time(req: EstimateOptions, model: str, images: int, per: _PerImage, line_bytes: float) -> dict[str, Any]:
    limits = BATCH_LIMITS[provider_of(model)]
    by_bytes = max(1, math.floor(limits.max_bytes / line_bytes))
    per_batch = min(limits.max_requests or by_bytes, by_bytes)
    batches = math.ceil(images / per_batch)
    if limits.queue_requests is not None:
        at_once = max(1, limits.queue_requests // per_batch)
        queue = f"{limits.queue_requests:,} queued requests"
    elif limits.queue_tokens and model in limits.queue_tokens:
        at_once = max(1, math.floor(limits.queue_tokens[model] / (per_batch * per.input)))
        queue = f"{limits.queue_tokens[model]:,} enqueued input tokens"
    else:
        return {"batches": batches, "requests_per_batch": per_batch, "note": f"{model}'s batch queue limit is not known"}
    # A batch larger than the queue still runs, alone: then a wave is a share of one batch.
    waves = math.ceil(batches / at_once)
    if limits.queue_tokens and model in limits.queue_tokens and per_batch * per.input > limits.queue_tokens[model]:
        waves = math.ceil(images * per.input / limits.queue_tokens[model])
    low, high = req.hours
    return {
        "batches": batches,
        "requests_per_batch": per_batch,
        "queue": queue,
        "waves": waves,
        "hours": [waves * low, waves * high],
        "human": human_hours(waves * low) if low == high else f"{human_hours(waves * low)} to {human_hours(waves * high)}",
    }


def compare_lines(s: dict[str, Any]) -> list[str]:
    """The comparison as a table a person reads (``estimate --compare`` without ``--json``)."""
    header = ("provider", "model", "mode", "image tok", "in/out tok", "cost", "wall time")
    rows = [
        (
            r["provider"],
            r["model"],
            r["mode"],
            f"{r['image_tokens']:,}",
            f"{r['input_tokens_per_image']:,.0f}/{r['output_tokens_per_image']:,.0f}",
            f"${r['cost_usd']:,.0f}",
            r["wall_time"].get("human") or r["wall_time"].get("note", ""),
        )
        for r in s["compare"]
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    right = {3, 4, 5}
    lines = [f"{s['images']:,} images, {s['note']}"]
    for row in (header, *rows):
        lines.append("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    taken = ", ".join(f"{p} {d}" for p, d in s["prices_taken"].items())
    lines.append(f"prices and limits as published ({taken}); batch is half price everywhere; see docs/providers.md")
    return lines
