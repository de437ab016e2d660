"""One embedding pass, many users: the CLIP-score and aesthetic annotators read the image embeddings
kept with a dataset (or one of its inputs) by the same model, and never run the image tower for them.

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
    api.filter(other.path, base / "plugin-none", annotators=[KeptFirst(model="nobody/kept-this")], processes=1)
    assert {r["kept_first"] for r in rows(base / "plugin-none").values()} == {None}
