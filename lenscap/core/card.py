"""What every dataset card lenscap writes shares: the Hugging Face Hub's YAML front matter (the data
files, the size category, the features) and the licence section left for the user, who alone knows
the rights in the images and their text. WebDataset features are declared where every column has a
JSON type: ``datasets`` otherwise infers them from the first five samples, and a column empty there but
not later (an error message, an OCR text) would fail the load."""

from __future__ import annotations

import json

import pyarrow as pa

__all__ = [
    "CARD_NAME",
    "is_lenscap_card",
    "HF_DTYPES",
    "LICENCE",
    "front_matter",
    "human",
    "size_category",
    "webdataset_features",
]

CARD_NAME = "README.md"


def is_lenscap_card(text: str) -> bool:
    """Whether ``text`` is a card lenscap wrote: its front matter's tags name lenscap (``front_matter``),
    where a person's README.md is theirs and stays."""
    return text.startswith("---\n") and "\n- lenscap\n" in text.split("\n---\n", 1)[0] + "\n"


HF_DTYPES = {
    pa.string(): "string",
    pa.large_string(): "large_string",
    pa.bool_(): "bool",
    pa.float32(): "float32",
    pa.float64(): "float64",
    pa.int8(): "int8",
    pa.int16(): "int16",
    pa.int32(): "int32",
    pa.int64(): "int64",
    pa.uint8(): "uint8",
    pa.uint16(): "uint16",
    pa.uint32(): "uint32",
    pa.uint64(): "uint64",
    pa.binary(): "binary",
}


# JSON values (``KEY.json``, written with ``default=str``) as ``datasets`` types them.
JSON_DTYPES = {
    **{t: "int64" for t in (pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64())},
    pa.float16(): "float64",
    pa.float32(): "float64",
    pa.float64(): "float64",
    pa.bool_(): "bool",
    pa.string(): "string",
    pa.large_string(): "string",
}


def json_dtype(t: pa.DataType) -> str | None:
    if t in JSON_DTYPES:
        return JSON_DTYPES[t]
    if pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_decimal(t):
        return "string"  # written as its str()
    return None  # lists, structs, binary: left to datasets to infer


def webdataset_features(json_fields: list[tuple[str, pa.DataType]]) -> list[str] | None:
    """``features`` of a WebDataset config whose samples are ``jpg``, ``txt`` and ``json`` (fields in
    order); None where a field has no JSON type to declare."""
    dtypes = [(name, json_dtype(t)) for name, t in json_fields]
    if any(d is None for _, d in dtypes):
        return None
    lines = [
        "  features:",
        "  - name: jpg",
        "    dtype: image",
        "  - name: txt",
        "    dtype: string",
        "  - name: json",
        "    struct:",
    ]
    for name, dtype in dtypes:
        lines += [f"    - name: {json.dumps(name)}", f"      dtype: {dtype}"]
    return lines + ["  - name: __key__", "    dtype: string", "  - name: __url__", "    dtype: string"]


def front_matter(name: str, n: int, files: str, info: list[str] | None) -> list[str]:
    lines = [
        "---",
        "# Set the licence of these images and captions here: lenscap cannot know it.",
        "license: other",
        f"pretty_name: {json.dumps(name)}",
        "task_categories:",
        "- text-to-image",
        "- image-to-text",
        "size_categories:",
        f"- {size_category(n)}",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        f"    path: {json.dumps(files)}",
    ]
    if info:
        lines += ["dataset_info:", *info]
    return lines + ["tags:", "- lenscap", "- image-captioning", "---", ""]


LICENCE = [
    "## Licence",
    "",
    "Not set. Fill in the licence under which you may share these images and captions, and the `license` field above.",
    "",
]


def size_category(n: int) -> str:
    bounds = [
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
        (100_000_000, "10M<n<100M"),
        (1_000_000_000, "100M<n<1B"),
    ]
    return next((label for bound, label in bounds if n < bound), "1B<n<10B")


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError
