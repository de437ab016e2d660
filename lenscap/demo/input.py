"""The demo's input: generated images served on loopback, with the web's usual broken links.

The demo pipeline itself is the ``demo`` recipe (``lenscap/recipes/demo.toml``); ``lenscap demo``
picks its captioner: ``describe`` (offline, from the pixels: the default without an API key),
``openai`` (gpt-4.1-mini, capped at $0.10: the default when OPENAI_API_KEY is set), or ``fake``
(lenscap's fake OpenAI-compatible server on loopback: the real client, limiter and journal).
"""

from __future__ import annotations

import csv
from pathlib import Path

from lenscap.demo.pictures import html_page, jpeg_bytes, scene, scene_caption, truncated_jpeg
from lenscap.demo.server import ImageServer, Route

__all__ = ["demo_routes", "start_demo_input"]


def demo_routes(n_images: int) -> dict[str, Route]:
    """``n_images`` scenes plus one of each common failure, so the result shows statuses too."""
    routes = {f"/img/{i}.jpg": Route(jpeg_bytes(scene(i, (512 + 16 * (i % 9), 384 + 16 * (i % 5))))) for i in range(n_images)}
    routes["/broken/html.jpg"] = Route(html_page(), "image/jpeg")
    routes["/broken/truncated.jpg"] = Route(truncated_jpeg())
    routes["/broken/noai.jpg"] = Route(jpeg_bytes(scene(10_000)), headers={"X-Robots-Tag": "noai"})
    return routes


def start_demo_input(work: Path, n_images: int = 100) -> tuple[ImageServer, str]:
    """Serve the demo images on loopback and write their URL list; the caller stops the server."""
    work.mkdir(parents=True, exist_ok=True)
    server = ImageServer(demo_routes(n_images)).__enter__()
    url_list = work / "urls.csv"
    with open(url_list, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        for i in range(n_images):
            w.writerow([server.url(f"/img/{i}.jpg"), scene_caption(i)])
        for path in ("/broken/html.jpg", "/broken/truncated.jpg", "/broken/noai.jpg", "/missing.jpg"):
            w.writerow([server.url(path), "a broken link"])
    return server, str(url_list)
