"""lenscap batch polling at 800M scale: one pass over a job with 80,000 shards behind it, in one run.

    .venv/bin/python bench/batch_poll.py [--shards 80000] [--files 333000] [--rounds 5]

A real ``batch-files`` job (12 samples, 6 batch files in flight) has its state file grown with 80,000
committed shards and 333,000 merged batch files (``lenscap.testing.batch_state.grow_state``): an 800M job
mid-way. Measured, in this process (interpreter start-up excluded): a whole rerun of the caption
command (lock, manifest, state, one pass: poll the 6 batches in flight, nothing finished), and
``lenscap batch status`` on it. The baseline, measured in the same run, is the least any pass that
visits every shard pays: one ``stat`` of a completion marker per shard (80,000 files made for it).
ratio = baseline time / pass time. The issue's target: a pass under 1 s.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lenscap.demo.datasets import write_image_dataset
from lenscap.testing.batch_state import grow_state


def cli(*args: str) -> str:
    from lenscap.cli import main

    out = io.StringIO()
    sys.argv = ["lenscap", *args]
    with contextlib.redirect_stdout(out):
        try:
            main()
        except SystemExit as e:
            if e.code:
                raise
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=80_000)
    parser.add_argument("--files", type=int, default=333_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lenscap-bench-") as tmp:
        root = Path(tmp)
        os.environ["LENSCAP_CACHE_DIR"] = str(root / "cache")
        src = write_image_dataset(root / "in", 12, per_shard=4).path
        command = [
            "caption",
            str(src),
            str(root / "out"),
            "--backend",
            "batch-files",
            "--model",
            "llava-hf/llava-1.5-7b-hf",
            "--max-requests-per-file",
            "2",
            "--quiet",
            "--json",
        ]
        cli(*command)
        grow_state(root / "out" / ".lenscap" / "batch" / "state.sqlite", shards=args.shards, files=args.files)
        markers = root / "markers"
        markers.mkdir()
        for i in range(args.shards):
            (markers / f"{i:06d}_stats.json").touch()
        passes, statuses, baselines = [], [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            summary = json.loads(cli(*command))
            passes.append(time.perf_counter() - start)
            start = time.perf_counter()
            status = json.loads(cli("batch", "status", str(root / "out"), "--json"))
            statuses.append(time.perf_counter() - start)
            start = time.perf_counter()
            for i in range(args.shards):
                os.stat(markers / f"{i:06d}_stats.json")
            baselines.append(time.perf_counter() - start)
        assert summary["files"]["submitted"] == 6, summary["files"]
        one_pass, baseline = statistics.median(passes), statistics.median(baselines)
        print(
            json.dumps(
                {
                    "shards": args.shards,
                    "merged_files": args.files,
                    "in_flight": 6,
                    "seconds": {
                        "pass (rerun of the caption command)": round(one_pass, 3),
                        "batch status": round(statistics.median(statuses), 3),
                        "baseline: stat every shard's marker": round(baseline, 3),
                    },
                    "ratio": round(baseline / one_pass, 2),
                    "state_file_mb": round(
                        sum(p.stat().st_size for p in (root / "out" / ".lenscap" / "batch").glob("state.sqlite*")) / 1e6, 1
                    ),
                    "status_requests": status["requests"],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
