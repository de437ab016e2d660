"""The LAION aesthetic score: an MLP over an image's CLIP ViT-L/14 embedding, about 1 (ugly) to 10.

The predictor is christophschuhmann/improved-aesthetic-predictor's ``sac+logos+ava1-l14-linearMSE.pth``
(the model that selected LAION-Aesthetics): five linear layers, with dropout between the first four
and no activation, over the unit-length image embedding of OpenAI's CLIP ViT-L/14. Its weights are a
PyTorch state dict, loaded here from a file, a directory holding it, or the Hugging Face hub by id.
An image embedding kept with the dataset by the same CLIP model is read, not computed again, and
then the CLIP model is never loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from lenscap.core.errors import UsageError
from lenscap.core.install import install_hint
from lenscap.core.record import Sample
from lenscap.core.registry import Option
from lenscap.embed.model import ClipEmbedder, check_model_name
from lenscap.filter.annotators.base import Annotator
from lenscap.filter.annotators.clip import torch_available

__all__ = ["Aesthetic", "AESTHETIC_CLIP_MODEL", "AESTHETIC_FILE", "DEFAULT_AESTHETIC_WEIGHTS", "predictor_layers"]

# The file's name in the predictor's GitHub repository (christophschuhmann/improved-aesthetic-predictor).
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
# A hub mirror of that file under its own name (the GitHub repository is not on the hub).
DEFAULT_AESTHETIC_WEIGHTS = f"camenduru/improved-aesthetic-predictor/{AESTHETIC_FILE}"
# The CLIP model the predictor was trained on (768-dimensional image embeddings).
AESTHETIC_CLIP_MODEL = "openai/clip-vit-large-patch14"
_HIDDEN = (1024, 128, 64, 16)
_DROPOUT = (0.2, 0.2, 0.1)


def predictor_layers(dim: int) -> Any:
    """The predictor's layers, untrained, for ``dim``-dimensional embeddings: its state dict's keys
    (``layers.0.weight`` ... ``layers.7.bias``, without ``layers.``) are these layers' indices."""
    from torch import nn  # optional (the local extra) and slow to import

    sizes = (dim, *_HIDDEN)
    layers: list[Any] = []
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(_DROPOUT):
            layers.append(nn.Dropout(_DROPOUT[i]))
    layers.append(nn.Linear(_HIDDEN[-1], 1))
    return nn.Sequential(*layers)


class Aesthetic(Annotator):
    """LAION's aesthetic predictor (improved-aesthetic-predictor): an MLP over the CLIP ViT-L/14 image
    embedding, about 1 to 10 (--aesthetic-weights, --aesthetic-clip-model; the local extra). An image
    embedding kept with the dataset by the same CLIP model is read, not computed again."""

    name = "aesthetic"
    cost_rank = 5
    columns = (pa.field("aesthetic_score", pa.float64()),)
    score = "aesthetic_score"
    keep_above = True
    threshold_flag = "--min-aesthetic"
    threshold_help = "drop images whose LAION aesthetic score (about 1 to 10) is below this"
    extra = "local"
    options = (
        Option(
            "weights",
            str,
            None,
            "the predictor's weights (a PyTorch state dict): a hub id ORG/NAME/FILE, or a local file or directory",
            default_text=DEFAULT_AESTHETIC_WEIGHTS,
        ),
        Option(
            "clip_model",
            str,
            None,
            "the CLIP model whose image embeddings the weights score, a hub id or a local directory",
            default_text=AESTHETIC_CLIP_MODEL,
        ),
    )

    @classmethod
    def unavailable(cls) -> str | None:
        return None if torch_available() else f"the aesthetic annotator needs the local extra: {install_hint('local')}"

    def __init__(self, threshold: float | None = None, weights: str | None = None, clip_model: str | None = None) -> None:
        self.weights = weights or DEFAULT_AESTHETIC_WEIGHTS
        self.clip_model = clip_model or AESTHETIC_CLIP_MODEL
        super().__init__(threshold)

    def check(self) -> None:
        super().check()
        check_model_name(self.clip_model)
        local = Path(self.weights).expanduser()
        if not local.exists() and (self.weights.startswith((".", "~", "/")) or self.weights.count("/") < 1):
            raise UsageError(
                f"cannot load aesthetic weights {self.weights}: no such file or directory (or a hub id ORG/NAME/FILE)"
            )

    def parameters(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "weights": self.weights, "clip_model": self.clip_model}

    def embedding_model(self) -> str:
        return self.clip_model

    def setup(self) -> None:
        import torch  # optional (the local extra) and slow to import

        self._torch = torch
        self._mlp = load_predictor(weights_file(self.weights), self.weights)
        self._dim = int(self._mlp[0].in_features)
        self._embedder: ClipEmbedder | None = None  # loaded at the first image with no kept embedding

    def annotate(self, image: Image.Image, sample: Sample) -> dict[str, Any]:
        vector = self.kept_embedding(sample)
        if vector is None:
            vector = self._embed(image)
        self._check_dim(len(vector))
        self.record_embedding(sample, vector)
        unit = vector / max(float(np.linalg.norm(vector)), 1e-12)  # trained on unit-length embeddings
        with self._torch.inference_mode():
            score = self._mlp(self._torch.from_numpy(np.asarray(unit, dtype=np.float32)[None]))[0, 0]
        return {self.score: round(float(score), 4)}

    def _embed(self, image: Image.Image) -> np.ndarray:
        if self._embedder is None:
            self._embedder = ClipEmbedder(self.clip_model)
        return self._embedder.embed_images([image])[0]

    def _check_dim(self, dim: int) -> None:
        if dim != self._dim:
            raise UsageError(
                f"aesthetic weights {self.weights} score {self._dim}-dimensional embeddings; {self.clip_model} gives {dim} "
                f"(the LAION predictor's is {AESTHETIC_CLIP_MODEL})"
            )


def weights_file(spec: str) -> Path:
    """The local file ``spec`` names: a file, a directory holding the predictor's file (or one .pth),
    or a hub id ``ORG/NAME/FILE`` (``ORG/NAME``: the predictor's file name), downloaded to the hub's cache."""
    local = Path(spec).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        found = [local / AESTHETIC_FILE] if (local / AESTHETIC_FILE).is_file() else sorted(local.glob("*.pth"))
        if len(found) != 1:
            raise UsageError(f"cannot load aesthetic weights {spec}: expected {AESTHETIC_FILE} or one .pth file in it")
        return found[0]
    org, name, *rest = spec.split("/") + [""]
    filename = "/".join(p for p in rest if p) or AESTHETIC_FILE
    try:
        from huggingface_hub import hf_hub_download  # installed with transformers (the local extra)

        return Path(hf_hub_download(repo_id=f"{org}/{name}", filename=filename))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo or file, no access: one line for the user
        raise UsageError(
            f"cannot load aesthetic weights {spec}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


def load_predictor(path: Path, spec: str) -> Any:
    """The predictor from its state dict at ``path``, in eval mode (its dropout off)."""
    import torch  # optional (the local extra) and slow to import

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - not a PyTorch file, or one that holds code
        raise UsageError(f"cannot load aesthetic weights {spec}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):  # a Lightning checkpoint
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise UsageError(f"cannot load aesthetic weights {spec}: not a state dict")
    state = {str(k).removeprefix("layers."): v for k, v in state.items()}
    first = state.get("0.weight")
    if first is None or getattr(first, "ndim", 0) != 2:
        raise UsageError(f"cannot load aesthetic weights {spec}: not the aesthetic predictor's (no layers.0.weight)")
    mlp = predictor_layers(int(first.shape[1]))
    try:
        mlp.load_state_dict(state)
    except RuntimeError as e:
        raise UsageError(f"cannot load aesthetic weights {spec}: {str(e).splitlines()[0]}") from None
    return mlp.eval()
