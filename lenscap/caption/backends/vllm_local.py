"""``--backend vllm``: vLLM's offline engine on a GPU machine, the same prompts, batched.

Requests are OpenAI-style chat conversations (the image as a data URL), which ``LLM.chat`` takes
as they are, so prompts behave as with ``--backend openai`` against ``vllm serve``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

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
from lenscap.caption.image_prep import UnreadableImage, prepare_image
from lenscap.core.errors import BackendError, MissingDependency, UsageError

__all__ = ["VllmBackend", "build_conversation"]


def build_conversation(request: CaptionRequest, max_side: int) -> list[dict[str, Any]]:
    """One request as an OpenAI-format conversation. Raises ``UnreadableImage``."""
    image = prepare_image(request.image, max_side)
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    messages.append(
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image.data_url()}},
                {"type": "text", "text": request.instruction},
            ],
        }
    )
    return messages


class VllmBackend(CaptionBackend):
    """vLLM's offline engine on a CUDA GPU (pip install vllm), batched."""

    name = "vllm"
    options = (
        Option(
            "model",
            str,
            None,
            "Hub id or local directory of a vision-language model vLLM supports.",
            panel=MODEL_PANEL,
            default_text="required",
        ),
        Option(
            "max_tokens",
            int,
            256,
            "Most new tokens per caption.",
            deprecated_names=("max_new_tokens",),
            panel=MODEL_PANEL,
        ),
        Option("temperature", float, 0.0, "Sampling temperature (0: greedy, repeatable).", panel=MODEL_PANEL),
        Option("batch_size", int, 256, "Conversations handed to the engine at once.", panel=LOCAL_PANEL),
        Option("max_side", int, 768, "Longest image side in pixels.", panel=MODEL_PANEL),
        Option("dtype", str, "auto", "Weights dtype.", choices=("auto", "float16", "bfloat16", "float32"), panel=LOCAL_PANEL),
        Option("tensor_parallel_size", int, 1, "GPUs to split the model over."),
        Option("gpu_memory_utilization", float, 0.9, "Share of GPU memory vLLM may take."),
    )

    def __init__(
        self,
        model: str | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
        batch_size: int = 256,
        max_side: int = 768,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        *,
        max_new_tokens: int | None = None,
    ) -> None:
        if not model:
            raise UsageError("--model is required for the vllm backend: a hub id or a local directory")
        max_tokens = renamed_keyword(self.name, max_tokens, max_new_tokens, 256)
        for flag, value in (
            ("--max-tokens", max_tokens),
            ("--batch-size", batch_size),
            ("--max-side", max_side),
            ("-O tensor_parallel_size", tensor_parallel_size),
        ):
            if value < 1:
                raise UsageError(f"{flag} must be at least 1, not {value}")
        self.model = model
        self.max_tokens, self.temperature, self.batch_size, self.max_side = max_tokens, temperature, batch_size, max_side
        self.engine_args = {
            "dtype": dtype,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "limit_mm_per_prompt": {"image": 1},
        }
        self._llm: Any = None

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
            "temperature": self.temperature,
            "max_side": self.max_side,
        }

    def parameters(self) -> dict[str, Any]:
        parameters = self.identity()
        parameters["max_tokens"] = parameters.pop("max_new_tokens")
        return parameters

    def check(self) -> None:
        try:
            import vllm  # noqa: F401 - optional: vLLM is on GPU machines only
        except ImportError:
            raise MissingDependency(
                "the vllm backend needs vLLM, on a machine with a CUDA GPU: pip install vllm "
                "(or use --backend transformers, or --backend batch-files for vllm run-batch elsewhere)"
            ) from None
        try:
            import torch  # optional (the local extra) and slow to import
        except ImportError:
            raise MissingDependency("the vllm backend needs torch with CUDA") from None
        if not torch.cuda.is_available():
            raise BackendError(
                "the vllm backend needs a CUDA GPU and none is visible here "
                "(use --backend transformers on CPU, or --backend batch-files and run vllm run-batch on a GPU machine)"
            )

    def setup(self) -> None:
        from vllm import LLM  # optional: vLLM is on GPU machines only

        try:
            self._llm = LLM(model=self.model, **self.engine_args)
        except Exception as e:  # noqa: BLE001 - engine start-up fails in many ways; one line says which
            raise BackendError(
                f"vLLM cannot start {self.model}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from None

    def caption_all(self, requests: Iterable[CaptionRequest], on_result: Callable[[CaptionResult], None]) -> None:
        from vllm import SamplingParams  # optional: vLLM is on GPU machines only

        params = SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature)
        batch: list[tuple[str, list[dict[str, Any]]]] = []

        def flush() -> None:
            outputs = self._llm.chat([conv for _, conv in batch], params, use_tqdm=False)
            for (key, _), out in zip(batch, outputs, strict=True):
                on_result(interpret_output(key, out, self.max_tokens))
            batch.clear()

        for request in requests:
            try:
                batch.append((request.key, build_conversation(request, self.max_side)))
            except UnreadableImage as e:
                on_result(CaptionResult(request.key, ERROR, error=str(e)))
            if len(batch) >= self.batch_size:
                flush()
        if batch:
            flush()


def interpret_output(key: str, output: Any, max_tokens: int) -> CaptionResult:
    """A vLLM RequestOutput as an outcome: finish_reason "length" is ``truncated``."""
    completion = output.outputs[0]
    return generated(
        key,
        completion.text or "",
        completion.finish_reason == "length",
        f"--max-tokens {max_tokens}",
        len(output.prompt_token_ids or []),
        len(completion.token_ids),
    )
