"""A URL's host as politeness counts it: its registrable domain, else its address or name."""

from __future__ import annotations

import pytest

from lenscap.download import hosts
from lenscap.download.hosts import UNKNOWN_HOST, host_of


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://a.b.example.co.uk/x.jpg", "example.co.uk"),
        ("HTTPS://CDN.Shopify.com/x.png", "shopify.com"),
        ("http://example.com./a", "example.com"),
        ("http://bucket.s3.amazonaws.com/k", "amazonaws.com"),  # the ICANN section only: one operator
        ("http://127.0.0.5:8000/a", "127.0.0.5"),  # an address is its own host, whatever the port
        ("http://127.0.0.6:8000/a", "127.0.0.6"),
        ("http://[::1]:80/x", "[::1]"),
        ("http://localhost/x", "localhost"),
        ("", UNKNOWN_HOST),
        ("not a url", UNKNOWN_HOST),
        ("http://[bad/x", UNKNOWN_HOST),
    ],
)
def test_a_host_is_the_registrable_domain_else_the_address(url, host):
    assert host_of(url) == host


def test_the_suffix_list_is_the_bundled_one(monkeypatch):
    """No fetch at run time: with every socket refused, a name still resolves to its domain."""
    import socket

    def refuse(*_args, **_kwargs):
        raise AssertionError("host_of opened a connection")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    hosts._extract.cache_clear()
    hosts._host_of_name.cache_clear()
    assert host_of("http://img.example.org/a.jpg") == "example.org"
