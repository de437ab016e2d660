"""Reading URL lists: formats, directories, globs, column detection, batching, and the error messages."""

from __future__ import annotations

import gzip
import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lenscap.core.errors import InputError, UsageError
from lenscap.download.inputs import InputSpec, read_url_tables, resolve_input_files


def rows(source, **kw) -> list[dict]:
    batch_rows = kw.pop("batch_rows", 8192)
    return [r for batch in batches(InputSpec(str(source), **kw), batch_rows=batch_rows) for r in batch]


def batches(spec: InputSpec, batch_rows: int = 8192) -> list[list[dict]]:
    return [t.to_pylist() for t in read_url_tables(spec, batch_rows=batch_rows)]


def urls(source, **kw) -> list[str]:
    return [r["url"] for r in rows(source, **kw)]


def exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


def write_parquet(path, data: dict) -> None:
    pq.write_table(pa.table(data), path)


# -- formats -------------------------------------------------------------------------------------


def test_txt_skips_blank_lines_and_comments(tmp_path):
    p = tmp_path / "urls.txt"
    p.write_text("# header comment\nhttp://a/1.jpg\n\n   \n  http://a/2.jpg  \n#http://a/commented.jpg\nhttp://a/3.jpg")
    assert rows(p) == [{"url": f"http://a/{i}.jpg", "caption": None} for i in (1, 2, 3)]


def test_gzipped_txt(tmp_path):
    p = tmp_path / "urls.txt.gz"
    with gzip.open(p, "wt") as f:
        f.write("http://a/1.jpg\n# c\n\nhttp://a/2.jpg\n")
    assert rows(p) == [{"url": "http://a/1.jpg", "caption": None}, {"url": "http://a/2.jpg", "caption": None}]


def test_csv_with_quoting_and_newlines_in_values(tmp_path):
    p = tmp_path / "list.csv"
    p.write_text(
        'url,caption,license\nhttp://a/1.jpg,"a dog, running",cc-by\nhttp://a/2.jpg,"two\nlines",cc0\n http://a/3.jpg ,plain,\n'
    )
    assert rows(p) == [
        {"url": "http://a/1.jpg", "caption": "a dog, running"},
        {"url": "http://a/2.jpg", "caption": "two\nlines"},
        {"url": "http://a/3.jpg", "caption": "plain"},
    ]


def test_csv_values_stay_text(tmp_path):
    p = tmp_path / "list.csv"
    p.write_text("url,caption,id\nhttp://a/1.jpg,123,007\nhttp://a/2.jpg,4.50,8\n")
    assert rows(p, extra_cols=["id"]) == [
        {"url": "http://a/1.jpg", "caption": "123", "id": "007"},
        {"url": "http://a/2.jpg", "caption": "4.50", "id": "8"},
    ]


def test_gzipped_csv(tmp_path):
    p = tmp_path / "list.csv.gz"
    with gzip.open(p, "wt") as f:
        f.write('url,caption\nhttp://a/1.jpg,"x, y"\n')
    assert rows(p) == [{"url": "http://a/1.jpg", "caption": "x, y"}]


def test_tsv_autodetects_upper_case_columns(tmp_path):
    p = tmp_path / "list.tsv"
    p.write_text("TEXT\tURL\nfirst caption, with comma\thttp://a/1.jpg\nsecond\thttp://a/2.jpg\n")
    assert rows(p) == [
        {"url": "http://a/1.jpg", "caption": "first caption, with comma"},
        {"url": "http://a/2.jpg", "caption": "second"},
    ]


def test_jsonl_skips_blank_lines_and_keeps_types_of_extras(tmp_path):
    p = tmp_path / "list.jsonl"
    p.write_text(
        "\n"
        + json.dumps({"image_url": "http://a/1.jpg", "alt_text": "one", "score": 0.5})
        + "\n\n"
        + json.dumps({"image_url": "http://a/2.jpg", "alt_text": None, "score": 2})
        + "\n"
        + json.dumps({"image_url": "http://a/3.jpg", "alt_text": "three"})
        + "\n"
    )
    assert rows(p, extra_cols=["score"]) == [
        {"url": "http://a/1.jpg", "caption": "one", "score": 0.5},
        {"url": "http://a/2.jpg", "caption": None, "score": 2},
        {"url": "http://a/3.jpg", "caption": "three", "score": None},
    ]


def test_jsonl_caption_found_when_first_record_lacks_it(tmp_path):
    """JSONL writers commonly omit null fields: the first record must not decide the columns alone."""
    p = tmp_path / "list.jsonl"
    p.write_text(json.dumps({"url": "http://a/1.jpg"}) + "\n" + json.dumps({"url": "http://a/2.jpg", "caption": "two"}) + "\n")
    assert rows(p) == [{"url": "http://a/1.jpg", "caption": None}, {"url": "http://a/2.jpg", "caption": "two"}]


def test_parquet_autodetect_and_extra_columns(tmp_path):
    p = tmp_path / "list.parquet"
    write_parquet(
        p, {"img_url": ["http://a/1.jpg", "http://a/2.jpg"], "alt": ["x", None], "width_hint": [640, 480], "unused": ["u", "v"]}
    )
    assert rows(p) == [{"url": "http://a/1.jpg", "caption": "x"}, {"url": "http://a/2.jpg", "caption": None}]
    assert rows(p, extra_cols=["width_hint"]) == [
        {"url": "http://a/1.jpg", "caption": "x", "width_hint": 640},
        {"url": "http://a/2.jpg", "caption": None, "width_hint": 480},
    ]


def test_csv_with_utf8_bom_header(tmp_path):
    """Spreadsheet programs save "CSV UTF-8" with a byte-order mark; the url column must still be found."""
    p = tmp_path / "excel.csv"
    p.write_bytes("\ufeffurl,caption\nhttp://a/1.jpg,café\n".encode("utf-8"))
    assert rows(p) == [{"url": "http://a/1.jpg", "caption": "café"}]


def test_existing_file_with_glob_characters_in_its_name(tmp_path):
    p = tmp_path / "urls[2024].txt"
    p.write_text("http://a/1.jpg\n")
    assert urls(p) == ["http://a/1.jpg"]


# -- directories and globs -----------------------------------------------------------------------


def test_directory_of_mixed_files_in_sorted_order(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "c.jsonl").write_text(json.dumps({"url": "http://c/1.jpg", "caption": "c1"}) + "\n")
    (d / "a.txt").write_text("http://a/1.jpg\nhttp://a/2.jpg\n")
    (d / "b.csv").write_text("url,caption\nhttp://b/1.jpg,b1\n")
    with gzip.open(d / "a2.txt.gz", "wt") as f:
        f.write("http://a2/1.jpg\n")
    write_parquet(d / "d.parquet", {"url": ["http://d/1.jpg"], "caption": ["d1"]})
    (d / "e.tsv").write_text("url\tcaption\nhttp://e/1.jpg\te1\n")
    (d / "README.md").write_text("http://ignored/1.jpg\n")
    (d / "sub").mkdir()
    (d / "sub" / "z.txt").write_text("http://ignored/2.jpg\n")

    assert [os.path.basename(f) for f in resolve_input_files(str(d))] == [
        "a.txt",
        "a2.txt.gz",
        "b.csv",
        "c.jsonl",
        "d.parquet",
        "e.tsv",
    ]
    assert rows(d) == [
        {"url": "http://a/1.jpg", "caption": None},
        {"url": "http://a/2.jpg", "caption": None},
        {"url": "http://a2/1.jpg", "caption": None},
        {"url": "http://b/1.jpg", "caption": "b1"},
        {"url": "http://c/1.jpg", "caption": "c1"},
        {"url": "http://d/1.jpg", "caption": "d1"},
        {"url": "http://e/1.jpg", "caption": "e1"},
    ]


def test_glob(tmp_path):
    for n in (2, 10, 1):
        (tmp_path / f"part-{n}.txt").write_text(f"http://p/{n}.jpg\n")
    (tmp_path / "other.txt").write_text("http://other/1.jpg\n")
    (tmp_path / "part-dir.txt").mkdir()  # directories matching the pattern are not files
    assert urls(tmp_path / "part-*.txt") == ["http://p/1.jpg", "http://p/10.jpg", "http://p/2.jpg"]
    assert urls(tmp_path / "part-?.txt") == ["http://p/1.jpg", "http://p/2.jpg"]


# -- column selection ----------------------------------------------------------------------------


def test_autodetect_prefers_earlier_guesses(tmp_path):
    p = tmp_path / "list.csv"
    p.write_text("text,image_url,url,alt_text,caption\nT,http://img/1.jpg,http://u/1.jpg,A,C\n")
    assert rows(p) == [{"url": "http://u/1.jpg", "caption": "C"}]


def test_no_caption_column_gives_none(tmp_path):
    p = tmp_path / "list.csv"
    p.write_text("url,title\nhttp://a/1.jpg,T\n")
    assert rows(p) == [{"url": "http://a/1.jpg", "caption": None}]


def test_explicit_columns(tmp_path):
    p = tmp_path / "list.csv"
    p.write_text("link,title,url,caption,license,source\nhttp://l/1.jpg,Title,http://u/1.jpg,Cap,cc-by,web\n")
    assert rows(p, url_col="link", caption_col="title", extra_cols=["license", "source"]) == [
        {"url": "http://l/1.jpg", "caption": "Title", "license": "cc-by", "source": "web"}
    ]


def test_explicit_columns_parquet(tmp_path):
    p = tmp_path / "list.parquet"
    write_parquet(p, {"src": ["http://s/1.jpg"], "desc": ["D"], "url": ["http://u/1.jpg"], "lang": ["en"]})
    assert rows(p, url_col="src", caption_col="desc", extra_cols=["lang"]) == [
        {"url": "http://s/1.jpg", "caption": "D", "lang": "en"}
    ]


def test_txt_accepts_explicit_url_col_named_url(tmp_path):
    p = tmp_path / "urls.txt"
    p.write_text("http://a/1.jpg\n")
    assert rows(p, url_col="url") == [{"url": "http://a/1.jpg", "caption": None}]


# -- batching ------------------------------------------------------------------------------------


def test_batches_of_batch_rows_in_order(tmp_path):
    p = tmp_path / "urls.txt"
    p.write_text("".join(f"http://a/{i}.jpg\n" for i in range(10)))
    got = batches(InputSpec(str(p)), batch_rows=3)
    assert [len(b) for b in got] == [3, 3, 3, 1]
    assert [r["url"] for b in got for r in b] == [f"http://a/{i}.jpg" for i in range(10)]


def test_batches_follow_files_in_order(tmp_path):
    """A batch never mixes two files (shards do: the download stage cuts shards across files)."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_text("".join(f"http://a/{i}.jpg\n" for i in range(4)))
    (d / "b.jsonl").write_text("".join(json.dumps({"url": f"http://b/{i}.jpg"}) + "\n" for i in range(6)))
    got = batches(InputSpec(str(d)), batch_rows=3)
    assert [len(b) for b in got] == [3, 1, 3, 3]
    assert [r["url"] for b in got for r in b] == (
        [f"http://a/{i}.jpg" for i in range(4)] + [f"http://b/{i}.jpg" for i in range(6)]
    )


def test_exact_multiple_of_batch_rows(tmp_path):
    p = tmp_path / "urls.txt"
    p.write_text("".join(f"http://a/{i}.jpg\n" for i in range(6)))
    assert [len(b) for b in batches(InputSpec(str(p)), batch_rows=3)] == [3, 3]


# -- errors --------------------------------------------------------------------------------------

SUFFIXES = ".txt, .csv, .tsv, .jsonl, .parquet"


def test_error_missing_file(tmp_path):
    p = tmp_path / "missing.txt"
    with pytest.raises(InputError, match=exact(f"input file {p} does not exist")):
        rows(p)


def test_errors_are_usage_errors(tmp_path):
    with pytest.raises(UsageError) as e:
        rows(tmp_path / "missing.txt")
    assert e.value.exit_code == 2


def test_error_directory_without_supported_files(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "notes.md").write_text("x")
    (d / "data.xlsx").write_text("x")
    with pytest.raises(InputError, match=exact(f"{d}: directory holds no URL list ({SUFFIXES})")):
        rows(d)


def test_error_glob_matches_nothing(tmp_path):
    pattern = str(tmp_path / "nothing-*.txt")
    with pytest.raises(InputError, match=exact(f"{pattern}: no file matches this pattern")):
        rows(pattern)


def test_error_unsupported_suffix(tmp_path):
    p = tmp_path / "list.xlsx"
    p.write_text("x")
    with pytest.raises(InputError, match=exact(f"{p}: unsupported input format (use one of {SUFFIXES}, optionally .gz)")):
        rows(p)


def test_error_glob_matching_unsupported_file(tmp_path):
    (tmp_path / "a.txt").write_text("http://a/1.jpg\n")
    (tmp_path / "a.xml").write_text("<x/>")
    bad = tmp_path / "a.xml"
    with pytest.raises(InputError, match=exact(f"{bad}: unsupported input format (use one of {SUFFIXES}, optionally .gz)")):
        rows(tmp_path / "a.*")


def test_error_unknown_explicit_url_column(tmp_path):
    p = tmp_path / "list.csv"
    p.write_text("url,caption,license\nhttp://a/1.jpg,c,l\n")
    with pytest.raises(InputError, match=exact(f"{p}: no URL column 'link' (columns: url, caption, license)")):
        rows(p, url_col="link")


def test_error_unknown_explicit_caption_column(tmp_path):
    p = tmp_path / "list.jsonl"
    p.write_text(json.dumps({"url": "http://a/1.jpg", "alt": "x"}) + "\n")
    with pytest.raises(InputError, match=exact(f"{p}: no caption column 'title' (columns: url, alt)")):
        rows(p, caption_col="title")


def test_error_unknown_extra_column(tmp_path):
    p = tmp_path / "list.parquet"
    write_parquet(p, {"url": ["http://a/1.jpg"], "caption": ["c"]})
    with pytest.raises(InputError, match=exact(f"{p}: no extra column 'license' (columns: url, caption)")):
        rows(p, extra_cols=["license"])


def test_error_no_url_column_found(tmp_path):
    p = tmp_path / "list.csv"
    p.write_text("href,caption\nhttp://a/1.jpg,c\n")
    with pytest.raises(InputError, match=exact(f"{p}: no URL column found (columns: href, caption); name it with --url-col")):
        rows(p)


def test_error_empty_input(tmp_path):
    p = tmp_path / "urls.txt"
    p.write_text("# only comments\n\n   \n")
    with pytest.raises(InputError, match=exact(f"{p}: the input holds no URLs")):
        rows(p)


def test_error_csv_with_header_only_holds_no_urls(tmp_path):
    p = tmp_path / "list.csv"
    p.write_text("url,caption\n")
    with pytest.raises(InputError, match=exact(f"{p}: the input holds no URLs")):
        rows(p)


def test_error_empty_csv_file(tmp_path):
    p = tmp_path / "list.csv"
    p.write_text("")
    with pytest.raises(InputError, match=exact(f"{p}: empty file (a csv needs a header row)")):
        rows(p)


def test_error_empty_jsonl_file(tmp_path):
    p = tmp_path / "list.jsonl"
    p.write_text("\n\n")
    with pytest.raises(InputError, match=exact(f"{p}: no records")):
        rows(p)


def test_error_invalid_json_line_names_line_number(tmp_path):
    p = tmp_path / "list.jsonl"
    p.write_text(json.dumps({"url": "http://a/1.jpg"}) + "\n\n" + '{"url": "http://a/2.jpg",\n')
    with pytest.raises(InputError, match="^" + re.escape(f"{p}:3: not valid JSON (")) as e:
        rows(p)
    assert str(e.value).endswith(")")


def test_error_invalid_first_json_line(tmp_path):
    p = tmp_path / "list.jsonl"
    p.write_text("\nnot json\n")
    with pytest.raises(InputError, match="^" + re.escape(f"{p}:2: not valid JSON (")):
        rows(p)


def test_error_json_line_not_an_object(tmp_path):
    p = tmp_path / "list.jsonl"
    p.write_text(json.dumps({"url": "http://a/1.jpg"}) + "\n" + "[1, 2]\n")
    with pytest.raises(InputError, match=exact(f"{p}:2: expected a JSON object per line")):
        rows(p)


def test_error_unreadable_parquet(tmp_path):
    p = tmp_path / "x.parquet"
    p.write_bytes(os.urandom(4096))
    with pytest.raises(InputError, match="^" + re.escape(f"{p}: not a readable parquet file (")):
        rows(p)


@pytest.mark.parametrize(("extras", "named"), [(["status"], "status"), (["width", "lang", "key"], "key, width")])
def test_error_reserved_extra_column(tmp_path, extras, named):
    p = tmp_path / "list.csv"
    p.write_text("url,status,width,lang,key\nhttp://a/1.jpg,s,1,en,k\n")
    with pytest.raises(InputError, match=exact(f"--extra-cols cannot include {named}: lenscap writes those columns itself")):
        rows(p, extra_cols=extras)


@pytest.mark.parametrize("kw", [{"caption_col": "caption"}, {"extra_cols": ["lang"]}, {"url_col": "link"}])
def test_error_columns_with_txt_input(tmp_path, kw):
    p = tmp_path / "urls.txt"
    p.write_text("http://a/1.jpg\n")
    msg = f"{p}: a .txt URL list has no columns; use csv, tsv, jsonl or parquet for captions and extra columns"
    with pytest.raises(InputError, match=exact(msg)):
        rows(p, **kw)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_bytes_that_are_not_utf8_in_json_lines_are_refused_never_replaced(tmp_path, suffix):
    """A JSON line that is not UTF-8 is not JSON: the file is refused, as for any line that is not JSON."""
    data = b'{"url": "http://a/1.jpg"}\n{"url": "http://a/\xff.jpg"}\n'
    p = tmp_path / f"urls{suffix}"
    p.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    with pytest.raises(InputError, match="UTF-8|utf-8|Invalid UTF8|invalid UTF8|UTF8") as e:
        rows(p)
    assert "\ufffd" not in str(e.value)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".txt", ".txt.gz"])
def test_rows_that_are_not_utf8_become_rows_that_say_so_never_replaced(tmp_path, suffix):
    """One bad row of a txt, csv or tsv list is that row's failure (its URL can never be fetched), not
    the whole file's: the rows around it are read as ever."""
    from lenscap.download.inputs import NOT_UTF8

    header = {".csv": b"url,caption\n", ".tsv": b"url\tcaption\n", ".txt": b""}[suffix.removesuffix(".gz")]
    sep = {".csv": b",", ".tsv": b"\t"}.get(suffix, b"")
    lines = [b"http://a/1.jpg", b"http://a/\xff.jpg", b"http://a/3.jpg"]
    if sep:
        lines = [lines[0] + sep + b"one", lines[1] + sep + b"two", lines[2] + sep + b"caf\xe9"]  # a bad caption too
    data = header + b"".join(line + b"\n" for line in lines)
    p = tmp_path / f"urls{suffix}"
    p.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    got = urls(p)
    assert got[0] == "http://a/1.jpg" and got[1] == NOT_UTF8 + "http://a/\\xff.jpg"
    assert got[2] == (NOT_UTF8 + "http://a/3.jpg" if sep else "http://a/3.jpg")
    assert not any("\ufffd" in u for u in got)


@pytest.mark.parametrize("header", ["url", "URL", "image_url", "  url  "])
def test_a_url_header_row_of_a_txt_list_is_skipped_with_a_note(tmp_path, capsys, header):
    p = tmp_path / "urls.txt"
    p.write_text(header + "\n" + "".join(f"http://a/{i}.jpg\n" for i in range(5)))
    assert urls(p) == [f"http://a/{i}.jpg" for i in range(5)]
    assert f"{p}: its first line is a header ({header.strip()}), not a URL: skipped" in capsys.readouterr().err


def test_a_txt_list_whose_first_line_is_a_url_keeps_it(tmp_path, capsys):
    p = tmp_path / "urls.txt"
    p.write_text("http://a/url\nurl\n")  # a later "url" line is a row like any other (a failed sample)
    assert urls(p) == ["http://a/url", "url"]
    assert "header" not in capsys.readouterr().err
