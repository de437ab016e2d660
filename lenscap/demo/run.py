"""The demo pipeline: generated images served on loopback, downloaded, captioned, inspected.

Captioners: ``describe`` (offline, from the pixels: the default without an API key), ``openai``
(gpt-4.1-mini, capped at $0.10: the default when OPENAI_API_KEY is set), or ``fake`` (lenscap's fake
OpenAI-compatible server on loopback: the real client, limiter and journal, placeholder captions).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import os

from lenscap.backends.describe import DescribeBackend
from lenscap.backends.openai_chat import OpenAIChatBackend, OpenAIOptions
from lenscap.captioning.prompts import load_prompt
from lenscap.demo.fake_openai import FakeOpenAI, FakeSettings
from lenscap.demo.images import html_page, jpeg_bytes, scene, scene_caption, truncated_jpeg
from lenscap.demo.server import ImageServer, Route
from lenscap.progress import make_progress
from lenscap.runner import run_stage
from lenscap.stages.caption import CaptionStage
from lenscap.stages.download import DownloadOptions, download

__all__ = ["demo_routes", "run_demo", "CAPTIONERS", "DEMO_MAX_COST"]

CAPTIONERS = ("auto", "describe", "openai", "fake")
DEMO_MAX_COST = 0.10


def demo_routes(n_images: int) -> dict[str, Route]:
    """``n_images`` scenes plus one of each common failure, so the result shows statuses too."""
    routes = {f"/img/{i}.jpg": Route(jpeg_bytes(scene(i, (512 + 16 * (i % 9), 384 + 16 * (i % 5))))) for i in range(n_images)}
    routes["/broken/html.jpg"] = Route(html_page(), "image/jpeg")
    routes["/broken/truncated.jpg"] = Route(truncated_jpeg())
    routes["/broken/noai.jpg"] = Route(jpeg_bytes(scene(10_000)), headers={"X-Robots-Tag": "noai"})
    return routes


def run_demo(work_dir: str | Path, n_images: int = 100, quiet: bool = False, captioner: str = "auto") -> dict[str, Any]:
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
    if captioner == "auto":
        captioner = "openai" if os.environ.get("OPENAI_API_KEY") else "describe"
    shutil.rmtree(work / "captioned", ignore_errors=True)
    caption = work / "download", work / "captioned"
    progress = make_progress("caption", quiet)
    if captioner == "fake":
        with FakeOpenAI(FakeSettings(rpm=1200, latency_s=0.05)) as api:
            backend = OpenAIChatBackend(OpenAIOptions(model="gpt-4.1-mini", base_urls=[api.base_url], concurrency=16))
            captioned = run_stage(CaptionStage(backend, load_prompt("lens")), *caption, progress=progress)
    elif captioner == "openai":
        backend = OpenAIChatBackend(OpenAIOptions(model="gpt-4.1-mini", concurrency=16))
        captioned = run_stage(CaptionStage(backend, load_prompt("lens"), max_cost=DEMO_MAX_COST), *caption, progress=progress)
    else:
        captioned = run_stage(CaptionStage(DescribeBackend(), load_prompt("lens")), *caption, progress=progress)
    exit_code = max(result.exit_code, captioned.exit_code)
    return {"work_dir": str(work), "download": str(work / "download"), "captioned": str(work / "captioned"),
            "captioner": captioner, "exit_code": exit_code}
