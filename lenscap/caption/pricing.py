"""What a caption costs: token estimates (images included) and a price table per model.

Figures from OpenAI's published pricing and vision documentation (see ``shared/NOTES.md``):
GPT-4.1 / GPT-4o count 512-px tiles, the mini and nano models count 32-px patches. The estimates
feed the rate limiter and the budget; the cost of a finished request uses the usage the server
reported, never the estimate.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from lenscap.core.errors import UsageError

__all__ = [
    "Price",
    "PriceTable",
    "RateLimits",
    "image_tokens",
    "text_tokens",
    "tier_limits",
    "BATCH_DISCOUNT",
    "DEFAULT_TIER",
    "PRICE_FILE_FORMAT",
]

BATCH_DISCOUNT = 0.5


@dataclass(frozen=True)
class Price:
    """USD per million tokens."""

    input: float
    output: float


DEFAULT_PRICES: dict[str, Price] = {
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-mini": Price(0.15, 0.60),
}

PRICE_FILE_FORMAT = '{"MODEL": {"input": USD, "output": USD}} per 1M tokens (JSON, or the same as TOML tables)'


@dataclass(frozen=True)
class RateLimits:
    """An account's limits for one model at one of OpenAI's usage tiers."""

    tier: str
    model: str  # the model the figures are for
    rpm: float
    tpm: float


# OpenAI's published limits at usage tier 1 (an account that has paid $5), per model: what a new
# account gets, so the honest default for a wall time when the user gives no --rpm/--tpm.
DEFAULT_TIER = "tier 1"
_TIER_1 = {
    "gpt-4.1": (500, 30_000),
    "gpt-4.1-mini": (500, 200_000),
    "gpt-4.1-nano": (500, 200_000),
    "gpt-4o": (500, 30_000),
    "gpt-4o-mini": (500, 200_000),
}


def tier_limits(model: str) -> RateLimits | None:
    """``model``'s limits at the default tier (``DEFAULT_TIER``), or None for a model not in the table."""
    name = _match(model, _TIER_1)
    if name is None:
        return None
    rpm, tpm = _TIER_1[name]
    return RateLimits(DEFAULT_TIER, name, rpm, tpm)


# Models that count 32-px patches, with their token multiplier; every other model counts tiles.
_PATCH_MULTIPLIER = {"gpt-4.1-mini": 1.62, "gpt-4.1-nano": 2.46, "o4-mini": 1.72}
# (base, per tile) for tile models; gpt-4o-mini bills images at about GPT-4o's price in its own tokens.
_TILE_TOKENS = {"gpt-4o-mini": (2833, 5667)}
_DEFAULT_TILE_TOKENS = (85, 170)


def _match(model: str, names: list[str] | dict[str, object]) -> str | None:
    """The longest known name that ``model`` is or extends with a dated suffix (gpt-4.1-2025-04-14)."""
    best = None
    for name in names:
        if (model == name or model.startswith(name + "-")) and (best is None or len(name) > len(best)):
            best = name
    return best


def image_tokens(model: str, width: int, height: int, detail: str = "low") -> int:
    """Input tokens one image costs on ``model`` at ``detail`` (low, high, auto: auto counts as high)."""
    patch = _match(model, _PATCH_MULTIPLIER)
    if patch is not None:
        w, h = float(width), float(height)
        if math.ceil(w / 32) * math.ceil(h / 32) > 1536:
            r = math.sqrt(32 * 32 * 1536 / (w * h))
            r *= min(math.floor(w * r / 32) / (w * r / 32), math.floor(h * r / 32) / (h * r / 32))
            w, h = w * r, h * r
        return math.ceil(math.ceil(w / 32) * math.ceil(h / 32) * _PATCH_MULTIPLIER[patch])
    tile_model = _match(model, _TILE_TOKENS)
    base, per_tile = _TILE_TOKENS[tile_model] if tile_model else _DEFAULT_TILE_TOKENS
    if detail == "low":
        return base
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        s = 2048 / max(w, h)
        w, h = w * s, h * s
    if min(w, h) > 768:
        s = 768 / min(w, h)
        w, h = w * s, h * s
    return base + per_tile * math.ceil(w / 512) * math.ceil(h / 512)


def text_tokens(text: str) -> int:
    """About four characters a token for English; rate limiting and budgets only need an estimate."""
    return math.ceil(len(text) / 4) + 4


class PriceTable:
    """Prices per model, the built-in table overridden by a JSON or TOML file of
    ``{"model": {"input": USD per 1M, "output": USD per 1M}}``."""

    def __init__(self, prices: dict[str, Price] | None = None) -> None:
        self.prices = dict(DEFAULT_PRICES if prices is None else prices)

    @classmethod
    def load(cls, path: str | Path | None) -> PriceTable:
        table = cls()
        if path is None:
            return table
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise UsageError(f"cannot read price file {p}: {e.strerror}") from None
        try:
            raw = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
            for model, entry in raw.items():
                table.prices[model] = Price(float(entry["input"]), float(entry["output"]))
        except (ValueError, KeyError, TypeError, AttributeError, tomllib.TOMLDecodeError) as e:
            raise UsageError(f"price file {p}: expected {PRICE_FILE_FORMAT} ({e})") from None
        return table

    def price(self, model: str) -> Price | None:
        name = _match(model, self.prices)
        return self.prices[name] if name else None

    def cost(self, model: str, input_tokens: int, output_tokens: int, batch: bool = False) -> float | None:
        p = self.price(model)
        if p is None:
            return None
        usd = (input_tokens * p.input + output_tokens * p.output) / 1e6
        return usd * BATCH_DISCOUNT if batch else usd
