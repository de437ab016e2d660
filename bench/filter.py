"""lenscap filter: the cheap-rules pass against a plain pyarrow scan, and samples/s per annotator.

    .venv/bin/python bench/filter.py [--images 4000] [--annotate-images 200]

Baseline for the cheap rules, in the same run: pyarrow reading the same parquet files and computing
the same predicate (shorter side >= 256, caption words between 3 and 60, status success) with
pyarrow.compute. lenscap's cheap-rules pass makes the same decisions in DuckDB per shard, with the
image sizes from the ``image_size`` column (for --min-bytes) and a reason and detail per dropped row;
the ratio is pyarrow time / lenscap time. The whole stage (driver, claim, manifest, and writing each
shard's parquet: no image is read or written) is then timed against the cheap-rules pass alone
(target >= 0.5), and so is the stage with --copy-images (which also writes every kept image into
new tars, as every stage did before images were written once). Annotators are timed over images
the cheap rules kept, one process.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow.compute as pc

from lenscap.core.dataset import Dataset
from lenscap.core.job import run_stage
from lenscap.core.progress import LogProgress
from lenscap.demo.datasets import write_image_dataset
from lenscap.filter.annotators import annotator_class
from lenscap.filter.options import FilterOptions
from lenscap.filter.stage import FilterStage

RULES = FilterOptions(min_side=256, caption_min_words=3, caption_max_words=60)


def pyarrow_scan(src: Dataset) -> int:
    kept = 0
    for shard_id in src.completed_ids():
        t = src.read_table(shard_id, columns=["status", "width", "height", "caption"])
        side = pc.min_element_wise(t.column("width"), t.column("height"))
        words = pc.list_value_length(pc.split_pattern_regex(pc.utf8_trim_whitespace(t.column("caption")), r"\s+"))
        ok = pc.and_(
            pc.and_(pc.equal(t.column("status"), "success"), pc.greater_equal(side, 256)),
            pc.and_(pc.greater_equal(words, 3), pc.less_equal(words, 60)),
        )
        kept += pc.sum(pc.fill_null(ok, False)).as_py() or 0
    return kept


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--annotate-images", type=int, default=200)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = write_image_dataset(Path(tmp) / "in", a.images, per_shard=5000, size=(384, 288), failed=lambda i: i % 17 == 0)
        t = time.perf_counter()
        kept_base = pyarrow_scan(src)
        base_s = time.perf_counter() - t
        stage = FilterStage(RULES)
        t = time.perf_counter()
        dropped = sum(len(stage.cheap_verdicts(src, i)) for i in src.completed_ids())
        rules_s = time.perf_counter() - t
        t = time.perf_counter()
        run_stage(stage, src.path, Path(tmp) / "out", progress=LogProgress("filter", quiet=True))
        ours_s = time.perf_counter() - t
        copying = FilterStage(FilterOptions.of(RULES, copy_images=True))
        t = time.perf_counter()
        run_stage(copying, src.path, Path(tmp) / "copy", progress=LogProgress("filter", quiet=True))
        copy_s = time.perf_counter() - t
        out = Dataset(Path(tmp) / "out")
        kept_ours = sum(out.read_stats(i).get("filter_reasons", {}).get("kept", 0) for i in out.completed_ids())
        assert kept_ours == kept_base == a.images - dropped, (kept_ours, kept_base, dropped)
        print(f"{a.images} samples, {kept_ours} kept by both")
        print(
            f"cheap rules: lenscap (DuckDB, with reasons) {a.images / rules_s:,.0f} samples/s; pyarrow scan "
            f"{a.images / base_s:,.0f} samples/s; ratio {base_s / rules_s:.2f}"
        )
        print(
            f"whole stage, rows only: {a.images / ours_s:,.0f} samples/s; whole stage / cheap-rules pass "
            f"{rules_s / ours_s:.2f} (target >= 0.5)"
        )
        print(
            f"whole stage with --copy-images (kept images into new tars): {a.images / copy_s:,.0f} samples/s; "
            f"/ cheap-rules pass {rules_s / copy_s:.2f}; rows only is {copy_s / ours_s:.1f}x faster"
        )
        samples = [s for s in src.iter_samples(0) if s.ok][: a.annotate_images]
        import io

        from PIL import Image

        images = [Image.open(io.BytesIO(s.image)).convert("RGB") for s in samples]
        for name in ("uniform", "blur", "faces", "ocr"):
            annotator = annotator_class(name)()
            try:
                annotator.setup()
            except Exception as e:  # noqa: BLE001
                print(f"{name:>8}: not available ({e})")
                continue
            t = time.perf_counter()
            for im, s in zip(images, samples, strict=True):
                annotator.annotate(im, s)
            print(f"{name:>8}: {len(images) / (time.perf_counter() - t):,.1f} images/s (384x288, one process)")


if __name__ == "__main__":
    main()
