"""The names a batch job gives things: a request's custom id (shard and key), the id line that says
what merging needs of a packed request, and where a prepared shard's files are."""

from __future__ import annotations

import json
from pathlib import Path

from lenscap.core.layout import shard_name

__all__ = ["IdLine", "custom_id", "parse_custom_id", "prepared_paths"]


def custom_id(shard_id: int, key: str) -> str:
    return f"{shard_name(shard_id)}/{key}"


def parse_custom_id(value: str) -> tuple[int, str]:
    shard, _, key = value.partition("/")
    return int(shard), key


class IdLine:
    """What merging needs of one packed request, without re-reading its image:
    ``custom id <TAB> cache key <TAB> OCR hint (JSON) <TAB> line bytes <TAB> input tokens <TAB> worst-case USD``."""

    __slots__ = ("custom_id", "cache_key", "ocr", "size", "tokens", "cost")

    def __init__(self, custom_id: str, cache_key: str, ocr: str, size: int, tokens: int, cost: float) -> None:
        self.custom_id, self.cache_key, self.ocr, self.size, self.tokens, self.cost = (
            custom_id,
            cache_key,
            ocr,
            size,
            tokens,
            cost,
        )

    def encode(self) -> bytes:
        return f"{self.custom_id}\t{self.cache_key}\t{self.ocr}\t{self.size}\t{self.tokens}\t{self.cost!r}\n".encode()

    @classmethod
    def decode(cls, raw: bytes) -> IdLine:
        cid, key, ocr, size, tokens, cost = raw.decode().rstrip("\n").split("\t")
        return cls(cid, key, ocr, int(size), int(tokens), float(cost))

    @property
    def ocr_text(self) -> str | None:
        return json.loads(self.ocr)

    @classmethod
    def read(cls, path: Path) -> list[IdLine]:
        with open(path, "rb") as f:
            return [cls.decode(line) for line in f if line.strip()]


def prepared_paths(root: Path, shard_id: int) -> tuple[Path, Path, Path]:
    """(lines, ids, marker) of a prepared shard."""
    base = root / "prepared" / shard_name(shard_id)
    return base.with_suffix(".jsonl"), base.with_suffix(".ids"), base.with_suffix(".json")
