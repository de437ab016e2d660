"""Which addresses a download may connect to: by default only globally routable ones.

A URL list is untrusted input: taken from the web, it can name ``http://169.254.169.254/`` (a cloud's
metadata service), ``localhost``, a router on ``192.168.0.1``, or a public host that redirects to
one of them, and a downloader that fetched them would store the answers as images (server-side
request forgery). So the check is made where the connection is made, inside img2dataset's fetch
(``lenscap.download.img2dataset_hooks`` installs this opener): the host is resolved once, every address it
resolves to is vetted, and the socket connects to a vetted address (never a second lookup that could
answer otherwise); every redirect hop goes through the same check. Numeric forms such as
``0x7f000001`` or ``2130706433`` resolve to the address they mean and are vetted as it.

Refused: loopback, private (RFC 1918, unique-local), link-local, shared (CGNAT, 100.64/10),
multicast, unspecified, reserved and documentation addresses, v4 and v6 (and v4 mapped into v6):
whatever Python's ``ipaddress`` does not call global. ``--allow-private-network`` turns the check
off, for a crawl of one's own network, and for the demo and tests that serve images on loopback.
Through a proxy (``http_proxy``/``https_proxy``), the target's name is resolved and vetted here and
the connection goes to the proxy, which is the user's own configuration.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

__all__ = ["allow_private_network", "on_connected", "refusal", "GuardedHTTPHandler", "GuardedHTTPSHandler", "REFUSED"]

REFUSED = "refused to connect"  # how every refusal starts, for the per-sample message and --retry-failed
_allowed = False


def allow_private_network(allowed: bool) -> None:
    """Turn the check off (True) or on for this process (and the workers that inherit it)."""
    global _allowed
    _allowed = bool(allowed)


def refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a download may not connect to ``ip`` (a kind of address), or None if it may."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind, test in (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("unspecified", ip.is_unspecified),
    ):
        if test:
            return kind
    if isinstance(ip, ipaddress.IPv4Address) and ip in ipaddress.IPv4Network("100.64.0.0/10"):
        return "shared (CGNAT)"
    if ip.is_private:
        return "private or special-purpose"
    if ip.is_reserved or not ip.is_global:
        return "reserved"
    return None


def _resolve(host: str, port: int) -> list[tuple[Any, ...]]:
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


def _vetted(host: str, port: int) -> list[tuple[Any, ...]]:
    """The addresses ``host`` resolves to, if every one may be connected to; else an ``OSError`` naming the rule."""
    infos = _resolve(host, port)
    if _allowed:
        return infos
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        why = refusal(ip)
        if why is not None:
            shown = host if host == str(ip) else f"{host} ({ip})"
            raise OSError(f"{REFUSED} {shown}: a {why} address; pass --allow-private-network to fetch from it")
    return infos


def _connect(
    address: tuple[str, int],
    timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT,  # type: ignore[attr-defined]
    source_address: Any = None,
) -> socket.socket:
    """``socket.create_connection``, to the addresses vetted for ``address``'s host and nothing else."""
    host, port = address
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in _vetted(host, port):
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            error = e
    raise error or OSError(f"{host} resolves to no address")


_connected: Callable[[], None] | None = None


def on_connected(hook: Callable[[], None] | None) -> None:
    """Call ``hook()`` once each connection is made (TLS included), just before its request is sent:
    where the per-host limiter (``host_limits``) waits for the host's turn, so that a request goes at
    its turn rather than a connection's set-up later."""
    global _connected
    _connected = hook


class _TurnOnConnect:
    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        if _connected is not None:
            _connected()


class _ProxiedHTTPConnection(_TurnOnConnect, http.client.HTTPConnection):
    pass


class _ProxiedHTTPSConnection(_TurnOnConnect, http.client.HTTPSConnection):
    pass


class _GuardedHTTPConnection(_TurnOnConnect, http.client.HTTPConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _connect


class _GuardedHTTPSConnection(_TurnOnConnect, http.client.HTTPSConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _connect  # the TLS layer still checks the certificate against the name


def _through_proxy(req: urllib.request.Request) -> bool:
    """Whether ``req`` goes through a proxy; then its target is vetted by name and the proxy is connected to."""
    target = urllib.parse.urlsplit(req.full_url)
    if not (req.has_proxy() or getattr(req, "_tunnel_host", None)):
        return False
    _vetted(target.hostname or "", target.port or (443 if target.scheme == "https" else 80))
    return True


class GuardedHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_ProxiedHTTPConnection if _through_proxy(req) else _GuardedHTTPConnection, req)


class GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> Any:
        kwargs: dict[str, Any] = {"context": self._context}  # type: ignore[attr-defined]
        if hasattr(self, "_check_hostname"):  # Python < 3.12
            kwargs["check_hostname"] = self._check_hostname
        return self.do_open(_ProxiedHTTPSConnection if _through_proxy(req) else _GuardedHTTPSConnection, req, **kwargs)
