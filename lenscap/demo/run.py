"""The demo pipeline: generated images served on loopback, downloaded, captioned, inspected.

Offline and without a key: captions come from the fake OpenAI-compatible server on loopback, through
the real client, limiter, journal and shard writing. Its captions are placeholders (size and
dominant colour), and the cost shown is what gpt-4.1-mini would have charged; nothing is paid.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

from lenscap.backends.openai_chat import OpenAIChatBackend, OpenAIOptions
from lenscap.captioning.prompts import load_prompt
from lenscap.demo.fake_openai import FakeOpenAI, FakeSettings
from lenscap.demo.images import html_page, jpeg_bytes, scene, scene_caption, truncated_jpeg
from lenscap.demo.server import ImageServer, Route
from lenscap.progress import make_progress
from lenscap.runner import run_stage
from lenscap.stages.caption import CaptionStage
from lenscap.stages.download import DownloadOptions, download

__all__ = ["demo_routes", "run_demo"]


def demo_routes(n_images: int) -> dict[str, Route]:
    """``n_images`` scenes plus one of each common failure, so the result shows statuses too."""
    routes = {f"/img/{i}.jpg": Route(jpeg_bytes(scene(i, (512 + 16 * (i % 9), 384 + 16 * (i % 5))))) for i in range(n_images)}
    routes["/broken/html.jpg"] = Route(html_page(), "image/jpeg")
    routes["/broken/truncated.jpg"] = Route(truncated_jpeg())
    routes["/broken/noai.jpg"] = Route(jpeg_bytes(scene(10_000)), headers={"X-Robots-Tag": "noai"})
    return routes


def run_demo(work_dir: str | Path, n_images: int = 100, quiet: bool = False) -> dict[str, Any]:
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    routes = demo_routes(n_images)
    with ImageServer(routes) as server:
        url_list = work / "urls.csv"
        with open(url_list, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["url", "caption"])
            for i in range(n_images):
                w.writerow([server.url(f"/img/{i}.jpg"), scene_caption(i)])
            for path in ("/broken/html.jpg", "/broken/truncated.jpg", "/broken/noai.jpg", "/missing.jpg"):
                w.writerow([server.url(path), "a broken link"])
        # The server's port changes from run to run, so the URL list does too: start afresh.
        shutil.rmtree(work / "download", ignore_errors=True)
        result = download(
            str(url_list), work / "download",
            DownloadOptions(samples_per_shard=50, processes=2, threads=16, timeout=5),
            make_progress("download", quiet),
        )
    shutil.rmtree(work / "captioned", ignore_errors=True)
    with FakeOpenAI(FakeSettings(rpm=1200, latency_s=0.05)) as api:
        backend = OpenAIChatBackend(OpenAIOptions(model="gpt-4.1-mini", base_urls=[api.base_url], concurrency=16))
        captioned = run_stage(CaptionStage(backend, load_prompt("lens")), work / "download", work / "captioned",
                              progress=make_progress("caption", quiet))
    exit_code = max(result.exit_code, captioned.exit_code)
    return {"work_dir": str(work), "download": str(work / "download"), "captioned": str(work / "captioned"),
            "exit_code": exit_code}
