"""What a caption costs: token estimates (images included) and a price table per model, per provider.

Figures from each provider's published pricing and vision documentation (``PRICES_TAKEN`` says when
they were read; docs/providers.md cites the pages): GPT-4.1 / GPT-4o count 512-px tiles, the OpenAI
mini and nano models count 32-px patches, Claude counts width x height / 750 after its resizing, and
Gemini counts 258 tokens per 768-px tile. The estimates feed the rate limiter and the budget; the cost
of a finished request uses the usage the server reported, never the estimate.
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
    "provider_of",
    "BATCH_DISCOUNT",
    "DEFAULT_TIER",
    "PRICE_FILE_FORMAT",
    "PRICES_TAKEN",
    "PROVIDERS",
]

# Every provider's batch API bills half its online price (OpenAI Batch, Anthropic Message Batches,
# Gemini batch mode).
BATCH_DISCOUNT = 0.5

PROVIDERS = ("openai", "anthropic", "gemini")
# When each provider's prices and tier-1 limits below were read from its pricing and rate-limit pages.
PRICES_TAKEN = {"openai": "2025-04-14", "anthropic": "2025-11-24", "gemini": "2025-11-18"}


def provider_of(model: str) -> str:
    """Whose model this is, by name: claude-* is Anthropic's, gemini-* Google's, anything else is priced
    and counted as OpenAI's (which is also what an OpenAI-compatible server imitates)."""
    if model.startswith("claude-"):
        return "anthropic"
    if model.startswith("gemini-"):
        return "gemini"
    return "openai"


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
    "claude-opus-4-5": Price(5.00, 25.00),
    "claude-opus-4-1": Price(15.00, 75.00),
    "claude-sonnet-4-5": Price(3.00, 15.00),
    "claude-haiku-4-5": Price(1.00, 5.00),
    # Gemini 2.5 Pro's price for prompts up to 200k tokens (a caption request is a few thousand).
    "gemini-2.5-pro": Price(1.25, 10.00),
    "gemini-2.5-flash": Price(0.30, 2.50),
    "gemini-2.5-flash-lite": Price(0.10, 0.40),
}

PRICE_FILE_FORMAT = '{"MODEL": {"input": USD, "output": USD}} per 1M tokens (JSON, or the same as TOML tables)'


@dataclass(frozen=True)
class RateLimits:
    """An account's limits for one model at one of its provider's usage tiers."""

    tier: str
    model: str  # the model the figures are for
    rpm: float
    tpm: float  # input and output tokens together; Anthropic's input tokens alone
    output_tpm: float | None = None  # Anthropic limits output tokens apart


# Each provider's published limits at its usage tier 1 (an account that has paid a first $5 at
# OpenAI or Anthropic, or enabled billing at Google), per model: what a new paying account gets, so
# the honest default for a wall time when the user gives no --rpm/--tpm. Anthropic's third figure is
# its separate output-token limit.
DEFAULT_TIER = "tier 1"
_TIER_1: dict[str, tuple[float, ...]] = {
    "gpt-4.1": (500, 30_000),
    "gpt-4.1-mini": (500, 200_000),
    "gpt-4.1-nano": (500, 200_000),
    "gpt-4o": (500, 30_000),
    "gpt-4o-mini": (500, 200_000),
    "claude-opus-4-5": (50, 30_000, 8_000),
    "claude-opus-4-1": (50, 30_000, 8_000),
    "claude-sonnet-4-5": (50, 30_000, 8_000),
    "claude-haiku-4-5": (50, 50_000, 10_000),
    "gemini-2.5-pro": (150, 2_000_000),
    "gemini-2.5-flash": (1_000, 1_000_000),
    "gemini-2.5-flash-lite": (4_000, 4_000_000),
}


def tier_limits(model: str) -> RateLimits | None:
    """``model``'s limits at the default tier (``DEFAULT_TIER``), or None for a model not in the table."""
    name = _match(model, _TIER_1)
    if name is None:
        return None
    rpm, tpm, *output = _TIER_1[name]
    return RateLimits(DEFAULT_TIER, name, rpm, tpm, output[0] if output else None)


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
    """Input tokens one image costs on ``model`` at ``detail`` (low, high, auto: auto counts as high;
    only OpenAI's models have a detail setting)."""
    provider = provider_of(model)
    if provider == "anthropic":
        return _claude_image_tokens(width, height)
    if provider == "gemini":
        return _gemini_image_tokens(width, height)
    return _openai_image_tokens(model, width, height, detail)


# Claude scales an image down until its long edge is at most 1568 px and it costs at most about 1,600
# tokens (1.15 megapixels), then bills width x height / 750.
_CLAUDE_LONG_EDGE = 1568
_CLAUDE_MAX_TOKENS = 1600


def _claude_image_tokens(width: int, height: int) -> int:
    w, h = float(width), float(height)
    if max(w, h) > _CLAUDE_LONG_EDGE:
        s = _CLAUDE_LONG_EDGE / max(w, h)
        w, h = w * s, h * s
    return max(1, min(_CLAUDE_MAX_TOKENS, math.ceil(w * h / 750)))


# Gemini 2.x bills an image with both sides at most 384 px as 258 tokens, and a larger one as 258
# tokens per 768 x 768 tile.
_GEMINI_SMALL = 384
_GEMINI_TILE = 768
_GEMINI_TILE_TOKENS = 258


def _gemini_image_tokens(width: int, height: int) -> int:
    if width <= _GEMINI_SMALL and height <= _GEMINI_SMALL:
        return _GEMINI_TILE_TOKENS
    return _GEMINI_TILE_TOKENS * math.ceil(width / _GEMINI_TILE) * math.ceil(height / _GEMINI_TILE)


def _openai_image_tokens(model: str, width: int, height: int, detail: str) -> int:
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
