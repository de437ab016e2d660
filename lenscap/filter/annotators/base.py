"""The annotator protocol: score columns from a decoded image, and a drop rule on one of them.

Plugin authors import ``Annotator`` (and ``Sample``) from ``lenscap.plugin`` (see ``docs/plugins.md``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from PIL import Image

from lenscap.core.errors import MissingDependency
from lenscap.core.record import Sample
from lenscap.core.registry import Option

__all__ = ["Annotator"]


class Annotator(ABC):
    """The base of every ``lenscap filter`` annotator, built-in or plugin.

    The contract:

    - ``name`` (class attribute): what ``--annotate NAME`` and ``--threshold NAME=VALUE`` take, and the
      ``filter_reason`` of the samples it drops. Register the class under the same name in the
      ``lenscap.filters`` entry-point group of your package::

          [project.entry-points."lenscap.filters"]
          redness = "lenscap_redness:Redness"

    - ``columns``: the ``pyarrow`` fields it writes into every row of the output (null where it did
      not run: a sample dropped earlier, or without an image). ``score``: the one of them that the
      threshold applies to (numeric).
    - ``keep_above``: the direction. True: samples scoring *below* the threshold are dropped (a
      sharpness, a similarity); False: samples scoring *above* it are dropped (a share of text, an
      NSFW score). No threshold (``--annotate NAME`` alone), no drop: the scores are only written.
      ``default_threshold``: the threshold used when none is given (None: scores only).
    - ``annotate(image, sample)``: called once per sample that passed the cheap rules and every
      cheaper annotator (``cost_rank``, low first), with the image decoded to RGB and at most 1024 px
      on its longer side, and the ``Sample`` (``sample.key``, ``sample.caption``, ``sample.row``: the
      row's columns so far; do not change them). It returns ``{column: value}`` for its ``columns``
      (a missing column is null; a null score is never dropped). It must be a pure function of its
      inputs: a rerun writes the same scores.
    - ``verdict(scores)`` turns the scores into a drop: the default compares ``score`` with the
      threshold in the ``keep_above`` direction and says why (``"redness_share 0.8 > 0.5"``, the row's
      ``filter_detail``). Override it for any other rule.
    - ``setup()``: once per worker process, before the first ``annotate``: load models here (not in
      ``__init__``, which runs in the main process when the command is parsed). Raise
      ``MissingDependency`` with the install command when something is missing.
    - ``unavailable()`` (class method, cheap, loads nothing): why it cannot run on this machine (a
      missing extra), or None; ``lenscap filters`` shows it, and ``check()`` (run by ``__init__``)
      raises it as a ``MissingDependency`` before any work. ``extra``: the lenscap extra it needs.
    - ``embedding_model()``: an annotator that scores an image embedding (CLIP's) names the model here
      (a hub id or a directory, as given). Before each shard the stage offers it that model's *kept*
      embeddings of the shard's samples (``lenscap.embed``: the sidecars a pass such as ``dedup
      --semantic`` keeps, in the input dataset or one of its inputs, under the same model name);
      ``kept_embedding(sample)`` in ``annotate`` is the sample's vector (float32, unit length; rounded
      to float16 when kept), or None: then the annotator embeds the image itself. The default, None,
      offers nothing.
    - ``record_embedding(sample, vector)``: such an annotator says, in ``annotate``, which image
      embedding it used for the sample (kept or computed); the stage asks ``used_embedding(sample)``
      after ``annotate`` and keeps the vectors with the output (``embeddings/NNNNN.parquet``), so a
      later stage (``dedup --semantic``, another filter) reads them instead of embedding again. Of
      the annotators that name a model, the first by ``cost_rank`` decides which model's are kept
      (one model a dataset). An annotator that records nothing keeps nothing.

    Per sample, the filter stage records ``filter_status`` (kept, dropped, error), ``filter_reason``
    (the rule or annotator that dropped it), ``filter_detail`` (the verdict) and ``filter_error``
    (why an image could not be decoded), plus the annotators' columns. ``__init__`` takes the
    threshold (a float, or None); a subclass that takes more keywords passes ``threshold`` on.
    """

    name: ClassVar[str]
    columns: ClassVar[tuple[pa.Field, ...]]
    score: ClassVar[str]
    keep_above: ClassVar[bool]
    default_threshold: ClassVar[float | None] = None  # None: --annotate NAME alone writes scores and drops nothing
    threshold_flag: ClassVar[str | None] = (
        None  # a flag of `lenscap filter` of its own (--min-sharpness); any: --threshold NAME=X
    )
    threshold_help: ClassVar[str] = ""  # what the threshold means, e.g. "drop images whose Laplacian variance is below"
    threshold_type: ClassVar[type] = float  # what --threshold-flag VALUE takes (a count: int)
    # More options, given as keywords of __init__; a built-in's are flags of lenscap filter (--clip-model).
    options: ClassVar[tuple[Option, ...]] = ()
    extra: ClassVar[str | None] = None  # the lenscap extra it needs (lenscap.core.install.install_hint), if any

    cost_rank: ClassVar[int] = 50  # cheaper annotators run first; a drop skips the rest

    def __init__(self, threshold: float | None = None) -> None:
        self.threshold = threshold if threshold is not None else self.default_threshold
        self.check()

    def check(self) -> None:
        """Called by ``__init__``, in the process that builds the job, before any work: raise
        ``MissingDependency`` (or ``UsageError``) for what cannot work, so the user hears it at once,
        not from every worker. The default raises what ``unavailable()`` says."""
        problem = self.unavailable()
        if problem:
            raise MissingDependency(problem)

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this annotator cannot run here (a missing extra or model), or None. Cheap: loads no model."""
        return None

    @classmethod
    def plugin_problems(cls) -> list[str]:
        """What makes this class unusable as an annotator (checked when the registry loads it)."""
        problems = []
        if not isinstance(getattr(cls, "name", None), str) or not cls.name:
            problems.append('sets no name (a class attribute: name = "...")')
        columns = getattr(cls, "columns", None)
        if not isinstance(columns, tuple) or not columns or not all(isinstance(c, pa.Field) for c in columns):
            problems.append("columns must be a non-empty tuple of pyarrow fields (pa.field(NAME, TYPE))")
        elif getattr(cls, "score", None) not in {c.name for c in columns}:
            problems.append(f"score ({getattr(cls, 'score', None)!r}) must name one of its columns")
        if not isinstance(getattr(cls, "keep_above", None), bool):
            problems.append("keep_above must be True (drop scores below the threshold) or False (drop scores above it)")
        return problems

    @classmethod
    def direction(cls) -> str:
        """Which side of the threshold is dropped: ``drop below`` or ``drop above``."""
        return "drop below" if cls.keep_above else "drop above"

    def setup(self) -> None:
        """Once per worker process: load models."""

    def embedding_model(self) -> str | None:
        """The embedding model whose kept image embeddings this annotator reads, or None (none)."""
        return None

    def offer_embeddings(self, vectors: Mapping[str, np.ndarray]) -> None:
        """Called by the filter stage before each shard, when ``embedding_model()`` is set: that model's
        kept embeddings of the shard's samples, by key (empty where none are kept)."""
        self._kept_embeddings = vectors

    def kept_embedding(self, sample: Sample) -> np.ndarray | None:
        """The sample's kept image embedding (float32, unit length), or None: embed the image."""
        return getattr(self, "_kept_embeddings", {}).get(sample.key)

    def record_embedding(self, sample: Sample, vector: np.ndarray) -> None:
        """Say, in ``annotate``, which image embedding of ``embedding_model()`` scored ``sample`` (kept
        or computed): the filter keeps it with its output. Only the last sample's is held."""
        self._used_embedding = (sample.key, vector)

    def used_embedding(self, sample: Sample) -> np.ndarray | None:
        """The image embedding ``annotate`` recorded for ``sample`` (its last call), or None."""
        used = getattr(self, "_used_embedding", None)
        return used[1] if used is not None and used[0] == sample.key else None

    @abstractmethod
    def annotate(self, image: Image.Image, sample: Sample) -> dict[str, Any]:
        """Score columns for one image (RGB, at most 1024 px on its longer side) and its sample."""

    def verdict(self, scores: dict[str, Any]) -> str | None:
        """Why the sample is dropped, or None to keep it."""
        value = scores.get(self.score)
        if self.threshold is None or value is None:
            return None
        if self.keep_above and value < self.threshold:
            return f"{self.score} {value:.4g} < {self.threshold:g}"
        if not self.keep_above and value > self.threshold:
            return f"{self.score} {value:.4g} > {self.threshold:g}"
        return None

    def parameters(self) -> dict[str, Any]:
        return {"threshold": self.threshold}
