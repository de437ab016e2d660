"""``lenscap filter``: each rule and annotator on generated images with known answers, exact counts per
reason, the blocklist, --dry-run, bad input, plugins, and resume after SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import run_cli
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from test_caption import rows, tar_members
from tiny_models import build_tiny_clip

from lenscap.core.dataset import Dataset
from lenscap.demo.datasets import write_image_dataset
from lenscap.demo.pictures import cartoon_face, jpeg_bytes, png_bytes, scene, truncated_jpeg

ROOT = Path(__file__).resolve().parent.parent


def reasons(summary: dict) -> dict:
    return {k: v for k, v in summary["reasons"].items() if k != "kept"}


def sizes_dataset(tmp_path) -> Path:
    """10 samples with known sizes, bytes and captions."""
    spec = {  # i: (size, caption)
        0: ((640, 480), "a red square on a white wall in the morning light"),
        1: ((100, 400), "a tall thin picture of a lamp post on a street"),  # short side 100, aspect 4
        2: ((600, 600), "tiny"),  # one word
        3: ((800, 600), "a large photo " + "word " * 60),  # 64 words
        4: ((640, 480), "a stock photo of a smiling businessman at a desk today"),
        5: ((256, 256), "a small square picture of a blue circle on green"),
        6: ((1200, 300), "a wide banner of yellow triangles in a row again"),  # aspect 4
        7: ((640, 480), "a failed download that never arrived at all here"),
        8: ((500, 500), "a solid grey square that compresses to few bytes"),
        9: ((640, 480), "an ordinary scene of shapes on a coloured background"),
    }

    def image(i):
        if i == 8:
            return jpeg_bytes(Image.new("RGB", spec[i][0], (128, 128, 128)))
        return jpeg_bytes(scene(i, spec[i][0]))

    return write_image_dataset(
        tmp_path / "in", 10, per_shard=5, image=image, caption=lambda i: spec[i][1], failed=lambda i: i == 7
    ).path


def test_each_cheap_rule_with_exact_counts(tmp_path):
    src = sizes_dataset(tmp_path)
    r = run_cli(
        "filter",
        str(src),
        str(tmp_path / "out"),
        "--min-side",
        "200",
        "--max-aspect",
        "3",
        "--min-bytes",
        "5000",
        "--caption-min-words",
        "3",
        "--caption-max-words",
        "40",
        "--where",
        "caption NOT ILIKE '%stock%'",
        "--json",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert reasons(summary) == {
        "status": 1,
        "min-side": 1,
        "max-aspect": 1,
        "min-bytes": 1,
        "caption-min-words": 1,
        "caption-max-words": 1,
        "where": 1,
    }
    assert summary["kept"] == 3
    got = rows(tmp_path / "out")
    assert {k for k, v in got.items() if v["filter_status"] == "kept"} == {"000000000", "000000005", "000000009"}
    assert got["000000001"]["filter_detail"] == "shorter side 100 < 200"
    assert got["000000006"]["filter_detail"] == "aspect ratio 4.0 > 3"
    assert got["000000002"]["filter_detail"] == "1 words < 3"
    assert got["000000004"]["filter_detail"] == "not (caption NOT ILIKE '%stock%')"
    assert got["000000008"]["filter_reason"] == "min-bytes"
    out = Dataset.open(tmp_path / "out")
    assert not list(out.path.glob("*.tar")), "rows only: the images stay in the input"
    assert sorted(s.key for i in out.completed_ids() for s in out.iter_samples(i) if s.has_image) == [
        "000000000",
        "000000005",
        "000000009",
    ]
    assert len(got) == 10, "dropped samples stay in the parquet with their reason"
    copied = run_cli(
        "filter",
        str(src),
        str(tmp_path / "copy"),
        "--min-side",
        "200",
        "--max-aspect",
        "3",
        "--min-bytes",
        "5000",
        "--caption-min-words",
        "3",
        "--caption-max-words",
        "40",
        "--where",
        "caption NOT ILIKE '%stock%'",
        "--copy-images",
        "--quiet",
    )
    assert copied.returncode == 0, copied.stderr
    members = tar_members(tmp_path / "copy")
    assert sorted(m for m in members if m.endswith(".jpg")) == ["000000000.jpg", "000000005.jpg", "000000009.jpg"]

    def without_offset(table: dict) -> dict:  # offsets point into another tar; every other column is the same
        return {k: {c: v for c, v in row.items() if c != "image_offset"} for k, row in table.items()}

    assert without_offset(rows(tmp_path / "copy")) == without_offset(got)
    dry = run_cli(
        "filter",
        str(src),
        str(tmp_path / "dry"),
        "--min-side",
        "200",
        "--max-aspect",
        "3",
        "--min-bytes",
        "5000",
        "--caption-min-words",
        "3",
        "--caption-max-words",
        "40",
        "--where",
        "caption NOT ILIKE '%stock%'",
        "--dry-run",
        "--json",
    )
    assert json.loads(dry.stdout)["reasons"] == summary["reasons"]
    assert not (tmp_path / "dry").exists(), "--dry-run writes nothing"
    everything = json.loads(run_cli("filter", str(src), str(tmp_path / "all"), "--status", "any", "--json", "--quiet").stdout)
    assert everything["kept"] == 10


def test_annotators_blur_uniform_ocr_faces_on_known_images(tmp_path):
    sharp = scene(1, (400, 300))
    text = Image.new("RGB", (480, 160), "white")
    ImageDraw.Draw(text).text((20, 50), "SALE 50%", fill="black", font=ImageFont.load_default(size=56))
    images = {
        0: jpeg_bytes(sharp),
        1: jpeg_bytes(sharp.filter(ImageFilter.GaussianBlur(6))),
        2: png_bytes(Image.new("RGB", (300, 200), (40, 90, 200))),
        3: png_bytes(text),
        4: jpeg_bytes(cartoon_face(300)),
    }
    src = write_image_dataset(tmp_path / "in", 5, image=lambda i: images[i]).path
    r = run_cli(
        "filter", str(src), str(tmp_path / "out"), "--annotate", "blur,uniform,ocr,faces", "--status", "any", "--json", "--quiet"
    )
    assert r.returncode == 0, r.stderr
    got = rows(tmp_path / "out")
    blur = {k: v["blur_laplacian_var"] for k, v in got.items()}
    assert blur["000000000"] > 10 * blur["000000001"], blur
    assert got["000000002"]["uniform_dominant_share"] == 1.0 and got["000000000"]["uniform_dominant_share"] < 0.9
    assert got["000000003"]["ocr_text"] == "SALE 50%" and 0.05 < got["000000003"]["ocr_text_area"] < 0.6
    assert got["000000000"]["ocr_text"] is None and got["000000000"]["ocr_text_area"] == 0
    assert {k: v["faces_count"] for k, v in got.items()} == {f"{i:09d}": int(i == 4) for i in range(5)}
    assert all(v["filter_status"] == "kept" for v in got.values()), "scores only: no threshold given"
    r = run_cli(
        "filter",
        str(src),
        str(tmp_path / "cut"),
        "--min-sharpness",
        str(blur["000000001"] * 2),
        "--max-uniformity",
        "0.95",
        "--max-text-area",
        "0.05",
        "--max-faces",
        "0",
        "--json",
        "--quiet",
    )
    summary = json.loads(r.stdout)
    assert reasons(summary) == {"uniform": 1, "blur": 1, "ocr": 1, "faces": 1} and summary["kept"] == 1
    cut = rows(tmp_path / "cut")
    assert cut["000000002"]["filter_detail"] == "uniform_dominant_share 1 > 0.95"
    assert cut["000000002"]["blur_laplacian_var"] is None, "uniform runs first and its drop skips the rest"


def test_clip_score_with_a_tiny_random_clip(tmp_path):
    model = build_tiny_clip(tmp_path / "clip")
    src = write_image_dataset(tmp_path / "in", 8).path
    env = {"HF_HUB_OFFLINE": "1"}
    r = run_cli(
        "filter",
        str(src),
        str(tmp_path / "scores"),
        "--annotate",
        "clip",
        "--clip-model",
        str(model),
        "--json",
        "--quiet",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    scores = sorted(v["clip_score"] for v in rows(tmp_path / "scores").values())
    assert all(-100 <= s <= 100 for s in scores) and len(set(scores)) > 1
    cut = (scores[3] + scores[4]) / 2
    r = run_cli(
        "filter",
        str(src),
        str(tmp_path / "cut"),
        "--min-clip-score",
        str(cut),
        "--clip-model",
        str(model),
        "--json",
        "--quiet",
        env=env,
    )
    assert json.loads(r.stdout)["reasons"] == {"kept": 4, "clip": 4}
    again = sorted(v["clip_score"] for v in rows(tmp_path / "cut").values())
    assert again == scores, "same weights, same scores"
    r = run_cli(
        "filter", str(src), str(tmp_path / "bad"), "--annotate", "clip", "--clip-model", str(tmp_path / "nowhere"), env=env
    )
    assert r.returncode == 2 and "cannot load CLIP model" in r.stderr


def test_nsfw_needs_its_extra_and_scores_exposed_classes(tmp_path):
    src = write_image_dataset(tmp_path / "in", 2).path
    r = run_cli("filter", str(src), str(tmp_path / "out"), "--annotate", "nsfw")
    assert r.returncode == 2 and "needs the nsfw extra (NudeNet, AGPL-3.0): pip install 'lenscap-datasets[nsfw]'" in r.stderr
    stub = tmp_path / "stub" / "nudenet"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text(
        "class NudeDetector:\n"
        "    def detect(self, image):\n"
        "        return [{'class': 'FACE_FEMALE', 'score': 0.95}, {'class': 'BUTTOCKS_EXPOSED', 'score': 0.7}]\n"
    )
    r = run_cli(
        "filter", str(src), str(tmp_path / "out"), "--max-nsfw", "0.5", "--json", "--quiet", env={"PYTHONPATH": str(stub.parent)}
    )
    assert r.returncode == 7, r.stderr  # every sample dropped: the output holds 0 samples
    got = rows(tmp_path / "out")["000000000"]
    assert (got["nsfw_score"], got["nsfw_labels"], got["filter_reason"]) == (0.7, "BUTTOCKS_EXPOSED", "nsfw")


def test_blocklist_by_md5_and_sha256(tmp_path):
    images = {i: jpeg_bytes(scene(i, (200, 150))) for i in range(4)}
    src = write_image_dataset(tmp_path / "in", 4, image=lambda i: images[i]).path
    block = tmp_path / "block.txt"
    block.write_text(
        f"# known bad\n{hashlib.md5(images[1]).hexdigest()}\n{hashlib.sha256(images[2]).hexdigest().upper()}  # upper case ok\n"
    )
    r = run_cli("filter", str(src), str(tmp_path / "out"), "--blocklist", str(block), "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    assert reasons(json.loads(r.stdout)) == {"blocklist": 2}
    assert rows(tmp_path / "out")["000000001"]["filter_detail"].startswith("md5 ")
    block.write_text("not-a-hash\n")
    r = run_cli("filter", str(src), str(tmp_path / "o2"), "--blocklist", str(block))
    assert r.returncode == 2 and "line 1: expected an MD5 or SHA-256 hex digest" in r.stderr


def test_bad_input(tmp_path):
    images = {0: jpeg_bytes(scene(0)), 1: truncated_jpeg(1), 2: b"<html>not an image</html>"}
    src = write_image_dataset(tmp_path / "in", 3, image=lambda i: images[i]).path
    r = run_cli("filter", str(src), str(tmp_path / "o1"), "--where", "widht > 3")
    assert r.returncode == 2 and 'Referenced column "widht" not found' in r.stderr and not (tmp_path / "o1").exists()
    r = run_cli("filter", str(src), str(tmp_path / "o1"), "--where", "width > AND 3")
    assert r.returncode == 2 and "Parser Error" in r.stderr
    r = run_cli("filter", str(src), str(tmp_path / "o1"), "--annotate", "sparkle")
    assert (
        r.returncode == 2
        and "unknown annotator 'sparkle'; installed annotators: aesthetic, blur, clip, faces, nsfw, ocr, uniform" in r.stderr
    )
    r = run_cli("filter", str(src), str(tmp_path / "o2"), "--annotate", "blur", "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    got = rows(tmp_path / "o2")
    assert got["000000001"]["filter_status"] == "error" and "cannot decode image" in got["000000001"]["filter_error"]
    assert got["000000002"]["filter_status"] == "error" and got["000000000"]["filter_status"] == "kept"


def test_a_third_party_annotator_installs_and_filters(tmp_path):
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
            str(ROOT / "examples" / "lenscap-redness-filter"),
        ],
        check=True,
        capture_output=True,
    )
    images = {
        0: jpeg_bytes(Image.new("RGB", (100, 100), (220, 20, 20))),
        1: jpeg_bytes(Image.new("RGB", (100, 100), (20, 20, 220))),
    }
    src = write_image_dataset(tmp_path / "in", 2, image=lambda i: images[i]).path
    r = run_cli(
        "filter",
        str(src),
        str(tmp_path / "out"),
        "--threshold",
        "redness=0.5",
        "--json",
        "--quiet",
        env={"PYTHONPATH": str(target)},
    )
    assert r.returncode == 0, r.stderr
    got = rows(tmp_path / "out")
    assert got["000000000"]["filter_reason"] == "redness" and got["000000000"]["redness_share"] == 1.0
    assert got["000000001"]["filter_status"] == "kept"


def test_captioning_a_filtered_dataset_skips_the_dropped(tmp_path):
    src = sizes_dataset(tmp_path)
    assert run_cli("filter", str(src), str(tmp_path / "f"), "--min-side", "200", "--quiet").returncode == 0
    r = run_cli(
        "caption",
        str(tmp_path / "f"),
        str(tmp_path / "c"),
        "--backend",
        "describe",
        "--json",
        "--quiet",
        env={"LENSCAP_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert r.returncode == 0, r.stderr
    got = rows(tmp_path / "c")
    assert got["000000001"]["caption_error"] == "no image (filter: min-side)"
    assert json.loads(r.stdout)["caption_status"] == {"ok": 8, "skipped": 2}


def test_sigkill_then_rerun_matches_an_uninterrupted_run(tmp_path):
    src = write_image_dataset(tmp_path / "in", 120, per_shard=6, size=(160, 120)).path
    args = ["filter", str(src), str(tmp_path / "out"), "--annotate", "blur,uniform", "--max-uniformity", "0.5", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "lenscap.cli", *args], start_new_session=True)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if len(list((tmp_path / "out").glob("*_stats.json"))) >= 3 if (tmp_path / "out").exists() else False:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(Dataset(tmp_path / "out").completed_ids())
    assert 0 < done < 20, done
    assert run_cli(*args).returncode == 0
    assert run_cli("filter", str(src), str(tmp_path / "clean"), *args[3:]).returncode == 0
    assert rows(tmp_path / "out") == rows(tmp_path / "clean")
    assert tar_members(tmp_path / "out") == tar_members(tmp_path / "clean")


def test_where_is_one_expression_on_the_dataset_alone_and_rules_are_checked(tmp_path):
    """--where is SQL a user (or a recipe) wrote: it reads the shard's columns and nothing else; no file
    is read or written, and what is not one expression is refused. Values no rule can mean are refused."""
    from conftest import run_cli_here

    src = str(sizes_dataset(tmp_path))
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET\n")
    pwned = tmp_path / "pwned.csv"
    hostile = {
        f"(SELECT content FROM read_text('{secret}')) LIKE 'TOP%'": "file system operations are disabled",
        f"(SELECT count(*) FROM read_csv('{secret}')) > 0": "file system operations are disabled",
        f"(SELECT count(*) FROM glob('{tmp_path}/*')) > 0": "file system operations are disabled",
        f"true), false) THEN 1 END FROM t; COPY (SELECT 42) TO '{pwned}'; SELECT (coalesce((true": "one SQL expression",
        "width > 0) OR (true": "one SQL expression",
        "width > 0; SELECT 1": "one SQL expression",
        "   ": "--where is empty",
    }
    for where, message in hostile.items():
        code, _, err = run_cli_here("filter", src, str(tmp_path / "out"), "--where", where, "--quiet")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (where, err)
        assert not (tmp_path / "out").exists() and not pwned.exists()
    code, _, err = run_cli_here("filter", src, str(tmp_path / "out"), "--where", "widht > 3", "--quiet")
    assert code == 2 and 'column "widht" not found' in err and "(columns: key, " in err and "width, height" in err

    for flags, message in (
        (["--max-aspect", "-1"], "--max-aspect is a ratio of the longer side to the shorter one, at least 1"),
        (["--min-side", "-5"], "--min-side must not be negative"),
        (["--min-bytes", "-1"], "--min-bytes must not be negative"),
        (["--caption-min-words", "10", "--caption-max-words", "3"], "--caption-min-words 10 is more than --caption-max-words 3"),
    ):
        for dry in ([], ["--dry-run"]):
            code, _, err = run_cli_here("filter", src, str(tmp_path / "out"), *flags, *dry, "--quiet")
            assert code == 2 and message in err, (flags, err)
            assert not (tmp_path / "out").exists()

    # A fair expression still works, the same as before.
    code, out, err = run_cli_here(
        "filter", src, str(tmp_path / "out"), "--where", "width >= 200 AND caption ILIKE '%a%'", "--json", "--quiet"
    )
    assert code == 0, err
