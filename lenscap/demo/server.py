"""A threaded HTTP server on loopback that serves images and the web's failure modes.

``ImageServer(hosts=True)`` listens on 0.0.0.0, so that every 127.0.0.X is a host of its own (a list
on eight hosts needs one server, ``url(path, host="127.0.0.3")``), and logs which address each request
came to and when (``requests``): what download politeness is measured by. ``cut_off`` counts, per
path, the responses whose client closed the connection before the body was sent in full. A route
keyed ``//127.0.0.3/robots.txt`` answers that path at that address only, before one keyed by its path.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["Route", "ImageServer"]


@dataclass
class Route:
    body: bytes = b""
    content_type: str = "image/jpeg"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    fail_first: int = 0  # answer the first N requests with a 503, as an overloaded server does
    fail_status: int = 503  # what those N answers are: 503, or 429 (too many requests)
    fail_headers: dict[str, str] = field(default_factory=dict)  # and their headers: {"Retry-After": "2"}
    drip_s: float = 0.0  # send the body one byte every this many seconds (each read quick, the whole slow)


@dataclass(frozen=True)
class Request:
    """One request as the server saw it: the address it came to (the host), the path, when (monotonic),
    and the User-Agent it was sent with."""

    host: str
    path: str
    at: float
    user_agent: str


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's hook name
        with self.server.lock:
            hits = self.server.hits[self.path] = self.server.hits.get(self.path, 0) + 1
            host = self.connection.getsockname()[0]
            self.server.requests.append(Request(host, self.path, time.monotonic(), self.headers.get("User-Agent", "")))
        route = self.server.routes.get(f"//{host}{self.path}") or self.server.routes.get(self.path)
        if route is None:
            route = Route(b"not found", "text/plain", 404)
        if route.delay_s:
            time.sleep(route.delay_s)
        if hits <= route.fail_first:
            route = Route(b"busy", "text/plain", route.fail_status, dict(route.fail_headers))
        try:
            self.send_response(route.status)
            self.send_header("Content-Type", route.content_type)
            self.send_header("Content-Length", str(len(route.body)))
            for k, v in route.headers.items():
                self.send_header(k, v)
            self.end_headers()
            if route.drip_s:
                for i in range(len(route.body)):
                    self.wfile.write(route.body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(route.drip_s)
            else:
                self.wfile.write(route.body)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (a timeout test), or would not read the body (an opt-out in the headers).
            with self.server.lock:
                self.server.cut_off[self.path] = self.server.cut_off.get(self.path, 0) + 1

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The default backlog of 5 drops connections under 64 concurrent downloaders: clients then stall
    # on SYN retransmits, which would make benchmarks measure the server rather than the client.
    request_queue_size = 1024
    routes: dict[str, Route]
    hits: dict[str, int]
    cut_off: dict[str, int]
    requests: list[Request]
    lock: threading.Lock


class ImageServer:
    """``with ImageServer(routes) as s: s.url("/a.jpg")``; routes can be added while it runs."""

    def __init__(self, routes: dict[str, Route] | None = None, hosts: bool = False) -> None:
        self._server = _Server(("0.0.0.0" if hosts else "127.0.0.1", 0), _Handler)
        self._server.routes = dict(routes or {})
        self._server.hits = {}
        self._server.cut_off = {}
        self._server.requests = []
        self._server.lock = threading.Lock()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def routes(self) -> dict[str, Route]:
        return self._server.routes

    @property
    def hits(self) -> dict[str, int]:
        return self._server.hits

    @property
    def cut_off(self) -> dict[str, int]:
        """Per path: the responses whose body the client did not take in full (it closed the connection)."""
        with self._server.lock:
            return dict(self._server.cut_off)

    @property
    def requests(self) -> list[Request]:
        """Every request so far, in arrival order (a copy)."""
        with self._server.lock:
            return list(self._server.requests)

    def url(self, path: str, host: str | None = None) -> str:
        """``path``'s URL at ``host`` (a 127.0.0.X address; with ``hosts=True`` any of them answers)."""
        bound, port = self._server.server_address[:2]
        return f"http://{host or ('127.0.0.1' if bound == '0.0.0.0' else bound)}:{port}{path}"

    def start(self) -> ImageServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
