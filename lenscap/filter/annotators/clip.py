"""CLIP image-text similarity: how well the caption matches the image (DataComp's main filter)."""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from lenscap.core.install import install_hint
from lenscap.core.record import Sample
from lenscap.core.registry import Option
from lenscap.embed.model import DEFAULT_EMBED_MODEL, ClipEmbedder, check_model_name
from lenscap.filter.annotators.base import Annotator

__all__ = ["ClipScore", "DEFAULT_CLIP_MODEL", "torch_available"]

# The model dedup --semantic embeds with by default, so that its kept embeddings serve this score too.
DEFAULT_CLIP_MODEL = DEFAULT_EMBED_MODEL


def torch_available() -> bool:
    """Whether the local extra's torch and transformers are importable (found, not imported)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


class ClipScore(Annotator):
    """100 x the cosine similarity of CLIP's image and caption embeddings, with the weights you give
    (--clip-model: a hub id or a local directory; the local extra). An image embedding kept with the
    dataset by the same model is read, not computed again."""

    name = "clip"
    cost_rank = 4
    columns = (pa.field("clip_score", pa.float64()),)
    score = "clip_score"
    keep_above = True
    threshold_flag = "--min-clip-score"
    threshold_help = "drop samples whose image-caption similarity (x100) is below this"
    extra = "local"
    options = (
        Option(
            "model",
            str,
            None,
            "the weights to use, a hub id or a local directory",
            default_text=DEFAULT_CLIP_MODEL,
        ),
    )

    @classmethod
    def unavailable(cls) -> str | None:
        return None if torch_available() else f"the clip annotator needs the local extra: {install_hint('local')}"

    def __init__(self, threshold: float | None = None, model: str | None = None) -> None:
        self.model = model or DEFAULT_CLIP_MODEL
        super().__init__(threshold)

    def check(self) -> None:
        super().check()
        check_model_name(self.model)

    def parameters(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "model": self.model}

    def embedding_model(self) -> str:
        return self.model

    def setup(self) -> None:
        self._embedder = ClipEmbedder(self.model)

    def annotate(self, image: Image.Image, sample: Sample) -> dict[str, Any]:
        picture = self.kept_embedding(sample)
        if picture is None:
            picture = self._embedder.embed_images([image])[0]
        else:  # kept as float16: back to unit length, as the computed one is
            picture = picture / max(float(np.linalg.norm(picture)), 1e-12)
        self.record_embedding(sample, picture)
        text = self._embedder.embed_texts([sample.caption or ""])[0]
        return {self.score: round(100.0 * float(np.dot(picture, text)), 4)}
