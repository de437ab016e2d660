"""dedup --semantic (SemDeDup): a tiny CLIP directory end to end (embeddings kept beside the output's
shards, named in its manifest; exact copies merged), and planted embedding vectors for the tier's exact
behaviour: the threshold, the k-means clusters (never compared across), the keeper rule, --against,
kept embeddings reused with no model call, and a rerun after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest
from conftest import run_cli_here
from test_dedup import make_planted, planted, rows

from lenscap.core.dataset import Dataset
from lenscap.demo.datasets import write_image_dataset
from lenscap.demo.pictures import jpeg_bytes, photo
from lenscap.embed.model import ClipEmbedder
from lenscap.embed.store import KeptEmbeddings, embeddings_name, write_embeddings

pytest.importorskip("faiss")

# -- a tiny CLIP directory, end to end ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    pytest.importorskip("torch")
    from tiny_models import build_tiny_clip

    base = tmp_path_factory.mktemp("semantic")
    clip = build_tiny_clip(base / "clip")
    src = make_planted(base / "in")
    args = ("dedup", str(src), str(base / "out"), "--exact", "--semantic", "--embed-model", str(clip), "--json", "--quiet")
    code, out, err = run_cli_here(*args, "--processes", "1")
    assert code == 0, err
    return base, clip, json.loads(out)


def test_a_tiny_clip_directory_runs_end_to_end_and_its_embeddings_are_kept(tiny_run):
    base, clip, summary = tiny_run
    out = Dataset(base / "out")
    manifest = out.read_manifest()
    assert manifest["embeddings"] == {"model": str(clip), "dim": 8, "dtype": "float16", "dir": "embeddings"}
    got = rows(base / "out")
    decodable = {k for k, r in got.items() if r["dedup_status"] != "skipped" and planted(int(k))[0] != "broken"}
    kept = KeptEmbeddings.find(out, str(clip))
    assert kept is not None and kept.dataset.path == out.path and kept.dim == 8
    embedded = {k for shard in out.completed_ids() for k in kept.shard(shard)}
    assert embedded == decodable and len(embedded) > 90  # every image, none of the two undecodable ones
    for shard in out.completed_ids():  # committed with the shard: its stats vouch for the sidecar
        assert embeddings_name(shard) in out.read_stats(shard)["files"]
    assert not out.damaged_shards()
    # Exact copies are merged with their originals. Both tiers join them (their embeddings are equal);
    # a sample joined by several tiers is reported by the first, so they say exact, with no cosine.
    exact = [k for k in got if planted(int(k))[0] == "exact"]
    assert len(exact) == 10
    for key in exact:
        original = got[f"{planted(int(key))[1]:09d}"]
        assert got[key]["dup_cluster"] == original["dup_cluster"] is not None
        assert got[key]["dedup_status"] == "duplicate" and original["dedup_status"] in ("kept", "duplicate")
        assert got[key]["dup_tier"] == got[key]["dup_reason"] == "exact" and got[key]["dup_cosine"] is None
    # The rest are the semantic tier's (a random tiny CLIP finds every photo alike: nothing but the
    # tier's bookkeeping is checked here; the planted tests below check what it decides).
    semantic = [r for r in got.values() if r["dedup_status"] == "duplicate" and r["dup_tier"] != "exact"]
    assert semantic and {r["dup_tier"] for r in semantic} == {"semantic"} == {r["dup_reason"] for r in semantic}
    assert all(0.95 <= r["dup_cosine"] <= 1.0 and r["dup_distance"] is None for r in semantic)
    assert summary["semantic"]["embeddings"] == summary["semantic"]["embedded"] == len(embedded)
    assert summary["semantic"]["reused"] == 0


def test_against_a_folder_of_images_is_embedded_and_searched_at_the_semantic_tier(tiny_run, tmp_path):
    """Decontamination at every tier: an eval set given as a plain folder is embedded with the same
    model, and input images semantically near it go to it (--semantic alone: no hash can match)."""
    base, clip, _ = tiny_run
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg_bytes(photo(0, (160, 120))))
    args = ("dedup", str(base / "in"), str(tmp_path / "out"), "--semantic", "--embed-model", str(clip))
    code, out, err = run_cli_here(*args, "--against", str(folder), "--json", "--quiet", "--processes", "1")
    assert code == 0, err
    to_folder = [r for r in rows(tmp_path / "out").values() if r["dup_in"] == str(folder)]
    assert to_folder and {r["dup_tier"] for r in to_folder} == {"semantic"} and {r["dup_of"] for r in to_folder} == {"a.jpg"}


# -- planted embeddings --------------------------------------------------------------------------

DIM, MODEL, THRESHOLD = 16, "planted/clip", 0.9
A, B = 0, 1  # the two groups' axes; every other dimension is an offset of one sample


def axis(i: int) -> np.ndarray:
    v = np.zeros(DIM)
    v[i] = 1.0
    return v


def at_cosine(base: int, cos: float, offset: int) -> np.ndarray:
    """A unit vector at cosine ``cos`` to axis ``base``, leaning along its own axis ``offset``."""
    return cos * axis(base) + np.sqrt(1 - cos**2) * axis(offset)


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


# sample index -> (name, vector). Group A lies around axis A, group B around axis B: k-means splits them.
PLANTED = {
    0: ("a0", axis(A)),
    5: ("a_095", at_cosine(A, 0.95, 2)),  # a0 at 0.95: joined
    10: ("a_091", at_cosine(A, 0.91, 3)),  # a0 at 0.91: joined (0.95 x 0.91 = 0.86 to a_095)
    14: ("a_089", at_cosine(A, 0.89, 4)),  # a0 at 0.89: not (below 0.9)
    20: ("a_085", at_cosine(A, 0.85, 5)),  # not
    3: ("p", unit(axis(A) + 0.75 * axis(B))),  # nearer A's centroid ...
    19: ("q", unit(0.75 * axis(A) + axis(B))),  # ... and this nearer B's: cosine 0.96 to p, never compared
    2: ("b_first", axis(B)),  # three near copies across shards: the keeper rule
    9: ("b_largest", at_cosine(B, 0.99, 6)),
    17: ("b_third", at_cosine(B, 0.98, 7)),
}
FILLERS = [
    unit(axis(g) + s * 0.8 * axis(d)) for g, dims in ((A, (8, 9, 10)), (B, (11, 12, 13, 14))) for d in dims for s in (1, -1)
]
N = len(PLANTED) + len(FILLERS)  # 24: three shards of 8
LARGEST = 9


def vectors() -> dict[int, np.ndarray]:
    fillers = iter(FILLERS)
    return {i: PLANTED[i][1] if i in PLANTED else next(fillers) for i in range(N)}


def key(name: str) -> str:
    return next(f"{i:09d}" for i, (n, _) in PLANTED.items() if n == name)


def plant(path: Path, vecs: dict[int, np.ndarray], model: str = MODEL) -> Path:
    """A dataset of photos whose embeddings of ``model`` are kept already: ``vecs`` (index: vector)."""
    size = lambda i: (160, 120) if i == LARGEST else (96, 72)  # noqa: E731
    ds = write_image_dataset(path, len(vecs), per_shard=8, image=lambda i: jpeg_bytes(photo(i, size(i))))
    (ds.path / "embeddings").mkdir()
    for shard in ds.completed_ids():
        keys = ds.read_table(shard, columns=["key"]).column("key").to_pylist()
        write_embeddings(ds.path / embeddings_name(shard), keys, np.stack([vecs[int(k)] for k in keys]), model)
    return ds.path


@pytest.fixture
def no_model(monkeypatch):
    """Counts the image tower's forward passes (the executor runs in this process with --processes 1)."""
    calls = []
    monkeypatch.setattr(ClipEmbedder, "embed_images", lambda self, images: calls.append(len(images)))
    monkeypatch.setattr(ClipEmbedder, "__init__", lambda self, model: calls.append(model))
    return calls


def dedup(src: Path, out: Path, *extra: str) -> tuple[dict, dict[str, dict]]:
    args = ("--semantic", "--embed-model", MODEL, "--semantic-threshold", str(THRESHOLD), "--clusters", "2", "--processes", "1")
    code, stdout, err = run_cli_here("dedup", str(src), str(out), *args, "--json", "--quiet", *extra)
    assert code == 0, err
    return json.loads(stdout), rows(out)


@pytest.fixture(scope="module")
def planted_src(tmp_path_factory):
    return plant(tmp_path_factory.mktemp("planted") / "in", vectors())


def test_planted_threshold_clusters_and_keeper(planted_src, tmp_path, no_model):
    summary, got = dedup(planted_src, tmp_path / "out")
    assert no_model == []  # every embedding was kept already: the model is never loaded
    assert (summary["semantic"]["embedded"], summary["semantic"]["reused"]) == (0, N)
    by = {name: got[key(name)] for _, (name, _) in PLANTED.items()}
    # above the threshold: joined, with the cosine of the closest match
    assert by["a0"]["dedup_status"] == "kept"
    for name, cos in (("a_095", 0.95), ("a_091", 0.91)):
        assert by[name]["dedup_status"] == "duplicate" and by[name]["dup_of"] == key("a0")
        assert by[name]["dup_tier"] == by[name]["dup_reason"] == "semantic"
        assert by[name]["dup_cosine"] == pytest.approx(cos, abs=2e-3)
    # below it: not
    assert by["a_089"]["dedup_status"] == by["a_085"]["dedup_status"] == "unique"
    # p and q are within the threshold of each other but in different k-means clusters: never compared
    assert float(vectors()[3] @ vectors()[19]) == pytest.approx(0.96)
    assignment = duckdb.sql(f"SELECT key, cluster FROM '{tmp_path / 'out/.lenscap/dedup/semantic/assignment.parquet'}'")
    cluster = dict(assignment.fetchall())
    assert len(cluster) == N and cluster[key("p")] != cluster[key("q")]
    assert cluster[key("p")] == cluster[key("a0")] and cluster[key("q")] == cluster[key("b_first")]
    assert by["p"]["dedup_status"] == by["q"]["dedup_status"] == "unique"
    # the keeper rule: first in input order
    assert by["b_first"]["dedup_status"] == "kept"
    assert {by["b_largest"]["dup_of"], by["b_third"]["dup_of"]} == {key("b_first")}
    assert summary["duplicates"] == 4 and summary["duplicates_by_reason"] == {"semantic": 4}
    # nothing else: the fillers (0.61 or less to each other) are unique
    assert sum(r["dedup_status"] == "duplicate" for r in got.values()) == 4

    _, largest = dedup(planted_src, tmp_path / "largest", "--keep", "largest")
    assert largest[key("b_largest")]["dedup_status"] == "kept"
    assert {largest[key("b_first")]["dup_of"], largest[key("b_third")]["dup_of"]} == {key("b_largest")}
    assert no_model == []


def test_against_drops_samples_semantically_in_an_earlier_release(planted_src, tmp_path, no_model):
    # the earlier release holds a neighbour of a0 and one of b_first, at 0.93
    release = plant(tmp_path / "earlier", {0: at_cosine(A, 0.93, 15), 1: at_cosine(B, 0.93, 15)})
    _, got = dedup(planted_src, tmp_path / "out", "--against", str(release))
    dropped = {k for k, r in got.items() if r["dedup_status"] == "duplicate"}
    # a0 and b_first go to the release, and their neighbours with them (a cluster keeps its release sample)
    assert {key("a0"), key("b_first")} <= dropped
    assert got[key("a0")]["dup_in"] == str(release) and got[key("a0")]["dup_of"] == "000000000"
    assert got[key("a0")]["dup_cosine"] == pytest.approx(0.95, abs=2e-3)  # its closest match: a_095
    assert dropped == {key(n) for n in ("a0", "a_095", "a_091", "b_first", "b_largest", "b_third")}
    assert no_model == []


def test_a_dataset_without_kept_embeddings_is_embedded_once_then_reused(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from tiny_models import build_tiny_clip

    clip = str(build_tiny_clip(tmp_path / "clip"))
    src = write_image_dataset(tmp_path / "in", 12, per_shard=6, image=lambda i: jpeg_bytes(photo(i, (64, 48)))).path
    calls = []
    real = ClipEmbedder.embed_images
    monkeypatch.setattr(ClipEmbedder, "embed_images", lambda self, images: calls.append(len(images)) or real(self, images))
    base = ("--semantic", "--embed-model", clip, "--processes", "1", "--quiet")
    assert run_cli_here("dedup", str(src), str(tmp_path / "first"), *base)[0] == 0
    assert sum(calls) == 12  # one embedding per image
    calls.clear()
    # a later stage's output (here: dedup of the dedup) reuses them; so does --against of the first
    assert run_cli_here("dedup", str(tmp_path / "first"), str(tmp_path / "second"), *base)[0] == 0
    assert run_cli_here("dedup", str(src), str(tmp_path / "third"), *base, "--against", str(tmp_path / "first"))[0] == 0
    assert sum(calls) == 12  # only the third run's input, which keeps none, is embedded (again)


def test_bad_semantic_flags_are_one_line(planted_src, tmp_path):
    for args, message in (
        (["--semantic-threshold", "0.9"], "--semantic-threshold applies to --semantic"),
        (["--semantic", "--semantic-threshold", "1.5"], "--semantic-threshold must be above 0 and at most 1"),
        (["--semantic", "--clusters", "0"], "--clusters must be at least 1"),
        (["--semantic", "--embed-model", "./no/such/dir"], "no such directory"),
    ):
        code, _, err = run_cli_here("dedup", str(planted_src), str(tmp_path / "out"), "--quiet", *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)


def test_sigkill_then_rerun_decides_the_same(planted_src, tmp_path):
    """Killed in its passes (the first time once the signatures exist, then at once), a rerun decides
    what an uninterrupted run decides."""
    _, expected = dedup(planted_src, tmp_path / "whole")
    args = ["dedup", str(planted_src), str(tmp_path / "out"), "--semantic", "--embed-model", MODEL]
    args += ["--semantic-threshold", str(THRESHOLD), "--clusters", "2", "--processes", "1", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "lenscap.cli", *args], start_new_session=True)
    semantic = tmp_path / "out" / ".lenscap" / "dedup" / "semantic"
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and not semantic.exists():
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed in pass 2, not after
    code, _, err = run_cli_here(*args)
    assert code == 0, err
    assert rows(tmp_path / "out") == expected
    assert Dataset(tmp_path / "out").read_manifest()["embeddings"]["model"] == MODEL


def _components(n: int, pairs) -> list[int]:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    return [find(i) for i in range(n)]


@pytest.mark.parametrize("against", [False, True])
def test_a_clusters_edges_join_what_all_its_pairs_join(against):
    """600 vectors around 40 centres (so 2.3 blocks of rows, with chains across blocks): the few edges a
    task writes join exactly the components every pair above the threshold joins, and each sample's
    cosine is its closest match's; with --against no pair of two old samples counts."""
    from lenscap.dedup.semantic_pairs import SOURCE_SHIFT, cluster_edges

    rng = np.random.default_rng(5)
    n = 600
    centres = rng.standard_normal((40, 32))
    v = centres[rng.integers(0, 40, n)] + 0.35 * rng.standard_normal((n, 32))
    v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    old = rng.random(n) < 0.5 if against else np.zeros(n, dtype=bool)
    ids = np.arange(n, dtype=np.int64) | (old.astype(np.int64) << SOURCE_SHIFT)
    sims = v @ v.T
    allowed = ~(old[:, None] & old[None, :])
    np.fill_diagonal(allowed, False)
    pairs = [(i, j) for i, j in zip(*np.nonzero((sims >= 0.9) & allowed)) if i < j]
    a, b, cos = cluster_edges(ids, v, 0.9, against)
    index = {int(x): i for i, x in enumerate(ids)}
    edges = [(index[int(x)], index[int(y)]) for x, y in zip(a, b)]
    assert 50 < len(pairs) and len(edges) <= 2 * n
    assert _components(n, edges) == _components(n, pairs)
    best = np.where(allowed, sims, -np.inf).max(axis=1)
    got = {}
    for x, c in zip(a, cos):
        if not np.isnan(c):
            got[index[int(x)]] = c
    joined = {i for p in pairs for i in p}
    assert set(got) == joined
    assert all(got[i] == pytest.approx(min(best[i], 1.0), abs=1e-5) for i in joined)


def test_into_a_remote_output_the_sidecars_are_uploaded_with_their_shards(planted_src, tmp_path, monkeypatch):
    """memory:// (a store, in this process): the same rows as a local output, each shard's embeddings
    beside it, vouched for by its stats, so a rerun finds nothing damaged and rewrites nothing."""
    import uuid

    from fsspec.implementations.memory import MemoryFileSystem

    monkeypatch.setenv("LENSCAP_WORK_DIR", str(tmp_path / "work"))
    remote = f"memory://sem{uuid.uuid4().hex[:8]}/out"
    _, local = dedup(planted_src, tmp_path / "local")
    summary, _ = dedup(planted_src, remote)
    out = Dataset.open(remote)
    got = {r["key"]: r for shard in out.completed_ids() for r in out.read_table(shard).to_pylist()}
    assert got == local and summary["duplicates"] == 4
    kept = KeptEmbeddings.find(out, MODEL)
    assert kept is not None and kept.dataset.resolved == out.resolved
    assert {k for shard in out.completed_ids() for k in kept.shard(shard)} == set(local)
    assert not out.damaged_shards()
    before = {s: out.read_stats(s) for s in out.completed_ids()}
    dedup(planted_src, remote)
    assert {s: out.read_stats(s) for s in out.completed_ids()} == before  # nothing written again
    MemoryFileSystem().rm(remote.removeprefix("memory:/"), recursive=True)


def test_overwrite_without_semantic_takes_the_kept_embeddings_away(planted_src, tmp_path):
    dedup(planted_src, tmp_path / "out")
    assert (tmp_path / "out" / "embeddings").is_dir()
    code, _, err = run_cli_here("dedup", str(planted_src), str(tmp_path / "out"), "--overwrite", "--quiet", "--processes", "1")
    assert code == 0, err
    out = Dataset(tmp_path / "out")
    assert not (out.path / "embeddings").exists() and "embeddings" not in out.read_manifest()
    assert KeptEmbeddings.find(out, MODEL).dataset.path == planted_src  # the input's, through the manifest
