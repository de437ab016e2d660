"""What an export format is: one class owns everything lenscap knows about a format, so a new format
is one module (and a line in ``lenscap.shard.formats``), and nothing else branches on its name.

A class is a format's writer (an instance writes one output shard) and, on the class, its knowledge:
its file names and what a sample costs in them (the plan cuts shards with it), the files written
beside the shards, its dataset card's sections, and how its files are read back (``inspect``,
``report``)."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar

import pyarrow as pa

if TYPE_CHECKING:
    from lenscap.core.dataset import Dataset

__all__ = ["ExportFormat", "metadata_json"]


def metadata_json(key: str, row: dict[str, Any]) -> bytes:
    """The key and every exported column but the caption, as JSON: WebDataset's ``KEY.json``, and
    every format's measure of a sample's metadata when shards are cut to size."""
    return json.dumps({"key": key, **{k: v for k, v in row.items() if k not in ("key", "caption")}}, default=str).encode()


class ExportFormat(ABC):
    """One output shard of this format, written under a temporary name; ``close`` returns its size."""

    name: ClassVar[str]
    described: ClassVar[str]  # for --format's help: "name (its files)"
    data_files: ClassVar[str]  # a glob of the data files under the export, for the card and ``load_dataset``
    hf_builder: ClassVar[str]  # the ``datasets`` builder that reads them from a URL

    def __init__(self, path: Path, columns: pa.Schema) -> None:
        self.path = path
        self.columns = columns  # the exported columns, caption included, key and image not

    # -- writing ------------------------------------------------------------------------------------

    @staticmethod
    @abstractmethod
    def file_name(shard_id: int, shards: int) -> str: ...

    @staticmethod
    @abstractmethod
    def planned_bytes(image: int, caption: int, metadata: int) -> int:
        """What one sample adds to a shard: used to cut shards to the target size before writing."""

    @abstractmethod
    def write(self, key: str, row: dict[str, Any], src: BinaryIO, offset: int, size: int) -> None:
        """Add a sample whose image is ``size`` bytes of ``src`` (an input tar) at ``offset``."""

    @abstractmethod
    def close(self) -> int: ...

    @abstractmethod
    def abort(self) -> None: ...

    @classmethod
    def side_files(cls, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Files (name: JSON value) written beside the shards, from every shard's record."""
        return {}

    # -- the dataset card ----------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def card_features(cls, columns: pa.Schema) -> list[str] | None:
        """The front matter's ``features`` lines for these columns; None where they cannot all be declared."""

    @classmethod
    @abstractmethod
    def card_files(cls) -> list[str]:
        """The card's paragraph on the data files."""

    @classmethod
    def card_columns(cls) -> list[str]:
        """Rows of the card's column table beyond ``key`` and the exported columns."""
        return []

    @classmethod
    def card_loading(cls, where: str, shards: int, remote: bool) -> list[str]:
        """The card's lines on reading the export in a training loop, beyond ``load_dataset``."""
        return []

    # -- reading back --------------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def file_sizes(cls, ds: Dataset) -> dict[str, int]:
        """The export's data files (names relative to it) and their sizes, temporary files left out."""

    @classmethod
    @abstractmethod
    def sample_locations(cls, path: Path) -> Iterator[tuple[str, Any]]:
        """(key, where its sample lies) of every sample of one local data file, without reading images."""

    @classmethod
    @abstractmethod
    def read_sample(cls, path: Path, where: Any) -> tuple[bytes, dict[str, Any]]:
        """One sample's image bytes and row (caption and the other columns), from ``sample_locations``."""
