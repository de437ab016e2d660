"""What lenscap adds inside img2dataset's worker processes, and the entry point of its subprocess.

img2dataset (pinned to the version these hooks were written against) spawns its workers and
sends them its resizer by pickle. Handing it ``GuardedResizer`` instead of its own ``Resizer``
makes every worker import this module and, as it unpickles the resizer (``install_guards``, and
``main`` in img2dataset's own process):

- installs a URL opener that speaks only http and https (img2dataset's urllib would also read
  ``file://`` and ``data:`` URLs, a local-file leak for untrusted URL lists), and connects only to
  globally routable addresses unless ``--allow-private-network`` (``lenscap.download.netguard``: checked on
  the resolved address, on every redirect hop);
- is polite (``_PoliteHandler``, set up from the ``politeness`` settings): every request carries lenscap's
  User-Agent, a URL that its origin's robots.txt disallows is never requested
  (``lenscap.download.robots``), and a response whose ``X-Robots-Tag`` opts out
  (``lenscap.download.optout``) is dropped after its headers, before its body is read;
- checks each downloaded body before OpenCV decodes it, so HTML served as a JPEG, truncated files
  and decompression bombs get a status naming the problem instead of OpenCV's generic one or an
  out-of-memory kill.

With a ``progress_dir`` in the config, the webdataset writer is wrapped too (``CountingWriter``), so
that lenscap's progress counts samples as they are written rather than shards as they finish.

``main(PARENT_PID)`` is the subprocess's entry point, with the config on stdin
(``img2dataset_process.Img2datasetProcess`` starts it): in its own process group, its output sent
to a log file.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import io
import json
import math
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from typing import Any

from img2dataset.resizer import Resizer
from img2dataset.writer import WebDatasetSampleWriter
from PIL import Image

from lenscap.core.executors import connect_ray
from lenscap.download import host_limits, netguard, optout, robots

# The package re-exports a function named ``main`` over its module of that name: fetch the module.
_i2d_main = importlib.import_module("img2dataset.main")
_i2d_distributor = importlib.import_module("img2dataset.distributor")

DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's DecompressionBombError threshold


class _OnlyHttpHandler(urllib.request.BaseHandler):
    """Answers every scheme without a handler (file, ftp, data, ...) with a clear refusal."""

    handler_order = 10_000

    def unknown_open(self, req: urllib.request.Request):  # noqa: D401 - urllib's hook name
        raise urllib.error.URLError(f"unsupported URL scheme {req.type!r}: only http and https are fetched")


class _WholeRequestOpener(urllib.request.OpenerDirector):
    """img2dataset's ``timeout`` bounds each socket operation; this opener makes it bound the whole
    request, so that a server sending a byte at a time cannot hold a download (and its worker) for ever.
    Each request waits for its host's connection and turn (``host_limits``: rate, connections, backoff),
    which the timeout does not count, and tells the host's limiter what came back."""

    def open(self, fullurl: Any, data: Any = None, timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT) -> Any:  # type: ignore[attr-defined]
        with host_limits.hop() as first_hop:
            turn = host_limits.Turn(host_limits.installed(), fullurl, first_hop)
            started = time.monotonic()
            try:
                response = super().open(fullurl, data, timeout)
            except Exception as e:
                turn.settled()
                turn.observe(e)
                turn.release()
                given_up = getattr(e, "reason", None)  # urllib wraps what the connection raised
                if isinstance(given_up, host_limits.HostGivenUp):
                    raise given_up from None  # the sample's message is the reason, as it is
                raise
            except BaseException:
                turn.settled()
                turn.release()
                raise
            turn.settled()
        turn.observe(None)
        limited = isinstance(timeout, (int, float))
        # The wait for the host's turn is not the download's: the deadline starts after it.
        deadline = started + turn.waited + timeout if limited else math.inf
        return _WithinDeadline(response, deadline, timeout, turn)


class _WithinDeadline:
    """A response whose body must have arrived by ``deadline``: read in pieces, each given the time left.
    Closing it gives its host's connection back (``turn``)."""

    def __init__(self, response: Any, deadline: float, timeout: Any, turn: host_limits.Turn) -> None:
        self._response, self._deadline, self._timeout, self._turn = response, deadline, timeout, turn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._response, name)

    def __enter__(self) -> _WithinDeadline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._response.close()
        finally:
            self._turn.release()

    def read(self, amount: int | None = None) -> bytes:
        try:
            return self._read(amount)
        except OSError as e:  # a timeout or a reset mid-body: the host failed this request
            self._turn.observe(e)
            raise

    def _read(self, amount: int | None) -> bytes:
        pieces: list[bytes] = []
        got = 0
        while amount is None or got < amount:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the whole download took more than --timeout {self._timeout:g}s")
            with contextlib.suppress(AttributeError, OSError):  # the socket under http.client's buffer
                if left != math.inf:
                    self._response.fp.raw._sock.settimeout(left)
            try:
                # read1: one read of the socket at most (read(n) would wait for all n bytes, however slowly).
                piece = self._response.read1(65536 if amount is None else min(65536, amount - got))
            except TimeoutError:
                raise TimeoutError(f"the whole download took more than --timeout {self._timeout:g}s") from None
            if not piece:
                break
            pieces.append(piece)
            got += len(piece)
        return b"".join(pieces)


class Refused(host_limits.NotSent):
    """A request lenscap will not send, or a response it will not read; its text is the row's message."""


class _OptedOut:
    """The URLs whose responses opted out, so that img2dataset's retries of them are not sent (bounded)."""

    def __init__(self, size: int = 65_536) -> None:
        self._urls: OrderedDict[str, str] = OrderedDict()
        self._size, self._lock = size, threading.Lock()

    def get(self, url: str) -> str | None:
        with self._lock:
            return self._urls.get(url)

    def add(self, url: str, message: str) -> None:
        with self._lock:
            self._urls[url] = message
            while len(self._urls) > self._size:
                self._urls.popitem(last=False)


class _PoliteHandler(urllib.request.BaseHandler):
    """Every request: lenscap's User-Agent (img2dataset's Firefox-like one is replaced), and robots.txt
    asked first (``robots``, None: not read). Every answer: its ``X-Robots-Tag`` read before the body
    (``opt_out_token``, None: not read); an opt-out closes the connection and fails the request."""

    handler_order = 400  # before the error processor (1000), which would raise on a 4xx first

    def __init__(self, user_agent: str, robots_rules: robots.Robots | None = None, opt_out_token: str | None = None) -> None:
        self.user_agent, self.robots, self.opt_out_token = user_agent, robots_rules, opt_out_token
        self.opted_out = _OptedOut()

    def http_request(self, req: urllib.request.Request) -> urllib.request.Request:
        req.add_header("User-Agent", self.user_agent)  # the one header key urllib keeps: replaces img2dataset's
        if self.opt_out_token is not None and (said := self.opted_out.get(req.full_url)):
            raise Refused(said)
        if self.robots is not None and (why := self.robots.refusal(req.full_url)):
            raise Refused(why)
        return req

    def http_response(self, req: urllib.request.Request, response: Any) -> Any:
        if self.opt_out_token is None or not 200 <= response.status < 300:
            return response
        directive = optout.opted_out(response.headers.get_all("X-Robots-Tag") or [], self.opt_out_token)
        if directive is None:
            return response
        response.close()  # the body stays unread: the server sees the connection go
        message = f"{optout.DISALLOWED}: {directive}"
        self.opted_out.add(req.full_url, message)
        raise Refused(message)

    https_request = http_request
    https_response = http_response


def build_http_only_opener(
    polite: _PoliteHandler | None = None, max_redirections: int = urllib.request.HTTPRedirectHandler.max_redirections
) -> urllib.request.OpenerDirector:
    opener = _WholeRequestOpener()
    redirects = urllib.request.HTTPRedirectHandler()  # refuses redirects to non-http schemes itself
    redirects.max_redirections = max_redirections
    for handler in (
        _OnlyHttpHandler(),
        urllib.request.ProxyHandler(),  # honours http_proxy / https_proxy / no_proxy, as urllib's default does
        netguard.GuardedHTTPHandler(),
        netguard.GuardedHTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        redirects,
        urllib.request.HTTPErrorProcessor(),
        *([polite] if polite is not None else []),
    ):
        opener.add_handler(handler)
    if polite is not None:
        opener.addheaders = [("User-agent", polite.user_agent)]
    return opener


def robots_opener(user_agent: str) -> urllib.request.OpenerDirector:
    """How robots.txt is fetched: the downloads' guard, their User-Agent, and at most
    ``robots.MAX_REDIRECTS`` redirects (RFC 9309 2.3.1.2)."""
    return build_http_only_opener(_PoliteHandler(user_agent), max_redirections=robots.MAX_REDIRECTS)


def install_politeness(settings: dict[str, Any] | None) -> None:
    """This process's opener, polite as ``settings`` say (``DownloadOptions.politeness``): the User-Agent,
    robots.txt (read through an opener of its own, with the same guard and User-Agent) and the opt-outs.
    The same settings again (img2dataset unpickles its resizer for every shard) keep what is read."""
    global _politeness
    if not settings or settings == _politeness:
        return
    polite = _PoliteHandler(settings["user_agent"], opt_out_token=settings["token"] if settings["respect_opt_out"] else None)
    if settings["ignore_robots"]:
        robots.configure(None)
        host_limits.set_min_interval(None)
    else:
        fetcher = robots_opener(settings["user_agent"])
        polite.robots = robots.Robots(fetcher, settings["token"], settings["robots_dir"], settings["timeout"])
        robots.configure(polite.robots)
        host_limits.set_min_interval(robots.known_crawl_delay)  # Crawl-delay: the least interval per host
    urllib.request.install_opener(build_http_only_opener(polite))
    _politeness = dict(settings)


_politeness: dict[str, Any] | None = None
_guarded = False


def install_guards() -> None:
    """In a process that downloads (img2dataset's, its workers, a Ray task), once: urllib speaks only
    http and https through the network guard, and Pillow's own pixel limit is off (``check_image_bytes``
    applies --max-pixels itself, above or below it, with a clearer message). Not at import: a process
    that imports this module for its helpers (a test) keeps its own urllib and Pillow."""
    global _guarded
    if _guarded:
        return
    urllib.request.install_opener(build_http_only_opener())
    Image.MAX_IMAGE_PIXELS = None
    _guarded = True


def check_image_bytes(data: bytes, max_pixels: int) -> str | None:
    """Why these bytes are not a usable image, or None. Reads headers only: cheap per image."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            fmt = im.format
    except Exception:  # noqa: BLE001 - any failure to identify means "not an image"
        head = data[:24].decode("latin-1").strip()
        if head.lower().startswith(("<!doctype", "<html", "<?xml", "<head", "<body")):
            return f"not an image: the server sent HTML or XML ({len(data)} bytes starting {head[:15]!r})"
        return f"not an image: unrecognised format ({len(data)} bytes)"
    if width * height > max_pixels:
        return f"decompression bomb: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
    tail = data[-4096:]
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        return f"truncated image: JPEG without its end marker ({len(data)} bytes)"
    if fmt == "PNG" and b"IEND" not in tail:
        return f"truncated image: PNG without its IEND chunk ({len(data)} bytes)"
    if fmt == "GIF" and not data.rstrip(b"\x00").endswith(b"\x3b"):
        return f"truncated image: GIF without its trailer ({len(data)} bytes)"
    if fmt == "WEBP" and len(data) < int.from_bytes(data[4:8], "little") + 8:
        return f"truncated image: WebP shorter than its header says ({len(data)} bytes)"
    return None


class GuardedResizer(Resizer):
    """img2dataset's resizer, after a header-level check of the downloaded bytes."""

    def __init__(
        self,
        *args,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        allow_private_network: bool = False,
        politeness: dict[str, Any] | None = None,
        host_limits: dict[str, Any] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_pixels = max_pixels
        self.allow_private_network = allow_private_network
        self.politeness = politeness
        self.host_limits = host_limits

    def __setstate__(self, state: dict) -> None:
        # img2dataset's workers receive the resizer by pickle before they fetch anything (a spawned
        # process, a Ray task on another node): the network rule, the politeness and the per-host
        # limits travel with it.
        self.__dict__.update(state)
        install_guards()
        netguard.allow_private_network(self.__dict__.get("allow_private_network", False))
        install_politeness(self.__dict__.get("politeness"))
        host_limits.install(self.__dict__.get("host_limits"))

    def __call__(self, img_stream, blurring_bbox_list=None):
        # A Ray worker (img2dataset's ray distributor) never ran main() below: the same second line here.
        os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(self.max_pixels))
        img_stream.seek(0)
        problem = check_image_bytes(img_stream.getvalue(), self.max_pixels)
        if problem is not None:
            return None, None, None, None, None, problem
        img_stream.seek(0)
        return super().__call__(img_stream, blurring_bbox_list)


class CountingWriter:
    """img2dataset's webdataset writer, counting each sample as it is written: one byte appended to
    ``PROGRESS_DIR/SHARD.ok`` or ``SHARD.failed``, so the sizes of those files are the shard's
    successes and failures so far. lenscap's progress reads them (``download._LiveSamples``): a stat
    per file, no parsing, and nothing read from the shard's tar or parquet while they are written.

    A shard started again (img2dataset's retry of a failed shard, a rerun) starts its counts again.
    """

    def __init__(self, progress_dir: str, shard_id: int, output_folder: str, *args, **kwargs) -> None:
        self._inner = WebDatasetSampleWriter(shard_id, output_folder, *args, **kwargs)
        self._counts = {}
        try:
            os.makedirs(progress_dir, exist_ok=True)
            for outcome in ("ok", "failed"):
                self._counts[outcome] = open(os.path.join(progress_dir, f"{int(shard_id)}.{outcome}"), "wb", buffering=0)
        except OSError:
            self._close_counts()  # progress is a nicety: the download goes on without it

    def write(self, img_str, key, caption, meta) -> None:
        self._inner.write(img_str, key, caption, meta)
        f = self._counts.get("ok" if meta.get("status") == "success" else "failed")
        if f is not None:
            try:
                f.write(b".")
            except OSError:
                self._close_counts()

    def close(self) -> None:
        self._inner.close()
        self._close_counts()

    def _close_counts(self) -> None:
        for f in self._counts.values():
            with contextlib.suppress(OSError):
                f.close()
        self._counts = {}


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM us when the lenscap process that started us dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _fork_instead_of_spawn() -> None:
    """img2dataset starts its worker pool and its logger process by spawning, and each spawned process
    imports img2dataset again: seconds of CPU apiece, most of the fixed start-up of a small download.
    Forked from this process, which has imported it once and runs no thread yet (not joined to Ray),
    they start at once.
    Linux only (elsewhere fork is not safe with the system's libraries): there img2dataset's way stands."""
    if not sys.platform.startswith("linux"):
        return
    fork = multiprocessing.get_context("fork")
    _i2d_distributor.get_context = lambda method=None: fork  # the pool's one look-up of its start method

    class ForkedLogger(_i2d_main.LoggerProcess):  # a SpawnProcess subclass: its start method is its class's
        _start_method = "fork"

        @staticmethod
        def _Popen(process_obj: Any) -> Any:  # noqa: N802 - multiprocessing's hook name
            return fork.Process._Popen(process_obj)

    _i2d_main.LoggerProcess = ForkedLogger


def main(parent: int) -> int:
    _die_with_parent()
    install_guards()
    # We lead our own process group (start_new_session): take img2dataset's workers down with us.
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))
    if os.getppid() != parent:  # lenscap died before PR_SET_PDEATHSIG took effect
        return 3
    # lenscap starts us before it has read the URL list, so that img2dataset's imports (above, over
    # a second) overlap that work. The config arrives on stdin; nothing arrives if it is not needed.
    message = sys.stdin.buffer.read()
    if not message:
        return 0
    request = json.loads(message)
    with open(request["log_file"], "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    config = request["download"]
    max_pixels = int(config.pop("max_pixels"))
    allow_private = bool(config.pop("allow_private_network", False))
    netguard.allow_private_network(allow_private)
    politeness = config.pop("politeness", None)
    install_politeness(politeness)
    ray_address = config.pop("ray_address", None)
    limits = config.pop("host_limits", None)
    if ray_address:  # img2dataset's ray distributor runs its tasks on the cluster we join here
        # Joined as lenscap joins any cluster: a Ray that lenscap started on loopback is joined there.
        ray = connect_ray(ray_address)
        if limits is not None:  # each node keeps its own table, with its share of every host's limits
            nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
            limits = host_limits.HostPolicy.from_dict(limits).divided(nodes).to_dict()
    host_limits.install(limits)
    # OpenCV refuses to allocate for images beyond this, a second line behind check_image_bytes.
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(max_pixels)

    def resizer_factory(*args, **kwargs):
        return GuardedResizer(
            *args,
            max_pixels=max_pixels,
            allow_private_network=allow_private,
            politeness=politeness,
            host_limits=limits,
            **kwargs,
        )

    _i2d_main.Resizer = resizer_factory  # the one name download() constructs its resizer by
    if not ray_address:  # joined to Ray, this process runs Ray's threads (gRPC): no fork then
        _fork_instead_of_spawn()
    progress_dir = config.pop("progress_dir", None)
    if progress_dir and config.get("output_format") == "webdataset":
        # Pickled to each worker (a partial of a class this module defines): counts as samples are written.
        _i2d_main.WebDatasetSampleWriter = functools.partial(CountingWriter, progress_dir)
    _i2d_main.download(**config)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
