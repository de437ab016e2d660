"""One embedding pass, many users: the CLIP-score and aesthetic annotators read the image embeddings
kept with a dataset (or one of its inputs) by the same model, and never run the image tower for them;
and the filter keeps the embeddings they used in its own output, for dedup --semantic or a later filter.

A tiny random CLIP (projection_dim 8) and a tiny aesthetic predictor of matching input size, saved as
the published one is (a state dict with ``layers.N`` keys), so the real loading paths run."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pyarrow as pa
import pytest
from conftest import run_cli_here
from PIL import Image
from test_caption import rows
from tiny_models import build_tiny_clip

from lenscap import api
from lenscap.core.dataset import Dataset
from lenscap.demo.datasets import write_image_dataset
from lenscap.embed.store import KeptEmbeddings, embeddings_name, write_embeddings
from lenscap.plugin import Annotator

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

N = 8


@contextlib.contextmanager
def image_tower_calls():
    """Counts forward passes of CLIP's image tower, whoever calls it."""
    calls = []
    real = transformers.CLIPModel.get_image_features

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformers.CLIPModel, "get_image_features", counted)
        yield calls


def decoded(sample) -> Image.Image:
    return Image.open(io.BytesIO(sample.image)).convert("RGB")  # 320x240: as filter decodes them


def keep_embeddings(ds: Dataset, vectors_of, model: str) -> None:
    """Each shard's sidecar, as a pass that embeds would keep it."""
    (ds.path / embeddings_name(0)).parent.mkdir(exist_ok=True)
    for shard_id in ds.completed_ids():
        samples = list(ds.iter_samples(shard_id))
        write_embeddings(ds.path / embeddings_name(shard_id), [s.key for s in samples], vectors_of(samples), model)


def save_predictor(path, dim: int, seed: int):
    """A random predictor saved as improved-aesthetic-predictor saves its MLP: its module's state dict."""
    from lenscap.filter.annotators.aesthetic import predictor_layers

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = predictor_layers(dim)

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(MLP().state_dict(), path)
    return path


def predicted(weights_path, unit: np.ndarray) -> float:
    """The predictor by hand: five linear layers, no activation (dropout is off at inference)."""
    state = torch.load(weights_path, weights_only=True)
    x = unit.astype(np.float64)
    for i in (0, 2, 4, 6, 7):
        x = state[f"layers.{i}.weight"].double().numpy() @ x + state[f"layers.{i}.bias"].double().numpy()
    return float(x[0])


class KeptFirst(Annotator):
    """A plugin's annotator that reads the kept embeddings of the model it names: its score is the
    vector's first component (null where none is kept)."""

    name = "kept-first"
    columns = (pa.field("kept_first", pa.float64()),)
    score = "kept_first"
    keep_above = True

    def __init__(self, threshold: float | None = None, model: str = "") -> None:
        self.model = model
        super().__init__(threshold)

    def embedding_model(self) -> str:
        return self.model

    def annotate(self, image, sample):
        vector = self.kept_embedding(sample)
        if vector is not None:
            self.record_embedding(sample, vector)
        return {self.score: None if vector is None else float(vector[0])}


def scores(path) -> dict[str, tuple[float, float]]:
    return {k: (r["clip_score"], r["aesthetic_score"]) for k, r in rows(path).items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("embeddings")
    model = str(build_tiny_clip(base / "clip"))
    weights = save_predictor(base / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth", 8, seed=1)
    from lenscap.embed.model import ClipEmbedder

    embedder = ClipEmbedder(model)
    plain = write_image_dataset(base / "plain", N, per_shard=4)
    embedded = write_image_dataset(base / "embedded", N, per_shard=4)
    keep_embeddings(embedded, lambda samples: embedder.embed_images([decoded(s) for s in samples]), model)
    other = write_image_dataset(base / "other", N, per_shard=4)
    rng = np.random.default_rng(0)
    keep_embeddings(other, lambda samples: rng.normal(size=(len(samples), 8)), "someone/else-clip")
    flags = ("--annotate", "clip,aesthetic", "--clip-model", model, "--aesthetic-clip-model", model)
    flags += ("--aesthetic-weights", str(weights.parent), "--processes", "1", "--json", "--quiet")
    with image_tower_calls() as calls:
        code, out, err = run_cli_here("filter", str(plain.path), str(base / "plain-out"), *flags)
    assert code == 0, err
    return {
        "base": base,
        "model": model,
        "weights": weights,
        "embedder": embedder,
        "plain": plain,
        "embedded": embedded,
        "other": other,
        "flags": flags,
        "plain_calls": len(calls),
        "plain_scores": scores(base / "plain-out"),
    }


def test_without_kept_embeddings_each_image_is_embedded_and_scored_by_the_real_predictor(world):
    assert world["plain_calls"] >= N, "no kept embeddings: the image tower runs for every image"
    got = world["plain_scores"]
    assert len(got) == N and len({a for _, a in got.values()}) == N and len({c for c, _ in got.values()}) > 1
    ds = world["plain"]
    for shard_id in ds.completed_ids():
        samples = list(ds.iter_samples(shard_id))
        units = world["embedder"].embed_images([decoded(s) for s in samples])
        texts = world["embedder"].embed_texts([s.caption for s in samples])
        for s, unit, text in zip(samples, units, texts, strict=True):
            clip, aesthetic = got[s.key]
            assert clip == pytest.approx(100 * float(unit @ text), abs=1e-3)
            assert aesthetic == pytest.approx(predicted(world["weights"], unit), abs=1e-3)


def test_kept_embeddings_of_an_input_dataset_replace_the_image_tower(world):
    """Kept by the dataset upstream of the filter's input (found through its manifest): zero image-tower
    calls, and the scores those of the computed embeddings, within float16 rounding."""
    base = world["base"]
    code, _, err = run_cli_here("filter", str(world["embedded"].path), str(base / "mid"), "--processes", "1", "--quiet")
    assert code == 0, err
    with image_tower_calls() as calls:
        code, out, err = run_cli_here("filter", str(base / "mid"), str(base / "reused"), *world["flags"])
    assert code == 0, err
    assert json.loads(out)["kept"] == N
    assert len(calls) == 0, "every image's embedding was kept: the image tower never runs"
    reused, plain = scores(base / "reused"), world["plain_scores"]
    assert reused.keys() == plain.keys()
    for key, (clip, aesthetic) in reused.items():
        assert clip == pytest.approx(plain[key][0], abs=0.05)  # 100 x a cosine of float16-rounded unit vectors
        assert aesthetic == pytest.approx(plain[key][1], abs=1e-3)  # well inside the random predictor's spread (about 0.02)


def test_kept_embeddings_of_another_model_are_not_used(world):
    base = world["base"]
    with image_tower_calls() as calls:
        code, _, err = run_cli_here("filter", str(world["other"].path), str(base / "other-out"), *world["flags"])
    assert code == 0, err
    assert len(calls) == world["plain_calls"], "kept by another model: embedded again, as with none kept"
    assert scores(base / "other-out") == world["plain_scores"]


def test_aesthetic_weights_by_hub_id_are_fetched_through_the_hub(world, monkeypatch):
    import huggingface_hub

    from lenscap.filter.annotators.aesthetic import AESTHETIC_FILE, DEFAULT_AESTHETIC_WEIGHTS, Aesthetic, weights_file

    asked = []

    def download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return str(world["weights"])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert weights_file(DEFAULT_AESTHETIC_WEIGHTS) == world["weights"]
    assert weights_file("someone/predictor") == world["weights"]
    assert weights_file(str(world["weights"])) == world["weights"]  # a local file: no download
    assert asked == [("camenduru/improved-aesthetic-predictor", AESTHETIC_FILE), ("someone/predictor", AESTHETIC_FILE)]
    assert Aesthetic(None).weights == DEFAULT_AESTHETIC_WEIGHTS


def test_aesthetic_weights_that_cannot_be_used_are_one_line_and_exit_2(world):
    base, model = world["base"], world["model"]
    src = str(world["plain"].path)
    wide = save_predictor(base / "wide" / "predictor.pth", 16, seed=2)
    not_torch = base / "junk" / "predictor.pth"
    not_torch.parent.mkdir()
    not_torch.write_bytes(b"not a pytorch file")
    cases = {
        str(base / "nowhere.pth"): "cannot load aesthetic weights",
        str(wide): "score 16-dimensional embeddings; " + model + " gives 8",
        str(not_torch): "cannot load aesthetic weights",
    }
    for i, (weights, said) in enumerate(cases.items()):
        code, _, err = run_cli_here(
            "filter", src, str(base / f"bad{i}"), "--annotate", "aesthetic", "--aesthetic-clip-model", model,
            "--aesthetic-weights", weights, "--processes", "1", "--quiet",
        )  # fmt: skip
        assert code == 2 and said in err and "Traceback" not in err, (weights, code, err)


def test_a_plugin_annotator_is_offered_the_kept_embeddings_of_the_model_it_names(world):
    other, base = world["other"], world["base"]
    kept = KeptEmbeddings.find(other, "someone/else-clip")
    planted = {k: float(v[0]) for i in other.completed_ids() for k, v in kept.shard(i).items()}
    assert len(planted) == N
    api.filter(other.path, base / "plugin", annotators=[KeptFirst(model="someone/else-clip")], processes=1)
    assert {k: r["kept_first"] for k, r in rows(base / "plugin").items()} == planted
    # The vectors it recorded, reused from upstream, are kept in the output too: the nearest dataset
    # with that model's sidecars holds every row's.
    nearest = KeptEmbeddings.find(Dataset(base / "plugin"), "someone/else-clip")
    assert nearest.dataset.path == base / "plugin"
    assert {k: float(v[0]) for i in other.completed_ids() for k, v in nearest.shard(i).items()} == planted
    api.filter(other.path, base / "plugin-none", annotators=[KeptFirst(model="nobody/kept-this")], processes=1)
    assert {r["kept_first"] for r in rows(base / "plugin-none").values()} == {None}


def sidecars(path) -> dict[str, pa.Table]:
    """Each shard's kept embeddings in a dataset directory, by file name."""
    import pyarrow.parquet as pq

    return {p.name: pq.read_table(p) for p in sorted((path / "embeddings").glob("*.parquet"))}


def test_filter_keeps_the_embeddings_it_computed_with_each_shard(world):
    """The plain filter (nothing kept upstream) wrote each shard's sidecar, committed with the shard:
    its model named, one float16 row per embedded sample, the tiny CLIP's vectors."""
    base, model, ds = world["base"], world["model"], world["plain"]
    out = Dataset(base / "plain-out")
    kept = sidecars(out.path)
    assert sorted(kept) == [embeddings_name(i).split("/")[1] for i in ds.completed_ids()]
    for table in kept.values():
        assert table.schema.metadata[b"lenscap.embedding_model"] == model.encode()
        assert table.schema.field("embedding").type == pa.list_(pa.float16(), 8)
    found = KeptEmbeddings.find(out, model)
    assert found is not None and found.dataset.path == out.path
    for shard_id in ds.completed_ids():
        samples = list(ds.iter_samples(shard_id))
        vectors = found.shard(shard_id)
        assert sorted(vectors) == sorted(s.key for s in samples)
        computed = world["embedder"].embed_images([decoded(s) for s in samples])
        got = np.stack([vectors[s.key] for s in samples])
        np.testing.assert_allclose(got, computed, atol=1e-3)  # float16 keeps about three digits
        stats = out.read_stats(shard_id)
        assert embeddings_name(shard_id) in stats["files"], "the sidecar is committed, and vouched for, with the shard"
    assert out.damaged_shards() == {}
    assert json.loads((out.path / "lenscap.json").read_text())["parameters"]["keep_embeddings"] == model


def test_a_filter_after_a_filter_reuses_the_embeddings_the_first_one_kept(world):
    """What dedup --semantic after filter does: the first filter's output keeps the embeddings, so the
    next pass over it runs no image tower; scores as the first computed them (float16 rounding)."""
    base = world["base"]
    with image_tower_calls() as calls:
        code, out, err = run_cli_here("filter", str(base / "plain-out"), str(base / "again"), *world["flags"])
    assert code == 0, err
    assert len(calls) == 0
    nearest = KeptEmbeddings.find(Dataset(base / "again"), world["model"])
    assert nearest.dataset.path == base / "again", "the vectors it reused are kept in its output too"
    again, plain = scores(base / "again"), world["plain_scores"]
    assert again.keys() == plain.keys()
    for key, (clip, aesthetic) in again.items():
        assert clip == pytest.approx(plain[key][0], abs=0.05)
        assert aesthetic == pytest.approx(plain[key][1], abs=1e-3)


def test_the_first_annotator_by_cost_decides_the_kept_model_and_no_keep_embeddings_keeps_none(world):
    base, model, other = world["base"], world["model"], world["other"]
    both = [KeptFirst(model="someone/else-clip")]  # cost rank 50: after clip's 4
    api.filter(other.path, base / "two-models", annotators=both, annotate="clip", clip_model=model, processes=1)
    assert {t.schema.metadata[b"lenscap.embedding_model"] for t in sidecars(base / "two-models").values()} == {model.encode()}
    assert KeptEmbeddings.find(Dataset(base / "two-models"), model).dataset.path == base / "two-models"
    code, _, err = run_cli_here("filter", str(world["plain"].path), str(base / "unkept"), *world["flags"], "--no-keep-embeddings")
    assert code == 0, err
    assert sidecars(base / "unkept") == {}
    assert rows(base / "unkept").keys() == world["plain_scores"].keys()


def test_a_shard_whose_sidecar_is_gone_is_done_again_and_overwrite_clears_sidecars(world):
    base = world["base"]
    code, _, err = run_cli_here("filter", str(world["plain"].path), str(base / "resumed"), *world["flags"])
    assert code == 0, err
    out = Dataset(base / "resumed")
    (out.path / embeddings_name(1)).unlink()
    assert list(out.damaged_shards()) == [1]
    code, _, err = run_cli_here("filter", str(world["plain"].path), str(base / "resumed"), *world["flags"])
    assert code == 0, err
    assert (out.path / embeddings_name(1)).exists() and out.damaged_shards() == {}
    code, _, err = run_cli_here("filter", str(world["plain"].path), str(base / "resumed"), "--overwrite", "--quiet")
    assert code == 0, err
    assert sidecars(base / "resumed") == {}, "--overwrite clears what the other job kept"


def test_a_remote_output_keeps_its_embeddings_too(world, monkeypatch, tmp_path):
    """memory:// (an object store's code path): the sidecar is staged in the work directory and
    uploaded with the shard, vouched for by its stats, and the next filter reads it."""
    import uuid

    import fsspec

    monkeypatch.setenv("LENSCAP_WORK_DIR", str(tmp_path / "work"))
    root = f"keep{uuid.uuid4().hex[:8]}"
    remote = f"memory://{root}"
    try:
        code, _, err = run_cli_here("filter", str(world["plain"].path), remote, *world["flags"])
        assert code == 0, err
        out = Dataset.open(remote)
        assert out.damaged_shards() == {}
        assert all(embeddings_name(i) in out.read_stats(i)["files"] for i in out.completed_ids())
        with image_tower_calls() as calls:
            code, _, err = run_cli_here("filter", remote, str(tmp_path / "after-remote"), *world["flags"])
        assert code == 0, err
        assert len(calls) == 0
    finally:
        fsspec.filesystem("memory").rm(f"/{root}", recursive=True)


def test_dedup_semantic_after_filter_embeds_nothing_again(world):
    """The demo's order, download -> filter -> dedup: the filter's kept vectors feed dedup --semantic,
    which runs no image tower and keeps them in its own output under the same model."""
    base, model = world["base"], world["model"]
    with image_tower_calls() as calls:
        code, out, err = run_cli_here(
            "dedup", str(base / "plain-out"), str(base / "deduped"), "--semantic", "--embed-model", model, "--json"
        )
    assert code == 0, err
    assert len(calls) == 0
    kept = KeptEmbeddings.find(Dataset(base / "deduped"), model)
    assert kept is not None and kept.dataset.path == base / "deduped"
    assert json.loads((base / "deduped" / "lenscap.json").read_text())["embeddings"]["model"] == model
