"""Memory does not grow with the dataset: peak RSS of each stage at a small and a large dataset.

    .venv/bin/python bench/memory.py [--small 1000] [--large 50000] [--stages semantic,...]

Each stage runs as its own ``lenscap`` command with ``--processes 1``, so the process measured is
the one doing the per-shard work; its peak RSS is read from ``wait4``, for that process alone.
Shards hold 1,000 samples at both sizes (memory may grow with the shard, never with the number of
shards). The baseline is the same stage on the small dataset, measured in the same run; the ratio
large / small should stay within 1.2. ``caption`` runs against lenscap's fake OpenAI-compatible
server in a process of its own; ``dedup``'s global pass is in the measured process too. ``semantic`` is
``dedup --semantic`` on the downloaded dataset, whose embeddings are planted (random 512-dimension unit
vectors, 1% of them near copies of another, kept as the sidecars a CLIP pass writes), so no model runs:
what is measured is the k-means, the assignment and the search within clusters (the semantic extra).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from extras import missing  # noqa: E402

from lenscap.core.dataset import Dataset
from lenscap.demo.datasets import write_image_dataset
from lenscap.demo.pictures import jpeg_bytes, photo
from lenscap.embed.store import embeddings_name, write_embeddings
from lenscap.testing.fake_openai import FakeOpenAIProcess

PER_SHARD = 1000
PLANTED_MODEL, PLANTED_DIM = "planted/clip-vit-base-patch32", 512
STAGES = ("filter", "caption", "dedup", "shard", "report", "semantic")


def plant_embeddings(path: Path) -> None:
    """Kept embeddings for every sample of the dataset at ``path``, as if a CLIP pass had run."""
    ds = Dataset(path)
    (ds.path / "embeddings").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for shard in ds.completed_ids():
        keys = ds.read_table(shard, columns=["key"]).column("key").to_pylist()
        vectors = rng.standard_normal((len(keys), PLANTED_DIM)).astype(np.float32)
        near = rng.random(len(keys)) < 0.01  # a near copy of the row before
        vectors[1:][near[1:]] = vectors[:-1][near[1:]] + 0.1 * rng.standard_normal((int(near[1:].sum()), PLANTED_DIM))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        write_embeddings(ds.path / embeddings_name(shard), keys, vectors, PLANTED_MODEL)


def peak_rss_mb(argv: list[str]) -> tuple[float, float]:
    """Run ``lenscap ARGV``; the peak RSS in MB of that one process (``wait4``'s usage) and seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lenscap.cli", *argv, "--quiet"], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"lenscap {' '.join(argv)} exited with {proc.returncode}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=50_000)
    parser.add_argument("--stages", default=",".join(STAGES), help=f"some of {','.join(STAGES)}")
    args = parser.parse_args()
    chosen = args.stages.split(",")
    if "semantic" in chosen and missing("the semantic stage", "semantic", "faiss"):
        chosen.remove("semantic")
    with tempfile.TemporaryDirectory() as tmp, FakeOpenAIProcess("--no-decode") as api:
        work = Path(tmp)
        results: dict[str, dict[int, tuple[float, float]]] = {}
        for n in (args.small, args.large):
            # distinct photos, so that dedup keeps them all and shard and report see the whole dataset
            src = write_image_dataset(
                work / f"in{n}",
                n,
                per_shard=PER_SHARD,
                image=lambda i: jpeg_bytes(photo(i, (96, 72))),
                caption=lambda i: f"alt text number {i} of a small photo",
            ).path
            stages = {
                "filter": ["filter", str(src), str(work / f"filter{n}"), "--min-side", "32", "--annotate", "blur,uniform"],
                "caption": [
                    "caption",
                    str(work / f"filter{n}"),
                    str(work / f"caption{n}"),
                    "--backend",
                    "openai",
                    "--base-url",
                    api.base_url,
                    "--model",
                    "gpt-4.1-mini",
                    "--no-cache",
                ],
                "dedup": ["dedup", str(work / f"caption{n}"), str(work / f"dedup{n}")],
                "shard": ["shard", str(work / f"dedup{n}"), str(work / f"shard{n}"), "--target-size", "5MB"],
                "report": ["report", str(work / f"dedup{n}"), "--out", str(work / f"report{n}.html")],
                "semantic": ["dedup", str(src), str(work / f"semantic{n}"), "--semantic", "--embed-model", PLANTED_MODEL],
            }
            plant_embeddings(src)
            for name, argv in stages.items():
                if name not in chosen:
                    continue
                results.setdefault(name, {})[n] = peak_rss_mb([*argv, "--processes", "1"] if name != "report" else argv)
                print(
                    f"{name:8s} {n:>7,} samples: peak RSS {results[name][n][0]:.0f} MB, {results[name][n][1]:.1f} s", flush=True
                )
        print()
        for name, by_size in results.items():
            small, large = by_size[args.small][0], by_size[args.large][0]
            print(
                f"{name:8s} peak RSS {args.small:,} -> {args.large:,} samples: {small:.0f} -> {large:.0f} MB, "
                f"ratio {large / small:.2f} (target <= {1.3 if name == 'semantic' else 1.2})"
            )


if __name__ == "__main__":
    main()
