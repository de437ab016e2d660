"""lenscap audit: captions per second per core, and peak RSS at 10k and at 1M captions.

    .venv/bin/python bench/audit.py [--work DIR] [--quick] [--small 10000] [--large 1000000]

The target: "the audit of 1M captions runs in bounded memory (peak RSS at 1M <= 1.3x at 10k) at
>= 20,000 captions/s per core". The datasets are synthetic and rows only (no images: the audit reads
the caption columns, never an image): shards of 10,000 rows written as lenscap writes them (parquet,
``_stats.json`` through ``lenscap.core.commits``'s commit, ``lenscap.json``), captions of about 109 words
(70 to 150) drawn from a Zipf-distributed vocabulary of 20,000 words (a few not ASCII: it’s, café, an
em dash) in sentences, a third opening with a template ("The image shows ..."), and a few refusals,
loops, truncations, exact and near duplicates (some across shards). They are kept under ``--work``
(default: a temporary directory), so a rerun with the same ``--work`` generates nothing.

Each measurement is one ``lenscap`` command in a process of its own (``--processes 1``, so the scan
runs in that process, and so does the global pass over its spill files); its peak RSS and CPU time (user + sys)
come from ``wait4``, for that process alone. The baseline, measured in the same run on the same
dataset: ``lenscap inspect --json``, which reads every caption and counts its words in Python (and
checks nothing else). Captions per core is the captions over the process's CPU seconds (start-up and
the global pass included; the wall-clock rate is printed too, but the machine's other load moves it).
``--quick`` measures 10k and 100k instead of 10k and 1M. Machines are shared and noisy: the ratio
against the baseline, measured in the same run, says more than either number alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lenscap.core.dataset import Dataset
from lenscap.core.layout import parquet_name
from lenscap.core.manifest import shard_stats

PER_SHARD = 10_000
VOCABULARY = 20_000
GENERATOR = "v2"  # bumped when the generated data change: cached datasets of another version are not reused
TARGET_RATE, TARGET_RSS_RATIO = 20_000, 1.3
MODEL, PROMPT, PROMPT_SHA = "gpt-4.1-mini", "lens", "3f2a9c0d5e7b1a48"

_COMMON = (
    "the a of and with in on is to at its an are by from this that as it two one image background "
    "white black blue red green large small wooden man woman person people table sky wall front left right "
    "side near top light dark water tree building street sign text there has shows while under over which "
    "bottom center three several some standing sitting wearing holding it’s — café façade “open” naïve"
).split()
_SYLLABLES = (
    "ba be bi bo bu ca ce ci co cu da de di do du fa fe fi fo ga ge gi go ha he hi ho ka ke ki ko la le li lo "
    "lu ma me mi mo mu na ne ni no nu pa pe pi po pu ra re ri ro ru sa se si so su ta te ti to tu va ve vi "
    "vo wa we wi ya yo za ze an en in on un ar er ir or ur al el il ol ul st tr ch sh th ng nd ck"
).split()
_TEMPLATES = ("The image shows", "This image depicts", "The photograph shows", "In this image, there is")
_REFUSALS = (
    "I'm sorry, but I can't help with identifying people in this image.",
    "I cannot describe this image because it appears to contain sensitive content.",
    "As an AI, I am unable to describe the contents of this image in detail.",
)


def _vocabulary(rng: np.random.Generator) -> np.ndarray:
    """``VOCABULARY`` distinct words, most frequent first: common English words, then made-up ones,
    shorter ones more frequent (as in English)."""
    words = list(dict.fromkeys(_COMMON))
    seen = set(words)
    syllables = np.array(_SYLLABLES)
    while len(words) < VOCABULARY:
        parts = 1 + min(int(rng.exponential(0.5 + 2.5 * len(words) / VOCABULARY)), 4)
        word = "".join(rng.choice(syllables, parts))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return np.array(words, dtype=object)


class Generator:
    """Captions (and the rest of a row) for shard after shard, vectorised: word indices from numpy,
    text joined by pyarrow kernels. Deterministic in the shard id."""

    def __init__(self) -> None:
        rng = np.random.default_rng(20_000)
        vocab = _vocabulary(rng)
        self.v = len(vocab)
        ranks = np.arange(1, self.v + 1, dtype=np.float64)
        weights = 1.0 / (ranks + 2.7) ** 1.07  # Zipf-Mandelbrot, near English word frequencies
        self.cdf = np.cumsum(weights) / weights.sum()
        capital = np.array([w[:1].upper() + w[1:] for w in vocab], dtype=object)
        # token index = variant * V + word; variants: plain, Capitalised, "word.", "Word.", "word,", "Word,"
        variants = [vocab, capital, vocab + ".", capital + ".", vocab + ",", capital + ","]
        self.tokens = pa.array(np.concatenate([*variants, np.array(_TEMPLATES, dtype=object)]).tolist(), pa.string())
        self.template_base = 6 * self.v
        self.vocab = vocab
        self.pool = self.captions(np.random.default_rng(7), 40)  # stock captions, repeated across shards

    def words(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(self.cdf, rng.random(n)), self.v - 1).astype(np.int64)

    def captions(
        self, rng: np.random.Generator, n: int, truncated: np.ndarray | None = None, templated: np.ndarray | None = None
    ) -> pa.Array:
        lengths = np.clip(np.rint(rng.normal(109, 20, n)), 70, 150).astype(np.int64)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        firsts, lasts = offsets[:-1], offsets[1:] - 1
        end = rng.random(total) < 1 / 14  # sentences of 14 words on average
        end[firsts] = False
        end[lasts] = True if truncated is None else ~truncated
        start = np.zeros(total, bool)
        start[1:] = end[:-1]
        start[firsts] = True
        comma = (rng.random(total) < 0.06) & ~end
        index = (start + 2 * end + 4 * comma) * self.v + self.words(rng, total)
        if templated is not None and templated.any():
            rows = np.flatnonzero(templated)
            index[firsts[rows]] = self.template_base + rng.integers(0, len(_TEMPLATES), len(rows))
        flat = self.tokens.take(pa.array(index))
        lists = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), flat)
        return pc.binary_join(lists, " ")

    def shard(self, shard_id: int) -> pa.Table:
        n = PER_SHARD
        rng = np.random.default_rng(1_000_003 + shard_id)
        u = rng.random(n)
        kind = np.select([u < 0.003, u < 0.005, u < 0.015, u < 0.020, u < 0.022], [1, 2, 3, 4, 5], 0)
        # 1 refusal, 2 loop, 3 exact duplicate of a caption of the shard, 4 near duplicate, 5 stock caption
        truncated = rng.random(n) < 0.005
        templated = rng.random(n) < 0.33
        captions = self.captions(rng, n, truncated, templated)
        override: list[str | None] = [None] * n
        sources = rng.integers(0, n, n)
        copied = captions.take(pa.array(sources)).to_pylist() if (kind >= 2).any() else []
        for i in np.flatnonzero(kind):
            k = int(kind[i])
            if k == 1:
                override[i] = _REFUSALS[i % len(_REFUSALS)]
            elif k == 2:
                head = copied[i].split()[:30]
                phrase = " ".join(head[-8:]).rstrip(".,")
                override[i] = " ".join(head) + " " + " ".join([phrase] * 10) + "."
            elif k == 3:
                override[i] = copied[i]
            elif k == 4:
                words = copied[i].split()
                j = int(rng.integers(1, len(words) - 1))
                words[j] = str(self.vocab[int(rng.integers(0, self.v))])
                override[i] = " ".join(words)
            else:
                override[i] = self.pool[int(rng.integers(0, len(self.pool)))].as_py()
        caption = pc.coalesce(pa.array(override, pa.string()), captions)
        alt_lengths = rng.integers(2, 9, n)
        alt_offsets = np.zeros(n + 1, np.int32)
        np.cumsum(alt_lengths, out=alt_offsets[1:])
        total = int(alt_offsets[-1])
        alt_words = self.tokens.take(pa.array(self.words(rng, total) + self.v * rng.integers(0, 2, total)))  # some Capitalised
        alt_text = pc.binary_join(pa.ListArray.from_arrays(pa.array(alt_offsets), alt_words), " ")
        keys = pa.array([f"{shard_id:05d}{i:05d}" for i in range(n)], pa.string())
        return pa.table(
            {
                "key": keys,
                "status": pa.array(np.full(n, "success", dtype=object), pa.string()),
                "caption": caption,
                "caption_status": pa.array(np.full(n, "ok", dtype=object), pa.string()),
                "caption_model": pa.array(np.full(n, MODEL, dtype=object), pa.string()),
                "caption_prompt": pa.array(np.full(n, PROMPT, dtype=object), pa.string()),
                "caption_prompt_sha": pa.array(np.full(n, PROMPT_SHA, dtype=object), pa.string()),
                "alt_text": alt_text,
            }
        )


def generate(path: Path, captions: int, gen: Generator | None = None) -> Path:
    """A rows-only captioned dataset of ``captions`` rows at ``path``; kept as it is if a previous run
    finished writing it (its manifest counts them)."""
    manifest = path / "lenscap.json"
    if manifest.exists():
        info = json.loads(manifest.read_text())
        if info.get("parameters", {}).get("bench_generator") == GENERATOR and info.get("counts", {}).get("samples") == captions:
            return path
    if path.exists():
        shutil.rmtree(path)  # another generator's, or a run stopped while writing it
    gen = gen or Generator()
    start = time.perf_counter()
    ds = Dataset.create(path)
    shards = (captions + PER_SHARD - 1) // PER_SHARD
    for shard_id in range(shards):
        table = gen.shard(shard_id)
        if shard_id == shards - 1 and captions % PER_SHARD:
            table = table.slice(0, captions % PER_SHARD)
        tmp = ds.staging_file(parquet_name(shard_id))
        pq.write_table(table, tmp)
        ds.commit(shard_id, {parquet_name(shard_id): tmp}, shard_stats(shard_id, table) | {"stage": "caption"})
    ds.write_manifest("caption", {"bench_generator": GENERATOR, "model": MODEL, "prompt": PROMPT}, None, expected_shards=shards)
    print(f"generated {captions:,} captions in {shards} shards at {path} in {time.perf_counter() - start:.1f} s", flush=True)
    return path


def measure(argv: list[str]) -> dict[str, float]:
    """Run ``lenscap ARGV`` in a process of its own: wall seconds, CPU seconds (user + sys) and peak
    RSS (MB) of that process alone (``wait4``), and its JSON output."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lenscap.cli", *argv], stdout=subprocess.PIPE)
    out = proc.stdout.read() if proc.stdout is not None else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"lenscap {' '.join(argv)} exited with {code}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss / 1024, "out": json.loads(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", help="where the generated datasets are kept between runs (default: a temporary directory)")
    ap.add_argument("--quick", action="store_true", help="10k and 100k captions instead of 10k and 1M")
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--large", type=int, default=None, help="default 1,000,000 (100,000 with --quick)")
    a = ap.parse_args()
    large = a.large or (100_000 if a.quick else 1_000_000)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory(prefix="lenscap-bench-audit-") as tmp:
        work = Path(a.work) if a.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        gen = Generator()
        small = generate(work / f"captions-{a.small}", a.small, gen)
        big = generate(work / f"captions-{large}", large, gen)
        audit = ["audit", "--json", "-q", "--processes", "1"]
        runs: dict[str, dict[int, dict[str, float]]] = {"audit": {}, "inspect": {}}
        for n, path in ((a.small, small), (large, big)):
            runs["audit"][n] = measure([*audit, str(path)])
            runs["inspect"][n] = measure(["inspect", "--json", str(path)])
            for name in ("audit", "inspect"):
                r = runs[name][n]
                print(
                    f"{name:8s} {n:>9,} captions: {r['wall']:6.1f} s wall, {r['cpu']:6.1f} s CPU, "
                    f"{n / r['wall']:>8,.0f} captions/s, {n / r['cpu']:>8,.0f} per CPU-second, peak RSS {r['rss']:.0f} MB",
                    flush=True,
                )
        out = runs["audit"][large]["out"]
        assert out["captions"] == large, out["captions"]
        counts = {k: v for k, v in out["counts"].items() if v}
        print(
            f"\naudit of {large:,}: flags {counts}; words p50 {out['words']['p50']}, template_top1 "
            f"{out['template_top1']}, distinct_1 {out['distinct_1']}"
        )
        ours, base, first = runs["audit"][large], runs["inspect"][large], runs["audit"][a.small]
        wall_rate, cpu_rate = large / ours["wall"], large / ours["cpu"]
        print(
            f"audit / inspect speed at {large:,}: {base['wall'] / ours['wall']:.2f} (wall), {base['cpu'] / ours['cpu']:.2f} (CPU)"
        )
        print(
            f"audit beyond its fixed cost (start-up, imports; the {a.small:,} run's): "
            f"{(large - a.small) / max(ours['cpu'] - first['cpu'], 1e-9):,.0f} captions per CPU-second"
        )
        ratio = ours["rss"] / first["rss"]
        print(
            f"audit peak RSS {a.small:,} -> {large:,} captions: {first['rss']:.0f} -> {ours['rss']:.0f} MB, "
            f"ratio {ratio:.2f} (target <= {TARGET_RSS_RATIO})"
        )
        print(
            f"{'PASS' if cpu_rate >= TARGET_RATE else 'FAIL'} throughput: {cpu_rate:,.0f} captions per CPU-second "
            f"({wall_rate:,.0f} per wall second, one process; target >= {TARGET_RATE:,} per core)"
        )
        print(
            f"{'PASS' if ratio <= TARGET_RSS_RATIO else 'FAIL'} memory: peak RSS at {large:,} is {ratio:.2f}x that at "
            f"{a.small:,} (target <= {TARGET_RSS_RATIO}x)"
        )


if __name__ == "__main__":
    main()
