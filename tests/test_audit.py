"""lenscap audit: each planted caption defect found exactly, the --fail-on gate, --out flags that
filter --where reads, the comparison of two captionings, and the same numbers on any executor."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli_here

from lenscap.core.dataset import Dataset
from lenscap.core.record import Sample
from lenscap.demo.datasets import write_image_dataset
from lenscap.demo.pictures import jpeg_bytes, photo

VOCAB = (
    "red blue green yellow wooden metal glass stone cat dog horse tree river mountain sky cloud table chair lamp "
    "window door street car bicycle woman man child bird flower grass wall roof bridge boat lake sand shadow light "
    "morning evening field fence garden kitchen plate cup bottle book shelf painting mirror carpet bench hill road "
    "forest snow rain beach wave harbour tower church market crowd train station platform sign poster"
).split()


def dense(seed: int, words: int = 100) -> str:
    """A caption of ``words`` words, of its own (no trigram repeats, no shared opening), ending a sentence."""
    r = random.Random(seed)
    return "A " + " ".join(r.choice(VOCAB) for _ in range(words - 1)) + "."


# key -> (caption, caption_status, extra columns); everything else is a clean dense caption.
REFUSALS_IN_TEXT = {
    3: "I'm sorry, but I can't help with identifying the people in this image.",
    11: "I cannot describe this image because it may contain personal information.",
    24: "As an AI, I am unable to describe images of this kind.",
}
REFUSED_STATUS = (5, 30)  # caption_status refused: the caption column keeps the alt-text
LOOPS = {7: "A red car " + "and a red car " * 30 + "parked.", 33: "The cat sat on the mat, " * 20 + "and slept."}
MID_SENTENCE = {9: dense(9)[:-1] + " beside the", 40: dense(40)[:-1] + " and a"}
TRUNCATED_STATUS = (13,)
TEMPLATE = (14, 15, 16, 17, 18, 19)  # "The image shows ..."
DUPLICATES = {21: 20, 43: 42}  # 21 repeats 20 exactly; 43 is 42 with one word changed (another shard)
OCR = {  # key -> (ocr_text, caption): quoted, quoted, missed, quoted but also invented
    25: ("OPEN DAILY", dense(25)[:-1] + ', and a sign reads "OPEN DAILY".'),
    26: ("Joe's Coffee", dense(26)[:-1] + ", above a window painted with joe's coffee."),
    27: ("EXIT ONLY", dense(27)),
    28: ("OPEN", dense(28)[:-1] + ', a door marked open under a banner reading "FREE PARKING".'),
}
QUOTES_WITHOUT_OCR = {29: dense(29)[:-1] + ', with a poster reading "SUMMER SALE".'}
_RU = random.Random(35)
CYRILLIC = {
    35: " ".join(
        _RU.choice(
            "красная синяя машина стоит улица рядом дерево дом окно небо река гора птица собака кошка стол стул лампа".split()
        )
        for _ in range(90)
    )
    + "."
}
NOT_CAPTIONS = {36: ("failed_to_download", "skipped"), 37: ("success", "error")}
N = 48


def planted_rows() -> dict[str, dict]:
    rows = {}
    for i in range(N):
        caption, status = dense(1000 + i), "ok"
        row = {
            "status": "success",
            "alt_text": f"alt text {i}",
            "caption_model": "model-a" if i % 2 == 0 else "model-b",
            "caption_prompt": "lens",
            "caption_prompt_sha": "0123456789abcdef",
            "ocr_text": None,
            "ocr_text_area": None,
        }
        if i in REFUSALS_IN_TEXT:
            caption = REFUSALS_IN_TEXT[i]
        if i in REFUSED_STATUS:
            caption, status = row["alt_text"], "refused"
        if i in TRUNCATED_STATUS:
            caption, status = row["alt_text"], "truncated"
        caption = LOOPS.get(i, MID_SENTENCE.get(i, QUOTES_WITHOUT_OCR.get(i, CYRILLIC.get(i, caption))))
        if i in TEMPLATE:
            caption = "The image shows " + dense(2000 + i, 97)[2:]
        if i in DUPLICATES:
            caption = rows[f"{DUPLICATES[i]:09d}"]["caption"]
            if i == 43:
                caption = caption.replace(caption.split()[50], "zeppelin", 1)
        if i in OCR:
            row["ocr_text"], caption = OCR[i]
            row["ocr_text_area"] = 0.1
        elif i % 5 == 0:
            row["ocr_text_area"] = 0.0  # OCR ran and read nothing
        if i in NOT_CAPTIONS:
            row["status"], status = NOT_CAPTIONS[i]
        rows[f"{i:09d}"] = row | {"caption": caption, "caption_status": status}
    return rows


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Iterator[tuple[Path, dict[str, dict]]]:
    """Two shards of captions with every kind of planted defect (keys 0-23 and 24-47)."""
    rows = planted_rows()
    ds = Dataset.create(tmp_path_factory.mktemp("audit") / "captioned")
    keys = sorted(rows)
    for shard_id in range(2):
        writer = ds.writer(shard_id)
        for key in keys[shard_id * N // 2 : (shard_id + 1) * N // 2]:
            image = None if rows[key]["status"] != "success" else jpeg_bytes(photo(int(key), (64, 48)))
            writer.write(Sample(key, rows[key], image))
        writer.commit({"stage": "caption"})
    ds.write_manifest("caption", {}, None, expected_shards=2)
    before = _files(ds.path)
    yield ds.path, rows
    assert _files(ds.path) == before  # no audit writes into the dataset it audits


def _files(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")}


def audit_json(*args: str) -> tuple[int, dict, str]:
    code, out, err = run_cli_here("audit", *args, "--json", "--quiet")
    return code, json.loads(out) if out.strip() else {}, err


def test_every_planted_defect_is_counted_exactly(planted):
    path, rows = planted
    code, a, err = audit_json(str(path))
    assert code == 0, err
    assert a["captions"] == N - len(NOT_CAPTIONS)
    assert a["measured_texts"] == a["captions"] - len(REFUSED_STATUS) - len(TRUNCATED_STATUS)
    c = a["counts"]
    assert c["refusal"] == len(REFUSALS_IN_TEXT) + len(REFUSED_STATUS)
    assert c["loop"] == len(LOOPS)
    assert c["truncated"] == len(MID_SENTENCE) + len(TRUNCATED_STATUS)
    assert c["duplicate"] == 2 * len(DUPLICATES)
    assert c["wrong_script"] == len(CYRILLIC)
    assert (c["ocr_missed"], c["ocr_invented"]) == (1, 1)
    assert a["ocr"] == {
        "known": len(OCR)
        + sum(
            1
            for i in range(0, N, 5)
            if i not in OCR and i not in NOT_CAPTIONS and i not in REFUSED_STATUS and i not in TRUNCATED_STATUS
        ),
        "with_text": len(OCR),
        "quoted": 3,
        "missed": 1,
        "invented": 1,
    }
    measured = [r["caption"] for r in rows.values() if r["status"] == "success" and r["caption_status"] == "ok"]
    outside = [t for t in measured if not 54 <= len(t.split()) <= 164]
    assert c["off_length"] == len(outside) > 0
    assert a["openings"][0] == {
        "opening": "the image shows",
        "captions": len(TEMPLATE),
        "share": round(len(TEMPLATE) / a["measured_texts"], 6),
    }
    assert a["template_top1"] == a["openings"][0]["share"]
    words = sorted(len(t.split()) for t in measured)
    assert a["words"]["mean"] == round(sum(words) / len(words), 2) and a["words"]["target"] == 109
    assert a["words"]["histogram"] == [[w, words.count(w)] for w in sorted(set(words))]
    assert 0 < a["distinct_1"] < a["distinct_2"] <= 1
    # The two models split the dataset by key parity; their counts add up to the whole.
    by = {g["model"]: g for g in a["by_model"]}
    assert set(by) == {"model-a", "model-b"}
    assert by["model-a"]["captions"] + by["model-b"]["captions"] == a["captions"]
    for name in c:
        assert by["model-a"]["counts"][name] + by["model-b"]["counts"][name] == c[name], name
    assert by["model-b"]["counts"]["loop"] == 2  # keys 7 and 33 are odd
    # Sampled flagged captions, each with its flags; the same seed shows the same ones.
    assert a["samples"] and all(s["flags"] for s in a["samples"])
    assert [s["key"] for s in audit_json(str(path))[1]["samples"]] == [s["key"] for s in a["samples"]]


def test_any_directory_of_parquet_files_with_a_caption_column(planted, tmp_path):
    """Not a lenscap dataset (another tool's, a Hugging Face export): each Parquet file is a shard."""
    path, rows = planted
    keys = sorted(rows)
    (tmp_path / "hf" / "data").mkdir(parents=True)
    for n in range(3):
        part = [rows[k] | {"key": k} for k in keys[n * N // 3 : (n + 1) * N // 3]]
        pa_table = pa.Table.from_pylist(part)
        pq.write_table(pa_table, tmp_path / "hf" / "data" / f"train-{n:05d}-of-00003.parquet")
    code, plain, err = audit_json(str(tmp_path / "hf"))
    assert code == 0, err
    _, ours, _ = audit_json(str(path))
    assert plain["layout"] == "parquet files" and ours["layout"] == "lenscap"
    for name in ("captions", "counts", "words", "openings", "distinct_1", "distinct_2", "ocr", "by_model"):
        assert plain[name] == ours[name], name
    code, _, err = run_cli_here("audit", str(tmp_path / "hf"), "--out", str(tmp_path / "o"))
    assert code == 2 and "plain Parquet" in err
    (tmp_path / "lists").mkdir()
    pq.write_table(pa.table({"caption": [["not", "text"]]}), tmp_path / "lists" / "a.parquet")
    code, _, err = run_cli_here("audit", str(tmp_path / "lists"))
    assert code == 2 and "holds list<" in err and err.count("\n") == 1


def test_fail_on_is_a_gate_with_its_own_exit_code(planted):
    path, _ = planted
    code, a, err = audit_json(str(path), "--fail-on", "refusal>0.05, words_p50<80 ,template_top1>0.5")
    assert code == 6 and a["exit_code"] == 6
    assert a["failed_rules"] == ["refusal>0.05"] and "rule broken: refusal>0.05" in err
    code, a, _ = audit_json(str(path), "--fail-on", "refusal>20%,loop>=0.5,duplicate>0.5")
    assert code == 0 and a["failed_rules"] == [] and [r["broken"] for r in a["rules"]] == [False, False, False]
    for bad in ("refusals>0.1", "refusal=0.1", "refusal>lots", ""):
        code, out, err = run_cli_here("audit", str(path), "--fail-on", bad)
        assert code == 2 and err.startswith("lenscap: error: --fail-on") and err.count("\n") == 1, (bad, err)


def test_out_writes_flags_that_filter_where_reads(planted, tmp_path):
    path, rows = planted
    out = tmp_path / "flagged"
    code, a, err = audit_json(str(path), "--out", str(out))
    assert code == 0 and a["out"]["shards_completed"] == 2, err
    flagged = Dataset(out)
    table = pa.concat_tables([flagged.read_table(i) for i in flagged.completed_ids()], promote_options="default")
    by_key = {r["key"]: r for r in table.to_pylist()}
    assert set(by_key) == set(rows)
    for key, row in rows.items():  # every input column as it was
        assert {k: by_key[key][k] for k in row} == row
    assert sum(bool(r["audit_duplicate"]) for r in by_key.values()) == 4
    assert by_key[f"{7:09d}"]["audit_loop"] and by_key[f"{7:09d}"]["audit_repeat_share"] > 0.5
    assert by_key[f"{36:09d}"]["audit_flagged"] is None  # not a caption: no verdict
    for name in ("refusal", "loop", "truncated", "wrong_script", "ocr_missed", "ocr_invented"):
        assert sum(bool(r[f"audit_{name}"]) for r in by_key.values()) == a["counts"][name], name
    clean = [k for k, r in by_key.items() if r["audit_flagged"] is False]
    code, _, err = run_cli_here(
        "filter", str(out), str(tmp_path / "clean"), "--status", "any", "--where", "NOT audit_flagged", "--quiet"
    )
    assert code == 0, err
    kept = Dataset(tmp_path / "clean")
    kept_keys = sorted(
        r["key"] for i in kept.completed_ids() for r in kept.read_table(i).to_pylist() if r["filter_status"] == "kept"
    )
    assert kept_keys == sorted(clean)
    # The same audit into the same output is done; another setting is refused, as for every command.
    assert audit_json(str(path), "--out", str(out))[0] == 0
    code, _, err = run_cli_here("audit", str(path), "--out", str(out), "--target-words", "50")
    assert code == 2 and "target_words" in err


def test_two_captionings_compared_image_by_image(planted, tmp_path):
    path, rows = planted
    fixed = {k: dict(r) for k, r in rows.items()}
    for i in REFUSALS_IN_TEXT:  # B recaptioned the refusals well, and broke one good caption
        fixed[f"{i:09d}"]["caption"] = dense(5000 + i)
    fixed[f"{1:09d}"]["caption"] = "I'm sorry, I can't help with that."
    b = Dataset.create(tmp_path / "b")
    writer = b.writer(0)
    for key in sorted(fixed):
        writer.write(Sample(key, fixed[key], None))
    writer.commit({"stage": "caption"})
    code, r, err = audit_json(str(path), str(tmp_path / "b"), "--sample", "20", "--fail-on", "refusal>0.09")
    assert code == 0, err  # the rule judges B
    assert r["a"]["counts"]["refusal"] == 5 and r["b"]["counts"]["refusal"] == 3
    assert r["common"] == N - len(NOT_CAPTIONS)
    assert r["flag_changes"]["refusal"] == {"gained": 1, "cleared": 3}
    assert r["delta"]["refusal"] == round(r["b"]["shares"]["refusal"] - r["a"]["shares"]["refusal"], 6)
    shown = {d["key"]: d for d in r["differences"]}
    assert set(shown) >= {f"{i:09d}" for i in (1, *REFUSALS_IN_TEXT)}
    assert shown[f"{3:09d}"]["a"]["caption"] == REFUSALS_IN_TEXT[3] and "refusal" in shown[f"{3:09d}"]["a"]["flags"]
    assert shown[f"{3:09d}"]["b"]["flags"] == []
    code, out, _ = run_cli_here("audit", str(path), str(tmp_path / "b"))
    assert code == 0 and "more in B" in out and f"{3:09d}" in out


def test_the_same_numbers_on_processes_and_ray(planted, ray_cluster):
    from lenscap import api

    path, _ = planted
    one = api.audit(path, api.AuditOptions(sample=5, processes=1))
    two = api.audit(path, api.AuditOptions(sample=5), processes=2)
    on_ray = api.audit(path, api.AuditOptions(sample=5, executor="ray", ray_address=ray_cluster))
    assert one == two == on_ray


def test_what_is_not_a_captioned_dataset(tmp_path, planted):
    code, _, err = run_cli_here("audit", str(tmp_path / "missing"))
    assert code == 2 and err.count("\n") == 1
    ds = Dataset.create(tmp_path / "plain")
    writer = ds.writer(0)
    writer.write(Sample("000000000", {"status": "success"}, jpeg_bytes(photo(0, (32, 32)))))
    writer.commit({"stage": "download"})
    code, _, err = run_cli_here("audit", str(tmp_path / "plain"))
    assert code == 2 and "no caption column" in err
    path, _ = planted
    for args in (["--script", "Klingon"], ["--target-words", "0"], [str(path), str(path)], ["--sample", "-1"]):
        code, _, err = run_cli_here("audit", str(path), *args)
        assert code == 2 and err.startswith("lenscap: error:") and err.count("\n") == 1, (args, err)


GATED = """
input = "{urls}"
work_dir = "{work}"
[[stages]]
run = "download"
allow_private_network = true
processes = 1
[[stages]]
run = "caption"
backend = "describe"
[[stages]]
run = "audit"
fail_on = "{rule}"
[[stages]]
run = "shard"
processes = 1
"""


def test_a_recipe_stops_at_a_broken_audit_gate(tmp_path, image_server):
    """The describe backend writes about 20 words: a gate asking for 80 stops the run before the
    export (exit 6); a gate it passes lets the export run."""
    from test_recipes import write_urls

    from lenscap import api

    urls = write_urls(tmp_path / "urls.csv", image_server, [f"/ok/{i}.jpg" for i in range(4)])
    recipe = tmp_path / "gated.toml"
    recipe.write_text(GATED.format(urls=urls, work=tmp_path / "work", rule="words_p50<80"))
    summary = api.run(str(recipe))
    assert summary["exit_code"] == 6 and summary["stopped_at"] == "audit"
    assert summary["stages"][-1]["summary"]["failed_rules"] == ["words_p50<80"]
    assert not (tmp_path / "work" / "shard").exists()
    recipe.write_text(GATED.format(urls=urls, work=tmp_path / "work", rule="words_p50<5"))
    summary = api.run(str(recipe))
    assert summary["exit_code"] == 0 and [s["stage"] for s in summary["stages"]] == ["download", "caption", "audit", "shard"]
    assert summary["stages"][-1]["summary"]["samples"] == 4


def test_audit_out_of_a_dataset_with_no_duplicate_caption(tmp_path):
    """No caption repeats another: the duplicates the scan found are none, and --out still writes every row."""
    src = write_image_dataset(tmp_path / "in", 1, per_shard=1, size=(64, 48)).path
    code, _, err = run_cli_here("audit", str(src), "--out", str(tmp_path / "out"), "--processes", "1")
    assert code == 0, err
    assert Dataset(tmp_path / "out").read_manifest()["counts"]["samples"] == 1
