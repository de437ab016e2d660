"""CLIP image-text similarity: how well the caption matches the image (DataComp's main filter)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image

from lenscap.core.errors import MissingDependency, UsageError
from lenscap.core.install import install_hint
from lenscap.core.record import Sample
from lenscap.core.registry import Option
from lenscap.filter.annotators.base import Annotator

__all__ = ["ClipScore", "DEFAULT_CLIP_MODEL"]

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"


class ClipScore(Annotator):
    """100 x the cosine similarity of CLIP's image and caption embeddings, with the weights you give
    (--clip-model: a hub id or a local directory; the local extra)."""

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
        if all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers")):
            return None
        return f"the clip annotator needs the local extra: {install_hint('local')}"

    def __init__(self, threshold: float | None = None, model: str | None = None) -> None:
        self.model = model or DEFAULT_CLIP_MODEL
        super().__init__(threshold)

    def check(self) -> None:
        super().check()
        path = Path(self.model).expanduser()
        if not path.exists() and self.model.startswith((".", "~", "/")):  # a hub id is ORG/NAME
            raise UsageError(f"cannot load CLIP model {self.model}: no such directory")

    def parameters(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "model": self.model}

    def setup(self) -> None:
        try:
            import torch  # optional (the local extra) and slow to import
            from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging  # optional (the local extra) and slow to import
        except ImportError:
            raise MissingDependency(f"the clip annotator needs the local extra: {install_hint('local')}") from None
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            self._model = AutoModel.from_pretrained(self.model).eval()
            self._tokenizer = AutoTokenizer.from_pretrained(self.model)
            self._images = AutoImageProcessor.from_pretrained(self.model)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot load CLIP model {self.model}: {str(e).splitlines()[0]}") from None
        if not hasattr(self._model, "get_image_features"):
            raise UsageError(f"{self.model} is not a CLIP-style model (no image and text embeddings)")
        self._torch = torch

    def annotate(self, image: Image.Image, sample: Sample) -> dict[str, Any]:
        torch = self._torch
        caption = sample.caption or ""
        with torch.inference_mode():
            pixels = self._images(images=image, return_tensors="pt")["pixel_values"]
            text = self._tokenizer(
                [caption],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self._model.config.text_config.max_position_embeddings,
            )
            img = _embedding(self._model.get_image_features(pixel_values=pixels))
            txt = _embedding(self._model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"]))
            cos = torch.nn.functional.cosine_similarity(img, txt).item()
        return {self.score: round(100.0 * cos, 4)}


def _embedding(out: Any) -> Any:
    # transformers 5 may return a model output object where 4.x returned the tensor.
    return out if hasattr(out, "shape") else out.pooler_output
