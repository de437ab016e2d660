"""``lenscap demo``: the ``demo`` recipe (``lenscap/recipes/demo.toml``) on generated images served on
loopback, with the captioner the machine allows: ``describe`` (offline, from the pixels: the default
without an API key), ``openai`` (gpt-4.1-mini, capped at $0.10: the default when OPENAI_API_KEY is
set), or ``fake`` (lenscap's fake OpenAI-compatible server on loopback: the real client, limiter and
journal)."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from lenscap import api
from lenscap.demo.options import DEMO_MAX_COST, DemoOptions
from lenscap.inspect.summary import inspect_dataset
from lenscap.run.recipe import SHIPPED
from lenscap.testing.fake_openai import FakeOpenAI, FakeSettings

__all__ = ["run_demo", "CAPTIONED_BY"]

# What the captions are, said after the demo's summary.
CAPTIONED_BY = {
    "describe": "Captions by --backend describe: what the pixels say (size, colours, light, text), not what the image shows.\n"
    "With OPENAI_API_KEY set, the demo captions with gpt-4.1-mini instead (at most $0.10).",
    "fake": "Captions from a fake OpenAI-compatible server on loopback: placeholders; the cost is hypothetical.",
    "openai": "Captions by gpt-4.1-mini through the OpenAI API.",
}


def run_demo(work_dir: str, options: DemoOptions, *, quiet: bool = True) -> dict[str, Any]:
    """Run the demo into ``work_dir``; its summary: the captioner, the datasets made, the stages."""
    captioner = options.captioner
    if captioner == "auto":
        captioner = "openai" if os.environ.get("OPENAI_API_KEY") else "describe"
    overrides = {
        "describe": [],
        "openai": ["caption.backend=openai", "caption.model=gpt-4.1-mini", f"caption.max_cost={DEMO_MAX_COST}"],
        "fake": ["caption.backend=openai", "caption.model=gpt-4.1-mini", "caption.cache=false"],
    }[captioner]
    with contextlib.ExitStack() as stack:
        if captioner == "fake":
            server = stack.enter_context(FakeOpenAI(FakeSettings(rpm=1200, latency_s=0.05)))
            overrides.append(f"caption.base_url={server.base_url}")
        # The shipped recipe by its path: a ./demo.toml of the user's is for `lenscap run demo`, not the demo.
        summary = api.run(
            str(SHIPPED / "demo.toml"), set=overrides, work_dir=work_dir, input=f"@demo:{options.images}", quiet=quiet
        )
    base = summary["work_dir"]

    def inspected(stage: str) -> dict[str, Any] | None:
        path = os.path.join(base, stage)
        return inspect_dataset(path) if os.path.isdir(path) else None

    return {
        "command": "demo",
        "work_dir": base,
        "captioner": captioner,
        "download": inspected("download"),
        "captioned": inspected("caption"),
        "deduped": inspected("dedup"),
        "shards": os.path.join(base, "shard"),
        "report": os.path.join(base, "report.html"),
        "stages": summary["stages"],
        "exit_code": summary["exit_code"],
    }
