"""Where a dataset's images are, and reading one of them.

Images are written once. A dataset either holds its images (``download``, an export, a stage run
with ``--copy-images``: its own tars) or refers to the dataset that does: its manifest's ``images``
names that dataset (a path relative to this one where both are local or in one bucket) and its
``id``, so a source that was deleted or replaced is an error, never garbage. Either way each row's
``image_offset`` and ``image_size`` say where its image lies in shard ``NNNNN.tar`` of the dataset
holding the images (null: no image, e.g. a failed download or a sample a stage dropped), and an
image is read by one ranged read, checking the tar header just before it.
"""

from __future__ import annotations

import json
import posixpath
from typing import IO, Any

import pyarrow as pa

from lenscap.core.errors import DatasetError
from lenscap.core.layout import IMAGE_COLUMNS, IMAGE_EXT, IMAGE_OFFSET, IMAGE_SIZE, MANIFEST_NAME, shard_name
from lenscap.core.storage import is_remote
from lenscap.core.tario import BLOCK, TarOut, member_name, scan_members

__all__ = ["open_image_source", "images_ref", "TarReader", "add_sample", "moved_image", "with_locations", "image_locations"]


def open_image_source(ds: Any, ref: Any) -> Any:
    """The dataset a manifest's ``images`` entry ``ref`` names (None: ``ds`` itself), checked: a
    source that is missing, or was replaced since (another ``id``), is a ``DatasetError`` naming it
    and what to do, since its tars would give other images than the rows describe."""
    if not ref:
        return ds
    if not (isinstance(ref, dict) and isinstance(ref.get("location"), str)):
        raise DatasetError(f'{ds.location}/{MANIFEST_NAME}: its "images" entry is not one lenscap wrote ({ref!r})')
    location = ref["location"]
    if not is_remote(location) and not posixpath.isabs(location):  # relative to this dataset, wherever it is now
        location = ds.fs.unstrip_protocol(posixpath.normpath(f"{ds.root}/{location}"))
    source = type(ds)(location, ds.storage_options if is_remote(location) else None)
    advice = f"restore it, or rerun the stage that wrote {ds.location} with --copy-images from an input that holds its images"
    try:
        manifest = source.read_manifest()
    except DatasetError:
        manifest = None
    if manifest is None:
        raise DatasetError(f"the images of {ds.location} live in {source.location}, which is missing; {advice}")
    if ref.get("id") is not None and manifest.get("id") != ref["id"]:
        raise DatasetError(
            f"the images of {ds.location} live in {source.location}, which was replaced since "
            f"(dataset id {manifest.get('id')}, not {ref['id']}); {advice}"
        )
    return source


def images_ref(source: Any, out: Any) -> dict[str, Any]:
    """What ``out``'s manifest records to read its images from ``source``: a relative path where both
    are on one filesystem, local or in one bucket (the two may move together), else the URL."""
    location = source.relative_location(out) or source.location
    return {"location": location, "id": (source.read_manifest() or {}).get("id")}


def with_locations(table: pa.Table, offsets: list[int | None], sizes: list[int | None]) -> pa.Table:
    return table.append_column(IMAGE_COLUMNS[0], pa.array(offsets, pa.int64())).append_column(
        IMAGE_COLUMNS[1], pa.array(sizes, pa.int64())
    )


def image_locations(table: pa.Table, tar: TarReader) -> tuple[list[int | None], list[int | None]]:
    """(offsets, sizes) of the images of ``table``'s rows, in row order, in ``tar``; None where a row has none."""
    if IMAGE_OFFSET in table.column_names:
        return table.column(IMAGE_OFFSET).to_pylist(), table.column(IMAGE_SIZE).to_pylist()
    if table.num_rows == 0:
        return [], []
    # Written by img2dataset itself, or by lenscap before offsets were recorded: the tar's headers say.
    members = tar.scan()
    located = [members.get(str(k), (None, None)) for k in table.column("key").to_pylist()]
    return [o for o, _ in located], [n for _, n in located]


def add_sample(tar: TarOut, key: str, image: bytes, row: dict[str, Any]) -> tuple[int, int]:
    """Add a sample's members as img2dataset writes them (KEY.jpg, KEY.txt with its caption, KEY.json
    with its row but the row's own offsets); returns where its image lies: (offset, size)."""
    offset = tar.add(f"{key}.{IMAGE_EXT}", image)
    tar.add(f"{key}.txt", (row.get("caption") or "").encode())
    metadata = {"key": key, **{k: v for k, v in row.items() if k not in ("key", IMAGE_OFFSET, IMAGE_SIZE)}}
    tar.add(f"{key}.json", json.dumps(metadata, default=str).encode())
    return offset, len(image)


def moved_image(source: Any, shard_id: int, key: str, offset: int) -> DatasetError:
    """The error for a tar that no longer holds an image where a row says it is."""
    return DatasetError(
        f"{source.location}/{shard_name(shard_id)}.tar does not hold the image of {key} at byte {offset}: "
        "the dataset holding the images was changed since the rows were written; rerun the stages after it"
    )


class TarReader:
    """One shard's image tar, opened at the first image asked for; each image checked against the
    member header just before it, so a tar that was rewritten since is an error, not another image."""

    def __init__(self, source: Any, shard_id: int) -> None:
        self.source = source
        self.shard_id = shard_id
        self._f: IO[bytes] | None = None

    def _file(self) -> IO[bytes]:
        if self._f is None:
            try:
                self._f = self.source.open_tar(self.shard_id)
            except FileNotFoundError:
                raise DatasetError(
                    f"{self.source.location}: shard {shard_name(self.shard_id)} has no tar; its images "
                    "are missing (restore the directory, or download again into a new one)"
                ) from None
        return self._f

    def scan(self) -> dict[str, tuple[int, int]]:
        try:
            return scan_members(self._file(), IMAGE_EXT)
        except DatasetError:
            return {}  # a shard without images (every download failed)

    def loader(self, key: str, offset: int, size: int) -> Any:
        return lambda: self.read(key, offset, size)

    def read(self, key: str, offset: int, size: int) -> bytes:
        f = self._file()
        f.seek(offset - BLOCK)
        data = f.read(BLOCK + size)
        if member_name(data[:BLOCK]) != f"{key}.{IMAGE_EXT}" or len(data) != BLOCK + size:
            raise moved_image(self.source, self.shard_id, key, offset)
        return data[BLOCK:]

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
