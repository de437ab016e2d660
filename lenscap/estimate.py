"""``lenscap estimate``: tokens, cost and wall time of a captioning job, before anyone pays for it.

Per image, the input is the prompt (system and instruction, with an alt-text of ``alt_words`` words
when the prompt uses one) plus the image at ``max_side`` pixels, counted by the same functions that
the caption stage's budget and rate limiter use (``captioning.pricing``); the output is
``output_words`` words at 4/3 tokens a word (OpenAI's rule of thumb for English). With ``from_dir``,
the per-image means are measured instead: the provider-reported token counts of a dataset already
captioned with that model; with ``where`` too, the number of images is that of its rows where the
SQL expression is true (the price of a ``caption --redo`` with it). Wall time: online, the requests
a minute that both ``rpm`` and ``tpm`` allow; as batches, OpenAI's 50,000 requests per batch file
and 24-hour completion window.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from lenscap.captioning.pricing import PriceTable, image_tokens, text_tokens
from lenscap.captioning.prompts import load_prompt
from lenscap.errors import UsageError

__all__ = ["EstimateRequest", "estimate", "TOKENS_PER_WORD", "BATCH_MAX_REQUESTS"]

TOKENS_PER_WORD = 4 / 3
BATCH_MAX_REQUESTS = 50_000
BATCH_WINDOW_H = 24


@dataclass(frozen=True)
class EstimateRequest:
    images: int | None  # None: counted by ``where`` in ``from_dir``
    model: str = "gpt-4.1"
    batch: bool = False
    detail: str = "low"
    output_words: float = 109.0  # Lens's mean caption length
    width: int = 1024
    height: int = 768
    max_side: int = 512
    prompt: str = "lens"
    alt_words: int = 12
    rpm: float | None = None
    tpm: float | None = None
    prices: str | None = None
    from_dir: str | None = None
    where: str | None = None

    def __post_init__(self) -> None:
        if self.where is not None and not self.from_dir:
            raise UsageError("--where selects rows of a captioned dataset: give it with --from DIR")
        if self.where is not None and self.images is not None:
            raise UsageError("give --images or --where (which counts the images in --from), not both")
        if self.images is None and self.where is None:
            raise UsageError("--images is needed: how many images to caption (or --from DIR --where EXPR to count them)")
        if self.images is not None and self.images < 1:
            raise UsageError(f"--images must be at least 1, not {self.images}")
        if self.detail not in ("low", "high", "auto"):
            raise UsageError(f"--detail must be low, high or auto, not {self.detail!r}")
        for name, value in (("--rpm", self.rpm), ("--tpm", self.tpm)):
            if value is not None and value <= 0:
                raise UsageError(f"{name} must be more than 0, not {value:g}")
        if self.output_words < 0 or min(self.width, self.height, self.max_side) < 1:
            raise UsageError("--output-words, --image-size and --max-side must be positive")


def _measured(path: str, model: str) -> tuple[float, float, int]:
    """Mean input and output tokens per caption in a captioned dataset (its uncached successes)."""
    import duckdb

    from lenscap.dataset import Dataset
    from lenscap.storage import require_local

    require_local(path, "estimate --from")
    ds = Dataset.open(path)
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
        row = con.execute(f"""SELECT avg(caption_input_tokens), avg(caption_output_tokens), count(*) FROM read_parquet($files)
                              WHERE caption_status = 'ok' AND caption_input_tokens IS NOT NULL {cached} {model_filter}""",
                          {"files": files, "model": model} if model_filter else {"files": files}).fetchall()[0]
    finally:
        con.close()
    if not row[2]:
        raise UsageError(f"{path} has no successful, uncached {model} captions with token counts to measure")
    return float(row[0]), float(row[1]), int(row[2])


def _selected(path: str, where: str) -> int:
    """The number of samples with an image in a dataset's complete shards where ``where`` is true. The user's SQL runs
    on a sandboxed connection that sees one shard's rows, read here, and nothing else."""
    import duckdb

    from lenscap.dataset import Dataset
    from lenscap.sql import check_condition, rows_where

    ds = Dataset.open(path)
    shards = ds.completed_ids()
    if not shards:
        raise UsageError(f"{path} has no complete shards to select from")
    schema = ds.read_schema(shards[0])
    condition = check_condition(where, "--where", schema, ds.location)
    if "status" in schema.names:  # a selected sample without an image is asked nothing by a redo: not priced
        condition = f"{condition} AND status = 'success'"
    count = 0
    for shard_id in shards:
        try:
            count += rows_where(ds.read_table(shard_id), condition, "count(*)")[0][0]
        except duckdb.Error as e:
            raise UsageError(f"--where cannot run on {ds.location}: {str(e).splitlines()[0]}") from None
    return int(count)


def _duration(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:.0f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"


def estimate(req: EstimateRequest) -> dict[str, Any]:
    table = PriceTable.load(req.prices)
    if table.price(req.model) is None:
        raise UsageError(f"no price known for {req.model!r}: give a --prices file")
    images = req.images
    if req.from_dir:
        input_per, output_per, measured = _measured(req.from_dir, req.model)
        if req.where is not None:
            images = _selected(req.from_dir, req.where)
        basis = f"measured on {measured:,} captions in {req.from_dir}"
    else:
        prompt = load_prompt(req.prompt)
        instruction = prompt.render(" ".join(["word"] * req.alt_words))
        scale = min(1.0, req.max_side / max(req.width, req.height))
        fitted = (max(1, round(req.width * scale)), max(1, round(req.height * scale)))
        image = image_tokens(req.model, *fitted, req.detail)
        text = text_tokens(instruction) + (text_tokens(prompt.system) if prompt.system else 0)
        input_per, output_per = float(image + text), float(math.ceil(req.output_words * TOKENS_PER_WORD))
        basis = (f"assumed: {req.width}x{req.height} images sent at {fitted[0]}x{fitted[1]}, detail {req.detail} "
                 f"({image} image tokens), prompt {req.prompt!r} ({text} tokens), {req.output_words:g} words out")
    assert images is not None
    total_in, total_out = input_per * images, output_per * images
    cost = table.cost(req.model, round(total_in), round(total_out), batch=req.batch)
    out: dict[str, Any] = {
        "request": {k: v for k, v in asdict(req).items() if v is not None},
        "basis": basis,
        "per_image": {"input_tokens": round(input_per, 1), "output_tokens": round(output_per, 1)},
        "total": {"input_tokens": round(total_in), "output_tokens": round(total_out), "cost_usd": round(cost or 0, 2)},
        "priced_as": "batch (half price)" if req.batch else "online",
    }
    if req.where is not None:
        out["selected"] = images
    if req.batch:
        batches = math.ceil(images / BATCH_MAX_REQUESTS)
        out["wall_time"] = {"batches": batches, "window_hours": BATCH_WINDOW_H,
                            "note": f"{batches:,} batch files of at most {BATCH_MAX_REQUESTS:,} requests; each completes within "
                                    f"{BATCH_WINDOW_H} h, and your account's enqueued-token limit decides how many run at once"}
    elif req.rpm or req.tpm:
        per_minute = min(req.rpm or math.inf, (req.tpm / (input_per + output_per)) if req.tpm else math.inf)
        hours = images / per_minute / 60
        out["wall_time"] = {"requests_per_minute": round(per_minute, 1), "hours": round(hours, 2), "human": _duration(hours),
                            "limited_by": "rpm" if req.rpm and per_minute == req.rpm else "tpm"}
    return out
