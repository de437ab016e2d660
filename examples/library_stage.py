"""lenscap as a library: download a URL list, then run a custom per-shard stage over the result.

    .venv/bin/python examples/library_stage.py [WORK_DIR]

The stage adds a ``caption_words`` column. A real stage is as short: set ``name``, write
``process``; the base class owns the loop, per-sample errors and the commit, and the job driver does the
resume (shards the output already has are skipped).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pyarrow as pa

import lenscap.api as lc
from lenscap.api import Sample, ShardStage
from lenscap.demo.pictures import jpeg_bytes, scene, scene_caption
from lenscap.demo.server import ImageServer, Route


class CountCaptionWords(ShardStage):
    name = "count_words"

    def columns(self, input_schema: pa.Schema) -> list[pa.Field]:
        return [pa.field("caption_words", pa.int32())]

    def process(self, sample: Sample) -> Sample:
        sample.row["caption_words"] = len((sample.caption or "").split())
        return sample


def main(work: Path) -> None:
    routes = {f"/img/{i}.jpg": Route(jpeg_bytes(scene(i, (128, 96)))) for i in range(20)}
    with ImageServer(routes) as server:
        work.mkdir(parents=True, exist_ok=True)
        urls = work / "urls.jsonl"
        urls.write_text(
            "".join(json.dumps({"url": server.url(p), "caption": scene_caption(i)}) + "\n" for i, p in enumerate(routes))
        )
        lc.download(urls, work / "raw", lc.DownloadOptions(samples_per_shard=10, processes=1, allow_private_network=True))
    result = lc.run_stage(CountCaptionWords(), work / "raw", work / "counted", processes=2)
    info = lc.inspect(work / "counted")
    print(f"{result.samples} samples in {result.shards_completed} shards; columns: {', '.join(info['columns'])}")
    print(f"history: {' -> '.join(info['history'])}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="lenscap-example-")))
