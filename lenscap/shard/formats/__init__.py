"""The export formats ``lenscap shard --format`` knows, by name. A new format is a module with an
``ExportFormat`` subclass (``base``), named here; the command, the card, ``inspect`` and ``report``
take everything else from the class."""

from __future__ import annotations

from lenscap.shard.formats.base import ExportFormat, metadata_json
from lenscap.shard.formats.parquet import ParquetShard
from lenscap.shard.formats.webdataset import WebDatasetShard

__all__ = ["FORMATS", "ExportFormat", "ParquetShard", "WebDatasetShard", "metadata_json", "export_format"]

FORMATS: dict[str, type[ExportFormat]] = {cls.name: cls for cls in (WebDatasetShard, ParquetShard)}


def export_format(name: str | None) -> type[ExportFormat]:
    """The format an export records (``shards.json``'s ``format``); WebDataset where it records none."""
    return FORMATS.get(name or "", WebDatasetShard)
