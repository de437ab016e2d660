"""The planning figure for ``dedup --semantic``'s embedding pass: CLIP image embeddings per second per
CPU core, with a model of ViT-B/32's size and architecture.

    .venv/bin/python bench/embed.py [--images 256] [--batch 32] [--threads 1]

The model is ``CLIPConfig()``'s defaults (a ViT-B/32 image tower: 12 layers, width 768, 32-pixel
patches at 224 pixels; the default ``--embed-model``, openai/clip-vit-base-patch32, has this shape),
randomly initialised and saved to a temporary directory, then loaded and run through lenscap's own
``ClipEmbedder``, so the figure includes the image processor (resize, crop, normalise) as a run does.
Random weights cost what trained ones do. Nothing is downloaded. The images are 640 x 480 photos
(``lenscap.demo.pictures.photo``), decoded from JPEG as a run decodes them. The baseline printed beside
the figure is the same run's image processor alone, to show what share of the time the model takes.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from extras import missing  # noqa: E402

from lenscap.demo.pictures import jpeg_bytes, photo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads: 1 gives the per-core figure")
    args = parser.parse_args()
    if missing("the embedding benchmark", "local", "torch", "transformers"):
        return
    import torch  # optional (the local extra)
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel  # optional (the local extra)

    from lenscap.embed.model import ClipEmbedder

    torch.set_num_threads(args.threads)
    jpegs = [jpeg_bytes(photo(i)) for i in range(args.images)]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig())
        params = sum(p.numel() for p in model.vision_model.parameters()) / 1e6
        model.save_pretrained(tmp)
        CLIPImageProcessor().save_pretrained(tmp)
        del model
        embedder = ClipEmbedder(tmp)
        decode = lambda data: Image.open(io.BytesIO(data)).convert("RGB")  # noqa: E731
        embedder.embed_images([decode(j) for j in jpegs[: args.batch]])  # warm-up
        started = time.perf_counter()
        for start in range(0, args.images, args.batch):
            embedder.embed_images([decode(j) for j in jpegs[start : start + args.batch]])
        seconds = time.perf_counter() - started
        processor = CLIPImageProcessor.from_pretrained(tmp)
        started = time.perf_counter()
        for start in range(0, args.images, args.batch):
            processor(images=[decode(j) for j in jpegs[start : start + args.batch]], return_tensors="pt")
        prep = time.perf_counter() - started
    rate = args.images / seconds
    print(
        f"ViT-B/32-sized CLIP image tower ({params:.0f}M parameters, dim {embedder.dim}), {args.threads} thread(s), "
        f"batch {args.batch}: {rate:.1f} images/s ({rate / args.threads:.1f} per core); "
        f"decode and image processor alone: {args.images / prep:.0f} images/s ({prep / seconds:.0%} of the time)"
    )
    print(f"800M images at this rate: {800e6 / (rate / args.threads) / 3600:,.0f} core-hours")


if __name__ == "__main__":
    main()
