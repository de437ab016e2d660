"""``--backend transformers``: a local Hugging Face image-text-to-text model, batched.

Any model ``AutoModelForImageTextToText`` loads (SmolVLM, Qwen2.5-VL, LLaVA, Idefics, ...), from a
hub id or a local directory. The prompt presets go through the model's chat template; Florence-2
takes task tokens instead (``lens`` and ``alt-aware`` map to ``<MORE_DETAILED_CAPTION>``, ``short``
to ``<CAPTION>``). Greedy decoding, so a rerun writes the same captions. A reply that stops at
``--max-tokens`` (new tokens, as for the API backends; ``max_new_tokens`` is its old name) is
``truncated``. A GPU out-of-memory error halves the batch and tries again.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from lenscap.caption.backends.base import (
    ERROR,
    LOCAL_PANEL,
    MODEL_PANEL,
    CaptionBackend,
    CaptionRequest,
    CaptionResult,
    Option,
    generated,
    renamed_keyword,
)
from lenscap.core.errors import BackendError, MissingDependency, UsageError
from lenscap.core.install import install_hint

__all__ = ["TransformersBackend", "FLORENCE_TASKS"]

FLORENCE_TASKS = {"lens": "<MORE_DETAILED_CAPTION>", "alt-aware": "<MORE_DETAILED_CAPTION>", "short": "<CAPTION>"}
_DTYPES = ("auto", "float32", "float16", "bfloat16")


def _import_torch() -> Any:
    try:
        import torch  # optional (the local extra) and slow to import
        import transformers  # noqa: F401 - optional (the local extra) and slow to import
    except ImportError:
        raise MissingDependency(f"the transformers backend needs the local extra: {install_hint('local')}") from None
    return torch


def _batches(items: Iterable[CaptionRequest], size: int) -> Iterator[list[CaptionRequest]]:
    batch: list[CaptionRequest] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class TransformersBackend(CaptionBackend):
    """A local Hugging Face image-text-to-text model (SmolVLM, Qwen2.5-VL, LLaVA, Florence-2, ...), batched."""

    name = "transformers"
    options = (
        Option(
            "model",
            str,
            None,
            "Hub id or local directory of an image-text-to-text model.",
            panel=MODEL_PANEL,
            default_text="required",
        ),
        Option("device", str, "auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.", panel=LOCAL_PANEL),
        Option(
            "dtype",
            str,
            "auto",
            "Weights dtype: auto is bfloat16/float16 on GPUs, float32 on CPU.",
            choices=_DTYPES,
            panel=LOCAL_PANEL,
        ),
        Option("batch_size", int, 8, "Images per generation batch (halved on GPU out-of-memory).", panel=LOCAL_PANEL),
        Option(
            "max_tokens",
            int,
            256,
            "Most new tokens per caption.",
            deprecated_names=("max_new_tokens",),
            panel=MODEL_PANEL,
        ),
        Option("max_side", int, 768, "Longest image side in pixels before the processor sees it.", panel=MODEL_PANEL),
    )

    def __init__(
        self,
        model: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        max_tokens: int = 256,
        max_side: int = 768,
        *,
        max_new_tokens: int | None = None,
    ) -> None:
        if not model:
            raise UsageError("--model is required for the transformers backend: a hub id or a local directory")
        max_tokens = renamed_keyword(self.name, max_tokens, max_new_tokens, 256)
        for flag, value in (("--batch-size", batch_size), ("--max-tokens", max_tokens), ("--max-side", max_side)):
            if value < 1:
                raise UsageError(f"{flag} must be at least 1, not {value}")
        path = Path(model).expanduser()
        if path.exists() or model.startswith((".", "~", "/")) or model.count("/") > 1:  # a hub id is ORG/NAME
            if not path.is_dir():
                raise UsageError(f"model directory {model} does not exist")
            model = str(path.resolve())
        _import_torch()
        self.model = model
        self.device_option, self.dtype_option = device, dtype
        self.batch_size, self.max_tokens, self.max_side = batch_size, max_tokens, max_side
        self._model: Any = None
        self._processor: Any = None

    @property
    def max_new_tokens(self) -> int:
        """The old name of ``max_tokens`` (deprecated)."""
        return self.max_tokens

    def identity(self) -> dict[str, Any]:
        # The key keeps its old name: the response cache and the claims of outputs written before the
        # rename to max_tokens stay valid. The manifest (parameters) says max_tokens.
        return {
            "backend": self.name,
            "model": self.model,
            "max_new_tokens": self.max_tokens,
            "max_side": self.max_side,
            "dtype": self.dtype_option,
        }

    def parameters(self) -> dict[str, Any]:
        parameters = self.identity()
        parameters["max_tokens"] = parameters.pop("max_new_tokens")
        return parameters

    # -- loading --------------------------------------------------------------------------------

    def check(self) -> None:
        """The model's config loads and names an image-text-to-text architecture (no weights yet)."""
        from transformers import AutoConfig  # optional (the local extra) and slow to import
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        try:
            config = AutoConfig.from_pretrained(self.model)
        except Exception as e:  # noqa: BLE001 - missing files, unknown model type, offline hub
            raise UsageError(f"cannot load model {self.model}: {str(e).splitlines()[0]}") from None
        if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            raise UsageError(
                f"{self.model} is not an image-text-to-text model (model_type {config.model_type!r}); "
                "pick one that AutoModelForImageTextToText loads, such as SmolVLM, Qwen2.5-VL or LLaVA"
            )

    def _device(self, torch: Any) -> str:
        if self.device_option != "auto":
            return self.device_option
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"

    def _dtype(self, torch: Any, device: str) -> Any:
        if self.dtype_option != "auto":
            return getattr(torch, self.dtype_option)
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32

    def setup(self) -> None:
        torch = _import_torch()
        from transformers import AutoModelForImageTextToText, AutoProcessor  # optional (the local extra) and slow to import
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # lenscap's own progress and errors say what matters
        hf_logging.disable_progress_bar()
        self.device = self._device(torch)
        try:
            self._processor = AutoProcessor.from_pretrained(self.model)
            self._model = AutoModelForImageTextToText.from_pretrained(self.model, dtype=self._dtype(torch, self.device))
            self._model.to(self.device).eval()
        except (OSError, ValueError, RuntimeError) as e:
            raise BackendError(f"cannot load model {self.model} on {self.device}: {str(e).splitlines()[0]}") from None
        tokenizer = getattr(self._processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
        self.florence = self._model.config.model_type.startswith("florence")

    # -- captioning -----------------------------------------------------------------------------

    def prompt_text(self, request: CaptionRequest) -> str:
        if self.florence:
            if request.prompt_id not in FLORENCE_TASKS:
                raise BackendError(f"Florence-2 takes task prompts, not free text: use --prompt {' or '.join(FLORENCE_TASKS)}")
            return FLORENCE_TASKS[request.prompt_id]
        text = f"{request.system}\n\n{request.instruction}" if request.system else request.instruction
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        if not getattr(self._processor, "chat_template", None):
            raise BackendError(f"{self.model} has no chat template, so lenscap cannot build its prompt")
        return str(self._processor.apply_chat_template(messages, add_generation_prompt=True))

    def _image(self, data: bytes) -> Any:
        im = Image.open(io.BytesIO(data))
        im.draft("RGB", (self.max_side, self.max_side))
        im = im.convert("RGB")
        im.thumbnail((self.max_side, self.max_side))
        return im

    def caption_all(self, requests: Iterable[CaptionRequest], on_result: Callable[[CaptionResult], None]) -> None:
        for batch in _batches(requests, self.batch_size):
            ready: list[tuple[CaptionRequest, Any]] = []
            for request in batch:
                try:
                    ready.append((request, self._image(request.image)))
                except Exception as e:  # noqa: BLE001 - an unreadable image is this sample's outcome
                    on_result(CaptionResult(request.key, ERROR, error=f"cannot decode image: {type(e).__name__}: {e}"))
            for result in self._caption_batch(ready):
                on_result(result)

    def _caption_batch(self, items: list[tuple[CaptionRequest, Any]]) -> list[CaptionResult]:
        """Generate for ``items``; on GPU out-of-memory, in halves (the smaller size sticks)."""
        torch = _import_torch()
        if not items:
            return []
        try:
            return self._generate(items)
        except torch.cuda.OutOfMemoryError:
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            if len(items) == 1:
                return [CaptionResult(items[0][0].key, ERROR, error="out of GPU memory with a batch of one image")]
            self.batch_size = max(1, len(items) // 2)
            half = len(items) // 2
            return self._caption_batch(items[:half]) + self._caption_batch(items[half:])

    def _generate(self, items: list[tuple[CaptionRequest, Any]]) -> list[CaptionResult]:
        torch = _import_torch()
        texts = [self.prompt_text(r) for r, _ in items]
        inputs = self._processor(images=[im for _, im in items], text=texts, return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        with torch.inference_mode():
            out = self._model.generate(**inputs, max_new_tokens=self.max_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :].tolist()
        eos = self._model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        lengths = inputs["attention_mask"].sum(dim=1).tolist() if "attention_mask" in inputs else [None] * len(items)
        return [self.interpret(r.key, ids, eos_ids, n_in) for (r, _), ids, n_in in zip(items, new, lengths, strict=True)]

    def interpret(self, key: str, ids: list[int], eos_ids: set[int], input_tokens: int | None) -> CaptionResult:
        """Generated token ids as an outcome: ended by EOS is ``ok``, cut at the limit is ``truncated``."""
        end = next((i for i, t in enumerate(ids) if t in eos_ids), None)
        kept = ids if end is None else ids[:end]  # after EOS come only the batch's padding
        text = self._processor.batch_decode([kept], skip_special_tokens=True)[0]
        return generated(key, text, end is None, f"--max-tokens {self.max_tokens}", input_tokens, len(kept) + (end is not None))
