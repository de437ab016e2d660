"""What a lenscap plugin imports: one stable path for caption backends and filter annotators.

A plugin is a package that registers a class under an entry-point group: ``lenscap.backends`` for
a caption backend (``lenscap caption --backend NAME``), ``lenscap.filters`` for an annotator
(``lenscap filter --annotate NAME``). ``lenscap backends`` and ``lenscap filters`` list what is
installed. The names below are kept stable across releases; their homes inside lenscap
(``lenscap.caption.backends.base``, ``lenscap.filter.annotators.base``, ...) may move. The full guide, with tested
example packages, is ``docs/plugins.md``.

A minimal backend (``pyproject.toml``: ``[project.entry-points."lenscap.backends"]`` then
``shout = "lenscap_shout:ShoutBackend"``)::

    from lenscap.plugin import OK, CaptionBackend, CaptionResult, Option

    class ShoutBackend(CaptionBackend):
        name = "shout"  # what --backend takes
        options = (Option("word", str, "IMAGE", "The caption."),)  # -O word=...

        def __init__(self, word: str = "IMAGE") -> None:
            self.word = word
            self.model = "shout-1"  # the caption_model column (default: the backend's name)

        def caption_all(self, requests, on_result):
            for r in requests:  # one result per request, in any order
                on_result(CaptionResult(r.key, OK, caption=self.word, cost_usd=0.0))

A minimal annotator (``[project.entry-points."lenscap.filters"]`` then
``bright = "lenscap_bright:Brightness"``)::

    import pyarrow as pa
    from PIL import ImageStat

    from lenscap.plugin import Annotator

    class Brightness(Annotator):
        name = "bright"  # what --annotate and --threshold NAME=X take
        columns = (pa.field("bright_mean", pa.float64()),)  # written into every row
        score = "bright_mean"  # the column the threshold applies to
        keep_above = False  # drop samples scoring above the threshold

        def annotate(self, image, sample):  # RGB, at most 1024 px a side
            return {self.score: ImageStat.Stat(image.convert("L")).mean[0]}

Statuses: a backend reports each request as ``OK`` (with the caption), ``ERROR`` (this image failed:
say why in ``error``), ``REFUSED`` (the model declined), ``TRUNCATED`` (cut at the token limit; the
text goes in ``error``) or ``SKIPPED``; ``generated`` builds the right one from a local model's
reply. A problem with the whole job (no key, unknown model) is a ``BackendError``; a missing optional
dependency is a ``MissingDependency``; a bad option value is a ``UsageError``.
"""

from __future__ import annotations

from lenscap.caption.backends.base import (
    ERROR,
    OK,
    OUTCOMES,
    REFUSED,
    SKIPPED,
    TRUNCATED,
    CaptionBackend,
    CaptionRequest,
    CaptionResult,
    Option,
    generated,
)
from lenscap.core.errors import BackendError, MissingDependency, UsageError
from lenscap.core.record import Sample
from lenscap.embed.model import ClipEmbedder
from lenscap.filter.annotators.base import Annotator

__all__ = [
    # caption backends (entry-point group lenscap.backends)
    "CaptionBackend",
    "CaptionRequest",
    "CaptionResult",
    "Option",
    "generated",
    "OK",
    "ERROR",
    "REFUSED",
    "TRUNCATED",
    "SKIPPED",
    "OUTCOMES",
    # filter annotators (entry-point group lenscap.filters)
    "Annotator",
    "Sample",
    "ClipEmbedder",  # an annotator's CLIP image (and text) embeddings, where none are kept
    # errors a plugin raises
    "BackendError",
    "MissingDependency",
    "UsageError",
    # entry-point groups
    "BACKENDS_GROUP",
    "FILTERS_GROUP",
]

BACKENDS_GROUP = "lenscap.backends"
FILTERS_GROUP = "lenscap.filters"
