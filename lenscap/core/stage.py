"""The base classes of the per-shard stages.

A stage is a pure function (input shard, parameters) -> output shard. ``Stage`` holds what the
job driver (``lenscap.core.job``) needs (hooks, progress, the outcome columns) and leaves ``run_shard`` to the subclass: a
stage that works on a whole shard at once (captioning sends many requests concurrently) writes it.
``ShardStage`` owns the per-sample loop, so most stages only set ``name`` and write
``process(sample) -> Sample``. An exception inside ``process`` becomes the sample's
``<name>_status = "error"`` and ``<name>_error`` message, so one bad sample never costs a shard; a
sample that ``process`` returns without a status gets ``<name>_status = "ok"``.

A stage writes only its rows: the images stay in the dataset that holds them (the download), and
the output's manifest names it. ``copy_images`` (``--copy-images``) writes a self-contained output
instead, tars included; a stage whose ``process`` makes new image bytes sets ``changes_images`` and
always does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

from lenscap.core.dataset import Dataset, ShardWriter
from lenscap.core.errors import LenscapError
from lenscap.core.layout import IMAGE_COLUMNS, IMAGE_OFFSET, IMAGE_SIZE
from lenscap.core.record import Sample
from lenscap.core.schema import Column, check_same_types, check_shards

if TYPE_CHECKING:
    from lenscap.core.executors import Executor

__all__ = ["Stage", "ShardStage"]


class Stage(ABC):
    name: ClassVar[str]
    # True for a stage whose samples leave it with other image bytes than they came with.
    changes_images: ClassVar[bool] = False
    # --copy-images: the output holds its images (tars), readable without the dataset they came from.
    copy_images: bool = False
    # The input columns the stage reads (lenscap.core.schema), checked in every input shard before any work.
    needs: ClassVar[tuple[Column, ...]] = (
        Column("key", "string"),
        Column(IMAGE_OFFSET, "integer", optional=True),
        Column(IMAGE_SIZE, "integer", optional=True),
    )
    # True for a stage that puts every input shard's rows together (the export's index): a column must have
    # one type in all of them.
    same_types_across_shards: ClassVar[bool] = False

    @property
    def holds_images(self) -> bool:
        """Whether the output's shards hold their images, or refer to the input's image source."""
        return self.copy_images or self.changes_images

    def parameters(self) -> dict[str, Any]:
        """What the manifest records about this run (never secrets)."""
        return {}

    def manifest_entries(self) -> dict[str, Any]:
        """Fields of the output's manifest beside the common ones: what the output holds besides its
        rows (dedup --semantic's kept embeddings)."""
        return {}

    def identity(self) -> dict[str, Any]:
        """The settings that decide the output's content (not, say, a spending cap): a rerun into
        the same output must have the same, or it would mix two jobs' results."""
        return self.parameters()

    def settings(self) -> dict[str, Any]:
        """What the output's claim holds this stage to (``lenscap.core.claim``)."""
        return {**self.identity(), "copy_images": self.holds_images}

    def check(self) -> None:
        """Once, in the main process, before the output directory is touched: fail fast on a job
        that cannot run (a rejected key, an unreachable server)."""

    def input_columns(self) -> tuple[Column, ...]:
        """The columns this run reads: ``needs``, and what its options add (filter's rules)."""
        return self.needs

    def check_input(self, src: Dataset, shard_ids: list[int]) -> dict[int, pa.Schema]:
        """Once, in the main process, before the output directory is touched: every input shard has the
        columns this stage reads, of their kinds (only the parquet footers are read); a
        ``DatasetError`` naming the first shard and column that do not. Returns the shards' schemas."""
        schemas = check_shards(src, shard_ids, self.input_columns(), self.name)
        if self.same_types_across_shards:
            check_same_types(src, schemas, self.name)
        return schemas

    def begin(self, src: Dataset, dst: Dataset) -> None:
        """Once, in the main process, before any worker starts: state shared by the whole run."""

    def use_executor(self, executor: Executor) -> None:
        """Once, in the main process, before the shards are handed to ``executor``: a stage whose
        workers must share something across machines (the account's rate limit) arranges it here."""

    def setup(self) -> None:
        """Once per worker process before its first shard: load models, open clients."""

    # Set by the job driver: [samples done, USD spent] shared with the main process for live progress.
    _counters: Any = None

    def tick(self, samples: int = 1, cost_usd: float = 0.0) -> None:
        """Report progress within a shard (the job driver shows it live)."""
        counters = self._counters
        if counters is not None:
            with counters.get_lock():
                counters[0] += samples
                counters[1] += cost_usd

    def output_schema(self, input_schema: pa.Schema) -> pa.Schema:
        """The output parquet schema: the input's plus this stage's outcome columns and ``columns``.

        Declared rather than inferred so every shard has the same columns and types, even one
        where no sample failed. A column the input has already keeps its place.
        """
        schema = input_schema
        outcome = (pa.field(f"{self.name}_status", pa.string()), pa.field(f"{self.name}_error", pa.string()), *IMAGE_COLUMNS)
        for f in (*outcome, *self.columns(input_schema)):
            if f.name not in schema.names:
                schema = schema.append(f)
        return schema

    def columns(self, input_schema: pa.Schema) -> list[pa.Field]:
        """The columns this stage adds besides its outcome columns (scores, provenance, flags)."""
        return []

    def writer(self, src: Dataset, dst: Dataset, shard_id: int) -> ShardWriter:
        """The writer of output shard ``shard_id``: this stage's schema, images held or referred to."""
        return dst.writer(shard_id, self.output_schema(src.read_schema(shard_id)), copy_images=self.holds_images)

    @abstractmethod
    def run_shard(self, src: Dataset, dst: Dataset, shard_id: int) -> dict[str, Any]:
        """Write shard ``shard_id`` of ``dst`` from the same shard of ``src``; return its stats."""


class ShardStage(Stage):
    """A stage that transforms one sample at a time; the loop, errors and commit are here."""

    @abstractmethod
    def process(self, sample: Sample) -> Sample: ...

    def run_shard(self, src: Dataset, dst: Dataset, shard_id: int) -> dict[str, Any]:
        writer = self.writer(src, dst, shard_id)
        try:
            status, error = f"{self.name}_status", f"{self.name}_error"
            for sample in src.iter_samples(shard_id):
                sample.row[status] = sample.row[error] = None  # never a stale outcome from an earlier run
                try:
                    sample = self.process(sample)
                    if sample.row.get(status) is None:
                        sample.row[status] = "ok"
                except LenscapError:
                    raise  # about the job, not this sample (the images' dataset changed since): the job driver says it once
                except Exception as e:  # noqa: BLE001 - recorded on the sample, never lost
                    sample.row[status] = "error"
                    sample.row[error] = f"{type(e).__name__}: {e}"
                writer.write(sample)
                self.tick()
        except BaseException:
            writer.abort()
            raise
        return writer.commit({"stage": self.name})
