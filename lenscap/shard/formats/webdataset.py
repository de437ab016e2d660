"""WebDataset: ``NNNNN.tar`` with ``KEY.jpg``, ``KEY.txt`` (the caption) and ``KEY.json`` (the other
columns), as img2dataset and webdataset expect, and ``sizes.json`` (samples per tar, which open_clip's
loader reads)."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import pyarrow as pa

from lenscap.core.card import webdataset_features
from lenscap.core.layout import IMAGE_EXT
from lenscap.core.tario import TarOut
from lenscap.shard.formats.base import ExportFormat, metadata_json

if TYPE_CHECKING:
    from lenscap.core.dataset import Dataset

__all__ = ["WebDatasetShard"]

_BLOCK = 512


def _padded(n: int) -> int:
    return -(-n // _BLOCK) * _BLOCK


class WebDatasetShard(ExportFormat):
    name = "webdataset"
    described = "webdataset (NNNNN.tar)"
    data_files = "*.tar"
    hf_builder = "webdataset"

    def __init__(self, path: Path, columns: pa.Schema) -> None:
        super().__init__(path, columns)
        self._tar = TarOut(path)

    @staticmethod
    def file_name(shard_id: int, shards: int) -> str:
        return f"{shard_id:05d}.tar"

    @staticmethod
    def planned_bytes(image: int, caption: int, metadata: int) -> int:
        return 3 * _BLOCK + _padded(image) + _padded(caption) + _padded(metadata)

    def write(self, key: str, row: dict[str, Any], src: BinaryIO, offset: int, size: int) -> None:
        self._tar.add_from(f"{key}.{IMAGE_EXT}", src, offset, size)
        self._tar.add(f"{key}.txt", (row.get("caption") or "").encode())
        self._tar.add(f"{key}.json", metadata_json(key, row))

    def close(self) -> int:
        self._tar.close()
        return self.path.stat().st_size

    def abort(self) -> None:
        self._tar.close()
        self.path.unlink(missing_ok=True)

    @classmethod
    def side_files(cls, records: list[dict[str, Any]]) -> dict[str, Any]:
        return {"sizes.json": {r["file"]: r["samples"] for r in records}}  # open_clip's get_dataset_size

    @classmethod
    def card_features(cls, columns: pa.Schema) -> list[str] | None:
        return webdataset_features([("key", pa.string()), *((f.name, f.type) for f in columns if f.name != "caption")])

    @classmethod
    def card_files(cls) -> list[str]:
        return [
            "`NNNNN.tar`: WebDataset shards; each sample is `KEY.jpg` (the image), `KEY.txt` (the caption) and "
            "`KEY.json` (the other columns). `sizes.json`: the samples of each tar, by file name (open_clip).",
            "",
        ]

    @classmethod
    def card_loading(cls, where: str, shards: int, remote: bool) -> list[str]:
        if remote or not shards:  # webdataset opens local paths and http(s), not every fsspec URL
            return []
        urls = f"{where}/{{00000..{shards - 1:05d}}}.tar"
        workers = max(1, min(8, shards))
        return [
            "With several DataLoader workers (and nodes), each reads shards of its own: a worker without one gets "
            f"nothing, so this export has at least `--min-shards` shards ({shards} here; use at most that many "
            "workers in all). `sizes.json` holds the samples of each tar, as open_clip's loader expects "
            "(`--train-data` with `--dataset-type webdataset`).",
            "",
            "```python",
            "import webdataset as wds",
            "from torch.utils.data import DataLoader",
            "",
            f"urls = {json.dumps(urls)}",
            "# One pass over every sample, once: shards are split between nodes, then between workers.",
            f"ds = (wds.WebDataset(urls, shardshuffle={shards}, nodesplitter=wds.split_by_node)",
            "      .shuffle(1000).decode('pil').to_tuple('jpg', 'txt'))",
            f"loader = DataLoader(ds, batch_size=None, num_workers={workers})",
            "```",
            "",
            "Training on several GPUs or nodes: ranks must see equally many batches, or one waits for the others "
            "forever at the end of an epoch. Resampled shards give every worker an endless stream, and `with_epoch` "
            "cuts it into equal epochs (samples are drawn with replacement):",
            "",
            "```python",
            "ds = (wds.WebDataset(urls, resampled=True, shardshuffle=True)",
            "      .shuffle(1000).decode('pil').to_tuple('jpg', 'txt')",
            "      .with_epoch(SAMPLES_PER_EPOCH // (WORLD_SIZE * NUM_WORKERS)))",
            "```",
            "",
        ]

    @classmethod
    def file_sizes(cls, ds: Dataset) -> dict[str, int]:
        return {name: size for name, size in ds.file_sizes().items() if name.endswith(".tar") and not name.startswith(".")}

    @classmethod
    def sample_locations(cls, path: Path) -> Iterator[tuple[str, Any]]:
        members: dict[str, dict[str, tuple[int, int]]] = {}
        with tarfile.open(path, "r:") as tar:  # headers only: member data is skipped by seeking
            for m in tar:
                key, _, ext = m.name.partition(".")
                members.setdefault(key, {})[ext] = (m.offset_data, m.size)
        yield from members.items()

    @classmethod
    def read_sample(cls, path: Path, where: Any) -> tuple[bytes, dict[str, Any]]:
        parts: dict[str, bytes] = {}
        with open(path, "rb") as f:
            for ext, (offset, size) in where.items():
                f.seek(offset)
                parts[ext] = f.read(size)
        row = {}
        try:
            row = json.loads(parts.get("json") or b"{}")
        except ValueError:
            pass
        row["caption"] = (parts.get("txt") or b"").decode("utf-8", "replace")
        return parts.get(IMAGE_EXT, b""), row
