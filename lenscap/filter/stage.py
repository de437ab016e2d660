"""``lenscap filter``: cheap rules first, content annotators second, every drop explained.

Per shard, the cheap rules (download status, sizes, bytes, caption length, ``--where``) run as one
DuckDB query over the shard's parquet (image sizes are its ``image_size`` column): no image is read.
Only samples that pass them are read and decoded, once, for the blocklist and the annotators,
cheapest first; the first drop stops the rest. Every row stays in the parquet with
``filter_status`` (kept, dropped, error), ``filter_reason`` (the rule) and ``filter_detail`` (the
values); a dropped sample loses its image (its offsets become null), so later stages skip it.

Annotators that score a CLIP embedding (``Annotator.embedding_model``) are offered, per shard, the
embeddings of their model kept with the input dataset or one of its inputs (``lenscap.embed.store``),
so an image embedded once (by ``dedup --semantic``) is not embedded again. The filter keeps the
image embeddings its annotators used in its own output in turn (``lenscap.filter.keep``: those of the
first such annotator's model, by cost order), so ``dedup --semantic`` or a later filter after it does
not embed them again (off with ``--no-keep-embeddings``).
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image

from lenscap.core.dataset import Dataset
from lenscap.core.errors import UsageError
from lenscap.core.layout import IMAGE_SIZE, shard_name
from lenscap.core.record import Sample
from lenscap.core.schema import Column
from lenscap.core.sql import SqlLimits, run_on_no_rows, run_user_sql, sandboxed
from lenscap.core.stage import Stage
from lenscap.embed.store import KeptEmbeddings
from lenscap.filter.annotators.base import Annotator
from lenscap.filter.keep import ShardEmbeddingKeeper
from lenscap.filter.options import FilterOptions
from lenscap.filter.rules import columns_read, query

__all__ = ["FilterStage", "load_blocklist", "KEPT", "DROPPED", "ERROR"]

KEPT, DROPPED, ERROR = "kept", "dropped", "error"
_HEX_RE = re.compile(r"^(?:[0-9a-f]{32}|[0-9a-f]{64})$")


def load_blocklist(path: str | Path) -> frozenset[str]:
    """MD5 or SHA-256 hex digests, one a line; ``#`` starts a comment."""
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as e:
        raise UsageError(f"cannot read blocklist {p}: {e.strerror}") from None
    hashes = set()
    for n, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip().lower()
        if not text:
            continue
        if not _HEX_RE.match(text):
            raise UsageError(f"blocklist {p}, line {n}: expected an MD5 or SHA-256 hex digest, not {text[:80]!r}")
        hashes.add(text)
    return frozenset(hashes)


@dataclass
class FilterStage(Stage):
    name = "filter"
    options: FilterOptions = field(default_factory=FilterOptions)
    annotators: list[Annotator] = field(default_factory=list)
    blocklist: frozenset[str] = frozenset()
    # Read when the stage is made, in the main process: its workers (a Ray cluster's too) get the same.
    sql_limits: SqlLimits = field(default_factory=SqlLimits.from_env)

    def __post_init__(self) -> None:
        self.annotators = sorted(self.annotators, key=lambda a: a.cost_rank)
        self.copy_images = self.options.copy_images

    @classmethod
    def from_options(cls, options: FilterOptions, built: list[Annotator] | None = None) -> FilterStage:
        """The stage ``options`` ask for: its annotators built (a missing extra refused here), with
        ``built`` (annotators a library caller made, a plugin's with its own arguments), and its
        blocklist read, before any work."""
        annotators = options.annotators()
        twice = sorted({a.name for a in annotators} & {a.name for a in built or []})
        if twice:
            raise UsageError(f"annotator {twice[0]} is both in the options and given built; give it once")
        blocked = load_blocklist(options.blocklist) if options.blocklist else frozenset()
        return cls(options, annotators + list(built or []), blocked)

    def parameters(self) -> dict[str, Any]:
        return {
            "rules": {k: v for k, v in self.options.rule_values().items() if v is not None},
            "annotators": {a.name: a.parameters() for a in self.annotators},
            "blocklist_size": len(self.blocklist),
            "keep_embeddings": self.kept_model(),
        }

    def identity(self) -> dict[str, Any]:
        # The kept embeddings are a cache beside the rows, not their content: a resume may switch them.
        return {k: v for k, v in self.parameters().items() if k != "keep_embeddings"}

    def kept_model(self) -> str | None:
        """The model whose image embeddings the output keeps: the first annotator's (by cost order) that
        names one, as one dataset keeps one model's; None with --no-keep-embeddings or none named."""
        if self.options.no_keep_embeddings:
            return None
        return next((m for a in self.annotators if (m := a.embedding_model()) is not None), None)

    def columns(self, input_schema: pa.Schema) -> list[pa.Field]:
        return [
            pa.field("filter_reason", pa.string()),
            pa.field("filter_detail", pa.string()),
            *(c for a in self.annotators for c in a.columns),
        ]

    def input_columns(self) -> tuple[Column, ...]:
        """The columns every stage reads, and those of the cheap rules that are on (each named once)."""
        columns: dict[str, Column] = {}
        for c in (*self.needs, *columns_read(self.options.rule_values())):
            columns.setdefault(c.name, c)
        return tuple(columns.values())

    def check_input(self, src: Dataset, shard_ids: list[int]) -> dict[int, pa.Schema]:
        """The columns the rules read, in every input shard; then the rules run on no rows of each schema
        there is, so a bad --where, or a column it names that a shard lacks, fails here, before any work,
        naming the columns there are (bad values were refused by the options)."""
        schemas = super().check_input(src, shard_ids)
        query = self._query()
        distinct = {tuple((f.name, str(f.type)) for f in schema): (shard_id, schema) for shard_id, schema in schemas.items()}
        for shard_id, schema in distinct.values():
            empty = schema.empty_table().append_column("image_bytes", pa.array([], pa.int64()))
            where = src.location if len(distinct) == 1 else f"shard {shard_name(shard_id)} of {src.location}"
            run_on_no_rows(query, empty, f"filter rules cannot run on {where}", self.sql_limits)
        return schemas

    def setup(self) -> None:
        for a in self.annotators:
            a.setup()

    # -- one shard ------------------------------------------------------------------------------

    def cheap_verdicts(self, src: Dataset, shard_id: int) -> dict[str, tuple[str, str]]:
        import duckdb  # DuckDB takes a quarter second to import: only where a query runs

        table = src.read_table(shard_id)
        if table.num_rows == 0:
            return {}  # no verdict to give (a shard written with no sample may have no columns either)
        if IMAGE_SIZE in table.column_names:
            sizes_column = table.column(IMAGE_SIZE)
        elif self.options.min_bytes is not None:  # type: ignore[attr-defined]  # a dataset without offsets: its tar's headers say
            sizes_column = pa.array(src.image_locations(shard_id, table)[1], pa.int64())
        else:
            sizes_column = pa.nulls(table.num_rows, pa.int64())
        table = table.append_column("image_bytes", sizes_column)
        con = self._duckdb()
        con.register("t", table)
        try:
            what = f"filter rules on shard {shard_name(shard_id)} of {src.location}"
            rows = run_user_sql(con, self._query(), self.sql_limits, what)
        except duckdb.Error as e:  # a value --where cannot take (a failed cast): about the job, as --redo's is
            raise UsageError(f"{what}: {str(e).splitlines()[0]}") from None
        finally:
            con.unregister("t")
        return {str(key): (reason, detail) for key, reason, detail in rows}

    def _query(self) -> str:
        return query(self.options.rule_values())

    def _duckdb(self) -> Any:
        """One in-memory DuckDB connection per worker process (not pickled with the stage)."""
        con = self.__dict__.get("_con")
        if con is None:
            con = self.__dict__["_con"] = sandboxed(self.sql_limits)  # --where is the user's SQL
        return con

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_con", "_kept")}

    def offer_kept_embeddings(self, src: Dataset, shard_id: int) -> None:
        """Offer each annotator that reads an embedding model the shard's kept embeddings of it (each
        model's sidecar read once), or nothing where there are none."""
        found = self.__dict__.setdefault("_kept", {})  # per worker process: model -> KeptEmbeddings or None
        shard: dict[str, dict[str, Any]] = {}
        for a in self.annotators:
            model = a.embedding_model()
            if model is None:
                continue
            if model not in found:
                found[model] = KeptEmbeddings.find(src, model)
            if model not in shard:
                kept = found[model]
                shard[model] = kept.shard(shard_id) if kept is not None else {}
            a.offer_embeddings(shard[model])

    def judge(self, sample: Sample, cheap: tuple[str, str] | None, keeper: ShardEmbeddingKeeper | None = None) -> None:
        """Set the sample's filter columns; a dropped sample loses its image (it leaves the tar). The
        image embedding of ``keeper``'s model an annotator used goes to ``keeper``."""
        row = sample.row
        row.update(filter_status=KEPT, filter_error=None, filter_reason=None, filter_detail=None)
        for a in self.annotators:
            for c in a.columns:
                row[c.name] = None
        if cheap is not None:
            row.update(filter_status=DROPPED, filter_reason=cheap[0], filter_detail=cheap[1])
            sample.image = None
            return
        if not sample.has_image:
            return  # kept without an image: only with --status any
        if self.blocklist:
            digests = (hashlib.md5(sample.image).hexdigest(), hashlib.sha256(sample.image).hexdigest())  # noqa: S324 - a lookup key
            hit = next((d for d in digests if d in self.blocklist), None)
            if hit:
                row.update(
                    filter_status=DROPPED,
                    filter_reason="blocklist",
                    filter_detail=f"{'md5' if len(hit) == 32 else 'sha256'} {hit}",
                )
                sample.image = None
                return
        if not self.annotators:
            return
        try:
            image = Image.open(io.BytesIO(sample.image))
            image.draft("RGB", (1024, 1024))
            image = image.convert("RGB")
            image.thumbnail((1024, 1024))
        except Exception as e:  # noqa: BLE001 - an unreadable image is this sample's outcome
            row.update(filter_status=ERROR, filter_error=f"cannot decode image: {type(e).__name__}: {e}")
            sample.image = None
            return
        for a in self.annotators:
            scores = a.annotate(image, sample)
            row.update(scores)
            if keeper is not None and a.embedding_model() == keeper.model:
                used = a.used_embedding(sample)
                if used is not None:
                    keeper.add(sample.key, used)
            why = a.verdict(scores)
            if why is not None:
                row.update(filter_status=DROPPED, filter_reason=a.name, filter_detail=why)
                sample.image = None
                return

    def judged(
        self, src: Dataset, shard_id: int, reasons: Counter[str], keeper: ShardEmbeddingKeeper | None = None
    ) -> Iterator[Sample]:
        """The shard's samples with their verdicts, counted into ``reasons`` (a rule, or kept/error)."""
        verdicts = self.cheap_verdicts(src, shard_id)
        self.offer_kept_embeddings(src, shard_id)
        for sample in src.iter_samples(shard_id):
            self.judge(sample, verdicts.get(sample.key), keeper)
            reasons[sample.row["filter_reason"] or sample.row["filter_status"]] += 1
            yield sample

    def run_shard(self, src: Dataset, dst: Dataset, shard_id: int) -> dict[str, Any]:
        writer = self.writer(src, dst, shard_id)
        reasons: Counter[str] = Counter()
        model = self.kept_model()
        keeper = ShardEmbeddingKeeper(model) if model is not None else None
        try:
            for sample in self.judged(src, shard_id, reasons, keeper):
                writer.write(sample)
                self.tick()
            sidecars = keeper.stage(dst, shard_id) if keeper is not None else {}
        except BaseException:
            writer.abort()
            raise
        # The sidecar is committed with the rows, in one crash-safe step: never one without the other.
        return writer.commit({"stage": self.name, "filter_reasons": dict(sorted(reasons.items()))}, sidecars)

    def count_shard(self, src: Dataset, shard_id: int) -> Counter[str]:
        """--dry-run: what ``run_shard`` would decide, counted, nothing written."""
        reasons: Counter[str] = Counter()
        for _ in self.judged(src, shard_id, reasons):
            pass
        return reasons
