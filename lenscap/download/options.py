"""``lenscap download``'s options, and how they map onto img2dataset's."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from lenscap import __version__
from lenscap.core.options import Argument, Executed, OwnedOutput, check, option
from lenscap.download.host_policy import BACKOFF, DEFAULT_CONCURRENCY, DEFAULT_RPS, MAX_CONCURRENCY, HostPolicy

__all__ = ["DownloadOptions", "RESIZE_MODES", "FETCH_FIELDS", "PROJECT_URL"]

PROJECT_URL = "https://pypi.org/project/lenscap-datasets/"  # the default contact in the User-Agent: the project's page

# lenscap's name -> img2dataset's. "keep_ratio" bounds the LONGEST side (img2dataset's
# keep_ratio_largest): text-to-image data keeps whole images; img2dataset's keep_ratio bounds the shortest.
RESIZE_MODES = {
    "no": "no",
    "keep_ratio": "keep_ratio_largest",
    "keep_ratio_smallest": "keep_ratio",
    "center_crop": "center_crop",
    "border": "border",
}


@dataclass(kw_only=True, frozen=True)
class DownloadOptions(OwnedOutput, Executed):
    command: ClassVar[str] = "download"
    help: ClassVar[str] = "Download images from a URL list into a dataset directory (through img2dataset). Rerun to resume."
    example: ClassVar[str] = "lenscap download urls.csv data/raw --processes 8 --min-side 256"
    arguments: ClassVar[tuple[Argument, ...]] = (
        Argument(
            "paths",
            "INPUT OUT_DIR: a URL list (txt/csv/tsv/jsonl/parquet, a directory or glob of them, or - for stdin) and "
            "the output dataset directory (a path, or a URL such as s3://bucket/raw). With --retry-failed: just OUT_DIR.",
            metavar="[INPUT] OUT_DIR",
            many=True,
        ),
    )

    url_col: str | None = option(None, "URL column (default: url, URL, image_url or img_url, whichever exists).")
    caption_col: str | None = option(
        None, "Caption (alt-text) column (default: caption, alt_text, alt, text or TEXT, whichever exists)."
    )
    extra_cols: str | None = option(None, "Comma-separated input columns to keep in the output.")
    samples_per_shard: int = option(10_000, "Samples per shard.")
    threads: int = option(32, "Download threads per process.")
    image_size: int = option(1024, "Size in pixels that --resize-mode fits images to.")
    resize_mode: str = option(
        "keep_ratio",
        "keep_ratio (longest side <= --image-size), keep_ratio_smallest (shortest side), center_crop, border, or no.",
    )
    upscale: bool = option(False, "Also enlarge images smaller than --image-size.", show_default="off")
    min_side: int | None = option(
        None,
        "Drop images whose shorter side is below this many pixels.",
        show_default="no limit",
        old_names=("--min-image-size",),
    )
    max_aspect: float | None = option(
        None,
        "Drop images more elongated than this (long side / short side).",
        show_default="no limit",
        old_names=("--max-aspect-ratio",),
    )
    max_pixels: int = option(178_956_970, "Reject images with more pixels than this (decompression bombs).")
    encode_quality: int = option(95, "JPEG quality (0-100) of the images img2dataset re-encodes.")
    timeout: int = option(10, "Seconds one download may take in all: connecting, and the whole image.")
    max_retries: int = option(2, "Extra attempts per failed download.", old_names=("--retries",))
    max_error_share: float = option(
        0.5,
        "The share of URLs that may fail to download with the run still a success (exit 0); more, or all of "
        "them, is exit 1, naming the commonest reason.",
    )
    per_host_rps: float | None = option(
        None,
        "Requests per second to one host (its registrable domain, else its address), across every process of "
        "the job; 0: no limit. Unset, a private address (fetched with --allow-private-network) has none.",
        show_default=f"{DEFAULT_RPS:g}, none for a private address",
    )
    per_host_concurrency: int | None = option(
        None,
        "Open connections to one host at a time, across every process of the job; 0: no limit. Unset, a "
        "private address has none.",
        show_default=f"{DEFAULT_CONCURRENCY}, none for a private address",
    )
    user_agent_token: str = option(
        "lenscap", "The token robots.txt groups and X-Robots-Tag directives are matched against (this crawler's name)."
    )
    respect_opt_out: bool = option(
        True,
        "Skip images whose response headers say X-Robots-Tag noai, noimageai, noml, noindex or noimageindex (read "
        "before the body, which is then not downloaded).",
        show_default="on",
    )
    ignore_robots: bool = option(
        False,
        "Do not read robots.txt: fetch paths that hosts disallow (only for a list you have the rights to; recorded "
        "in the manifest).",
        show_default="off",
    )
    contact: str = option(PROJECT_URL, "A URL or email address where site operators can reach you, sent in the User-Agent.")
    user_agent: str | None = option(
        None,
        "The whole User-Agent header, sent with every request, robots.txt included (default: lenscap/VERSION (+CONTACT)).",
    )
    retry_failed: bool = option(
        False,
        "After downloading, fetch the failed downloads of completed shards again and merge the successes.",
        switch=True,
        show_default=False,
    )
    allow_private_network: bool = option(
        False,
        "Also fetch from loopback, private, link-local and other non-public addresses (refused by default: a URL "
        "list must not reach your network).",
        show_default="off",
    )

    def validate(self) -> None:
        super().validate()
        check(self.samples_per_shard >= 1, f"--samples-per-shard must be at least 1, not {self.samples_per_shard}")
        check(self.threads >= 1, f"--threads must be at least 1, not {self.threads}")
        check(self.image_size >= 1, f"--image-size must be at least 1, not {self.image_size}")
        check(
            self.resize_mode in RESIZE_MODES,
            f"--resize-mode must be one of {', '.join(RESIZE_MODES)}, not {self.resize_mode!r}",
        )
        check(self.min_side is None or self.min_side >= 0, f"--min-side must not be negative, not {self.min_side}")
        check(self.max_aspect is None or self.max_aspect >= 1, f"--max-aspect must be at least 1, not {self.max_aspect}")
        check(self.max_pixels >= 1, f"--max-pixels must be at least 1, not {self.max_pixels}")
        check(self.timeout >= 1, f"--timeout must be at least 1 second, not {self.timeout}")
        check(self.max_retries >= 0, f"--max-retries must not be negative, not {self.max_retries}")
        check(0 <= self.max_error_share <= 1, f"--max-error-share must be between 0 and 1, not {self.max_error_share}")
        check(
            self.per_host_rps is None or (self.per_host_rps >= 0 and math.isfinite(self.per_host_rps)),
            f"--per-host-rps must be a number of requests per second, 0 for no limit, not {self.per_host_rps}",
        )
        check(
            self.per_host_concurrency is None or 0 <= self.per_host_concurrency <= MAX_CONCURRENCY,
            f"--per-host-concurrency must be between 0 (no limit) and {MAX_CONCURRENCY}, not {self.per_host_concurrency}",
        )
        check(0 <= self.encode_quality <= 100, f"--encode-quality must be between 0 and 100, not {self.encode_quality}")
        for name, value in (("--contact", self.contact), ("--user-agent", self.user_agent or "")):
            check(value.isprintable(), f"{name} must be one line of printable text, not {value!r}")

    @property
    def user_agent_header(self) -> str:
        """The User-Agent of every request: ``--user-agent``, else lenscap, its version and ``--contact``."""
        if self.user_agent:
            return self.user_agent
        return f"lenscap/{__version__}" + (f" (+{self.contact})" if self.contact else "")

    @property
    def extra_columns(self) -> list[str]:
        return [c.strip() for c in (self.extra_cols or "").split(",") if c.strip()]

    # -- what img2dataset and the output's claim are told --------------------------------------------

    def output_shaping(self) -> dict[str, Any]:
        """The settings a rerun must repeat for its shards to match the earlier ones (the claim holds the
        output to them), under the names img2dataset gives them (``_SHAPING``). Like --timeout, the
        network rule decides which fetches succeed, not what a success is: a rerun may change it, and
        --retry-failed fetches what it refused before."""
        return {key: to_claim(getattr(self, name)) for name, key, to_claim, _, _ in _SHAPING}

    def with_recorded(self, settings: dict[str, Any]) -> DownloadOptions:
        """These options with the output-shaping settings an earlier run recorded (``output_shaping``)."""
        recorded = {}
        for name, key, _, from_claim, absent in _SHAPING:
            if key in settings:
                recorded[name] = from_claim(settings[key])
            elif absent is not _KEEP:  # recorded before the setting existed: what that version did
                recorded[name] = absent
        return dataclasses.replace(self, **recorded)

    def fetch_settings(self) -> dict[str, Any]:
        """How this run fetches (``FETCH_FIELDS``): recorded in the work directory by every run, so that
        ``--retry-failed`` alone replays them."""
        return {name: getattr(self, name) for name in FETCH_FIELDS}

    def with_recorded_fetch(self, recorded: dict[str, Any], given: set[str] | None = None) -> DownloadOptions:
        """These options with the fetch settings an earlier run recorded (``fetch_settings``), but for the
        fields the caller ``given`` (None: those that differ from the defaults): a retry is asked as the
        download it retries was, unless told otherwise."""
        if given is None:
            given = {f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}
        if given & {"executor", "ray_address"}:  # a pair: another executor does not take the recorded cluster
            given = set(given) | {"executor", "ray_address"}
        return dataclasses.replace(self, **{n: recorded[n] for n in FETCH_FIELDS if n in recorded and n not in given})

    def politeness(self, robots_dir: str | None) -> dict[str, Any]:
        """What lenscap's opener in img2dataset's workers is told (``img2dataset_hooks.install_politeness``):
        the User-Agent, the token, whether robots.txt and X-Robots-Tag are read, where the job keeps robots.txt
        (``robots_dir``; None: each process keeps its own), and how long its fetch may take."""
        return {
            "user_agent": self.user_agent_header,
            "token": self.user_agent_token,
            "respect_opt_out": self.respect_opt_out,
            "ignore_robots": self.ignore_robots,
            "robots_dir": robots_dir,
            "timeout": self.timeout,
        }

    def host_policy(self, directory: str) -> HostPolicy:
        """The per-host limits of this run, their shared state in ``directory``."""
        return HostPolicy(directory, rps=self.per_host_rps, concurrency=self.per_host_concurrency, **BACKOFF)

    def img2dataset_kwargs(self, url_dir: str, staging: str, processes: int, ray: bool) -> dict[str, Any]:
        return {
            "url_list": url_dir,
            "input_format": "parquet",
            "url_col": "url",
            "caption_col": "caption",
            "save_additional_columns": self.extra_columns or None,
            "output_folder": staging,
            "output_format": "webdataset",
            "number_sample_per_shard": self.samples_per_shard,
            "processes_count": processes,
            "thread_count": self.threads,
            "image_size": self.image_size,
            "resize_mode": RESIZE_MODES[self.resize_mode],
            "resize_only_if_bigger": not self.upscale,
            "min_image_size": self.min_side or 0,
            "max_aspect_ratio": math.inf if self.max_aspect is None else self.max_aspect,
            "max_image_area": float(self.max_pixels),
            "timeout": self.timeout,
            "retries": self.max_retries,
            "user_agent_token": self.user_agent_token or None,
            # lenscap's opener reads X-Robots-Tag before the body, knows noml, and remembers an opt-out so
            # that img2dataset's retries do not ask for it again (img2dataset's check would, each time):
            # img2dataset's own check stays off.
            "disallowed_header_directives": [],
            "encode_quality": self.encode_quality,
            "enable_wandb": False,
            "incremental_mode": "incremental",
            "compute_hash": "sha256",
            "oom_shard_count": 5,
            "distributor": "ray" if ray else "multiprocessing",
        }


# The fields that decide how URLs are fetched rather than what a shard holds (those are ``_SHAPING``):
# a rerun may change them, and ``--retry-failed`` without them replays the last run's. What is left
# (retry_failed, overwrite) says what this one invocation does.
FETCH_FIELDS = (
    "allow_private_network",
    "ignore_robots",
    "contact",
    "user_agent",
    "timeout",
    "max_retries",
    "threads",
    "processes",
    "max_error_share",
    "per_host_rps",
    "per_host_concurrency",
    "executor",
    "ray_address",
)


def _same(value: Any) -> Any:
    return value


_KEEP = object()  # a setting an older claim lacks: this run's value stands
# The output-shaping fields: (field, the claim's key (img2dataset's name), to the claim, from the claim,
# the value when an older claim lacks the key). A field that changes what a shard holds is one row here.
_SHAPING: tuple[tuple[str, str, Any, Any, Any], ...] = (
    ("url_col", "url_col", _same, _same, None),
    ("caption_col", "caption_col", _same, _same, None),
    (
        "extra_cols",
        "extra_cols",
        lambda v: [c.strip() for c in (v or "").split(",") if c.strip()],
        lambda v: ",".join(v) if isinstance(v, list) else v,
        None,
    ),
    ("samples_per_shard", "samples_per_shard", _same, _same, _KEEP),
    ("image_size", "image_size", _same, _same, _KEEP),
    ("resize_mode", "resize_mode", _same, _same, _KEEP),
    ("upscale", "upscale", _same, _same, _KEEP),
    ("min_side", "min_image_size", lambda v: v or 0, lambda v: v or None, None),
    ("max_aspect", "max_aspect_ratio", _same, _same, None),
    ("max_pixels", "max_pixels", _same, _same, _KEEP),
    ("user_agent_token", "user_agent_token", lambda v: v or None, lambda v: v or "", ""),
    ("respect_opt_out", "respect_opt_out", _same, _same, _KEEP),
    ("encode_quality", "encode_quality", _same, _same, _KEEP),
)
