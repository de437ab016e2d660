"""Backends as plugins, and the local ones: describe, transformers (a tiny random LLaVA built from a
config), vllm (request building and its errors where it cannot run), --hints ocr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli
from PIL import Image, ImageDraw, ImageFont
from test_caption import rows
from tiny_models import build_text_only_model, build_tiny_llava

from lenscap.caption.backends.base import CaptionRequest
from lenscap.demo.datasets import write_image_dataset
from lenscap.demo.pictures import cartoon_face, jpeg_bytes, png_bytes, scene
from lenscap.testing.fake_openai import FakeOpenAI

ROOT = Path(__file__).resolve().parent.parent
BUILTINS = [
    "anthropic",
    "anthropic-batch",
    "batch-files",
    "describe",
    "gemini",
    "gemini-batch",
    "openai",
    "openai-batch",
    "transformers",
    "vllm",
]


@pytest.fixture
def env(tmp_path):
    return {"OPENAI_API_KEY": None, "OPENAI_BASE_URL": None, "LENSCAP_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}


def text_image(text: str, size=(480, 160)) -> bytes:
    im = Image.new("RGB", size, "white")
    ImageDraw.Draw(im).text((20, 50), text, fill="black", font=ImageFont.load_default(size=56))
    return png_bytes(im)


# -- the registry ---------------------------------------------------------------------------------


def test_backends_lists_builtins_with_their_options(env):
    r = run_cli("backends", "--json", env=env)
    assert r.returncode == 0, r.stderr
    found = {b["name"]: b for b in json.loads(r.stdout)["backends"]}
    assert sorted(found) == BUILTINS
    assert all(b["source"] == "lenscap (built-in)" for b in found.values())
    assert found["openai"]["needs_key"] and not found["describe"]["needs_key"]
    assert found["gemini"]["needs_key"] and found["gemini"]["priced"] and found["gemini-batch"]["batch"]
    assert {"model", "device", "dtype", "batch_size", "max_tokens"} <= {o["name"] for o in found["transformers"]["options"]}
    tokens = next(o for o in found["vllm"]["options"] if o["name"] == "max_tokens")
    assert tokens["deprecated_names"] == ["max_new_tokens"], "the local backends' old name is still accepted"
    text = run_cli("backends", env=env).stdout
    assert "-O ocr=..." in text and "--rpm" in text


def test_a_third_party_backend_package_installs_and_captions(tmp_path, env):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT / "examples" / "lenscap-echo-backend"),
        ],
        check=True,
        capture_output=True,
    )
    plugin_env = {**env, "PYTHONPATH": str(target)}
    found = {b["name"]: b for b in json.loads(run_cli("backends", "--json", env=plugin_env).stdout)["backends"]}
    assert found["echo"]["source"] == "lenscap-echo-backend 0.1.0"
    assert [o["name"] for o in found["echo"]["options"]] == ["prefix", "upper"]
    src = write_image_dataset(tmp_path / "in", 3).path
    r = run_cli(
        "caption",
        str(src),
        str(tmp_path / "out"),
        "--backend",
        "echo",
        "-O",
        "prefix=Echo: ",
        "-O",
        "upper=yes",
        "--prompt",
        "short",
        "--json",
        "--quiet",
        env=plugin_env,
    )
    assert r.returncode == 0, r.stderr
    got = rows(tmp_path / "out")
    assert got["000000000"]["caption"] == "ECHO: 320X240 IMAGE; ASKED: DESCRIBE THIS IMAGE IN"
    assert got["000000000"]["caption_backend"] == "echo"
    r = run_cli("caption", str(src), str(tmp_path / "o2"), "--backend", "echo", "-O", "colour=red", env=plugin_env)
    assert r.returncode == 2 and "backend 'echo' has no option 'colour' (its options: prefix, upper)" in r.stderr
    r = run_cli("caption", str(src), str(tmp_path / "o2"), "--backend", "echo", "-O", "upper=perhaps", env=plugin_env)
    assert r.returncode == 2 and "-O upper=perhaps: upper takes true or false, not 'perhaps'" in r.stderr


def test_unknown_backend_names_the_installed_ones(tmp_path, env):
    src = write_image_dataset(tmp_path / "in", 1).path
    r = run_cli("caption", str(src), str(tmp_path / "out"), "--backend", "llava-magic", env=env)
    assert r.returncode == 2 and f"installed backends: {', '.join(BUILTINS)}" in r.stderr


# -- describe -------------------------------------------------------------------------------------


def test_describe_says_what_the_pixels_say(tmp_path, env):
    images = {
        0: jpeg_bytes(Image.new("RGB", (800, 400), (200, 30, 30))),  # red, wide
        1: jpeg_bytes(Image.new("RGB", (300, 600), (15, 15, 15))),  # black, tall, dark
        2: text_image("SALE 50%"),  # white with black text
        3: jpeg_bytes(cartoon_face(300)),
    }
    src = write_image_dataset(tmp_path / "in", 4, image=lambda i: images[i]).path
    r = run_cli("caption", str(src), str(tmp_path / "out"), "--backend", "describe", "-O", "ocr=on", "--json", "--quiet", env=env)
    assert r.returncode == 0, r.stderr
    got = {k: v["caption"] for k, v in rows(tmp_path / "out").items()}
    assert (
        got["000000000"] == "A medium-sized landscape image (800x400 pixels), mostly red. It is dim, with low contrast."
    )  # luma 81
    assert got["000000001"].startswith("A medium-sized portrait image (300x600 pixels), mostly black. It is dark")
    assert 'Visible text reads "SALE 50%".' in got["000000002"]
    assert got["000000003"].endswith("1 face is visible.") and "face" not in got["000000000"]
    row = rows(tmp_path / "out")["000000000"]
    assert row["caption_model"].startswith("describe-1+ocr") and row["caption_cost_usd"] == 0


# -- --hints ocr ----------------------------------------------------------------------------------


def test_hints_ocr_gives_the_api_the_text_in_the_image(tmp_path, env):
    src = write_image_dataset(
        tmp_path / "in", 2, image=lambda i: text_image("OPEN 24 HOURS") if i == 0 else jpeg_bytes(scene(i))
    ).path
    with FakeOpenAI() as fake:
        r = run_cli("caption", str(src), str(tmp_path / "out"), "--base-url", fake.base_url, "--hints", "ocr", "--quiet", env=env)
        assert r.returncode == 0, r.stderr
        texts = list(fake.recent_texts)
    assert sum('<ocr_text>"OPEN 24 HOURS"</ocr_text>' in t for t in texts) == 1
    assert sum("<ocr_text>" in t for t in texts) == 1, "an image without text gets no hint"
    manifest = json.loads((tmp_path / "out" / "lenscap.json").read_text())
    assert manifest["parameters"]["hints"] == ["ocr"]
    # What the hint said is kept with the caption, so the audit can check the caption quotes it.
    assert rows(tmp_path / "out")["000000000"]["caption_ocr_text"] == "OPEN 24 HOURS"
    assert rows(tmp_path / "out")["000000001"]["caption_ocr_text"] == ""
    from lenscap.api import audit

    assert {k: audit(tmp_path / "out")["ocr"][k] for k in ("known", "with_text")} == {"known": 2, "with_text": 1}
    r = run_cli("caption", str(src), str(tmp_path / "o2"), "--hints", "captions", env=env)
    assert r.returncode == 2 and "--hints knows only ocr" in r.stderr


# -- transformers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "ok": build_tiny_llava(root / "forced-eos", forced_eos=True),
        "cut": build_tiny_llava(root / "plain", forced_eos=False),
    }


def test_transformers_backend_captions_through_the_shard_machinery(tmp_path, env, tiny_llava):
    src = write_image_dataset(tmp_path / "in", 7, per_shard=4, failed=lambda i: i == 2).path
    args = [
        "caption",
        str(src),
        str(tmp_path / "out"),
        "--backend",
        "transformers",
        "--model",
        str(tiny_llava["ok"]),
        "--max-tokens",
        "5",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--json",
        "--quiet",
    ]
    r = run_cli(*args, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["caption_status"] == {"ok": 6, "skipped": 1}
    got = rows(tmp_path / "out")
    row = got["000000000"]
    assert 1 <= len(row["caption"].split()) <= 4  # 5 new tokens, the last one EOS (special tokens are not words)
    assert (row["caption_backend"], row["caption_model"], row["caption_cost_usd"]) == ("transformers", str(tiny_llava["ok"]), 0.0)
    assert row["caption_input_tokens"] > 0 and row["caption_output_tokens"] == 5
    assert json.loads((tmp_path / "out" / "lenscap.json").read_text())["parameters"]["max_tokens"] == 5
    again = run_cli(*args[:2], str(tmp_path / "again"), *args[3:], "--no-cache", env=env)
    assert again.returncode == 0
    assert {k: v["caption"] for k, v in rows(tmp_path / "again").items()} == {k: v["caption"] for k, v in got.items()}, (
        "greedy: repeatable"
    )


def test_transformers_reply_cut_at_max_tokens_is_truncated(tmp_path, env, tiny_llava):
    src = write_image_dataset(tmp_path / "in", 2).path
    r = run_cli(
        "caption",
        str(src),
        str(tmp_path / "out"),
        "--backend",
        "transformers",
        "--model",
        str(tiny_llava["cut"]),
        "--max-tokens",
        "3",
        "--json",
        "--quiet",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["caption_status"] == {"truncated": 2}
    row = rows(tmp_path / "out")["000000000"]
    assert row["caption_error"].startswith("reply cut at --max-tokens 3: ") and row["caption"] == row["alt_text"]
    # The old name, for one release: -O max_new_tokens=3 is the same job (it resumes the same output, from the same cache).
    again = run_cli(
        "caption",
        str(src),
        str(tmp_path / "out"),
        "--backend",
        "transformers",
        "--model",
        str(tiny_llava["cut"]),
        "-O",
        "max_new_tokens=3",
        "--json",
        "--quiet",
        env=env,
    )
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["caption_status"] == {"truncated": 2}
    r = run_cli(
        "caption",
        str(src),
        str(tmp_path / "o2"),
        "--backend",
        "transformers",
        "--model",
        str(tiny_llava["cut"]),
        "--max-tokens",
        "3",
        "-O",
        "max_new_tokens=4",
        env=env,
    )
    assert r.returncode == 2 and "disagree" in r.stderr


def test_transformers_bad_input(tmp_path, env):
    src = write_image_dataset(tmp_path / "in", 1).path
    base = ["caption", str(src), str(tmp_path / "out"), "--backend", "transformers"]
    r = run_cli(*base, env=env)
    assert r.returncode == 2 and "--model is required for the transformers backend" in r.stderr
    r = run_cli(*base, "--model", str(tmp_path / "no-such-model"), env=env)
    assert r.returncode == 2 and f"model directory {tmp_path / 'no-such-model'} does not exist" in r.stderr
    text_only = build_text_only_model(tmp_path / "llama")
    r = run_cli(*base, "--model", str(text_only), env=env)
    assert r.returncode == 2 and "is not an image-text-to-text model (model_type 'llama')" in r.stderr
    r = run_cli(*base, "--model", str(text_only), "--rpm", "10", env=env)
    assert r.returncode == 2 and "backend 'transformers' has no option 'rpm'" in r.stderr
    blocker = tmp_path / "block" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is not installed (test)')\n")
    r = run_cli(*base, "--model", str(text_only), env={**env, "PYTHONPATH": str(blocker.parent)})
    assert r.returncode == 2 and "needs the local extra: pip install 'lenscap-datasets[local]'" in r.stderr
    assert "Traceback" not in r.stderr


def test_gpu_out_of_memory_halves_the_batch(tiny_llava, monkeypatch):
    import torch

    from lenscap.caption.backends.transformers_local import TransformersBackend

    backend = TransformersBackend(model=str(tiny_llava["ok"]), device="cpu", batch_size=4, max_tokens=3)
    backend.setup()
    real = backend._generate
    sizes: list[int] = []

    def generate(items):
        sizes.append(len(items))
        if len(items) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(items)

    monkeypatch.setattr(backend, "_generate", generate)
    results = []
    backend.caption_all(
        [CaptionRequest(str(i), jpeg_bytes(scene(i, (64, 48))), None, "describe this picture") for i in range(5)], results.append
    )
    assert sorted(r.key for r in results) == ["0", "1", "2", "3", "4"] and {r.status for r in results} == {"ok"}
    assert backend.batch_size == 1 and sizes[:3] == [4, 2, 1]


# -- vllm -----------------------------------------------------------------------------------------


def test_vllm_request_building_and_output_reading():
    from types import SimpleNamespace

    from lenscap.caption.backends.vllm_local import build_conversation, interpret_output

    conv = build_conversation(CaptionRequest("k", jpeg_bytes(scene(1, (1600, 800))), "be factual", "describe"), max_side=768)
    assert conv[0] == {"role": "system", "content": "be factual"}
    image, text = conv[1]["content"]
    assert image["image_url"]["url"].startswith("data:image/jpeg;base64,") and text == {"type": "text", "text": "describe"}
    out = SimpleNamespace(
        prompt_token_ids=[1] * 90, outputs=[SimpleNamespace(text=" A red  kite. ", token_ids=[5, 6, 7], finish_reason="stop")]
    )
    r = interpret_output("k", out, 64)
    assert (r.status, r.caption, r.input_tokens, r.output_tokens) == ("ok", "A red kite.", 90, 3)
    out.outputs[0].finish_reason = "length"
    cut = interpret_output("k", out, 64)
    assert cut.status == "truncated" and cut.error.startswith("reply cut at --max-tokens 64: ")


def test_vllm_says_what_is_missing(tmp_path, env):
    src = write_image_dataset(tmp_path / "in", 1).path
    base = ["caption", str(src), str(tmp_path / "out"), "--backend", "vllm", "--model", "llava-hf/llava-1.5-7b-hf"]
    r = run_cli(*base, env=env)
    assert r.returncode == 2 and "the vllm backend needs vLLM, on a machine with a CUDA GPU: pip install vllm" in r.stderr
    stub = tmp_path / "stub" / "vllm"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("")  # vllm importable, but this machine has no GPU
    r = run_cli(*base, env={**env, "PYTHONPATH": str(stub.parent), "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2 and "the vllm backend needs a CUDA GPU and none is visible here" in r.stderr
    assert not (tmp_path / "out").exists(), "checked before the output directory is touched"
