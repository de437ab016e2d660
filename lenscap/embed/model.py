"""A CLIP-style image (and text) embedder, loaded by hub id or from a local directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lenscap.core.errors import MissingDependency, UsageError
from lenscap.core.install import install_hint

__all__ = ["ClipEmbedder", "DEFAULT_EMBED_MODEL", "check_model_name"]

# OpenAI's CLIP ViT-B/32 (512 dimensions): the model SemDeDup and most LAION tooling embed with at scale.
DEFAULT_EMBED_MODEL = "openai/clip-vit-base-patch32"


def check_model_name(model: str, what: str = "CLIP model") -> None:
    """A path that does not exist is a mistake to name at once; a hub id (ORG/NAME) is loaded later."""
    if not Path(model).expanduser().exists() and model.startswith((".", "~", "/")):
        raise UsageError(f"cannot load {what} {model}: no such directory")


class ClipEmbedder:
    """L2-normalised float32 embeddings from a CLIP-style model's image and text towers.

    ``image_calls`` counts forward passes of the image tower: what a stage that reuses kept embeddings
    saves (the tests count it)."""

    def __init__(self, model: str) -> None:
        self.model_name = model
        self.image_calls = 0
        try:
            import torch  # optional (the local extra) and slow to import
            from transformers import AutoImageProcessor, AutoModel
            from transformers.utils import logging as hf_logging  # optional (the local extra), slow to import
        except ImportError:
            raise MissingDependency(f"embedding images needs the local extra: {install_hint('local')}") from None
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            self._model = AutoModel.from_pretrained(model).eval()
            self._images = AutoImageProcessor.from_pretrained(model)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot load CLIP model {model}: {str(e).splitlines()[0]}") from None
        if not hasattr(self._model, "get_image_features"):
            raise UsageError(f"{model} is not a CLIP-style model (no image and text embeddings)")
        self._torch = torch
        self._tokenizer: Any = None

    @property
    def dim(self) -> int:
        return int(self._model.config.projection_dim)

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """One row per image (RGB), unit length."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        self.image_calls += 1
        with self._torch.inference_mode():
            pixels = self._images(images=images, return_tensors="pt")["pixel_values"]
            out = _tensor(self._model.get_image_features(pixel_values=pixels))
        return _unit(out.float().numpy())

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """One row per text, unit length (truncated to the text tower's length)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer  # optional (the local extra) and slow to import

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_name)
        with self._torch.inference_mode():
            tokens = self._tokenizer(
                texts,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self._model.config.text_config.max_position_embeddings,
            )
            out = _tensor(self._model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]))
        return _unit(out.float().numpy())


def _tensor(out: Any) -> Any:
    # transformers 5 may return a model output object where 4.x returned the tensor.
    return out if hasattr(out, "shape") else out.pooler_output


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.maximum(norms, 1e-12)).astype(np.float32)
