"""A polite download: robots.txt obeyed, opt-outs read before the body, an honest User-Agent.

Each host is a 127.0.0.X address of one loopback server (``ImageServer(hosts=True)``), which logs the
address, path and User-Agent of every request: what was asked, and what was never asked.
"""

from __future__ import annotations

import json
import time

import pytest
from conftest import run_cli_here

from lenscap import __version__
from lenscap.core.dataset import Dataset
from lenscap.demo.pictures import jpeg_bytes, scene
from lenscap.demo.server import ImageServer, Route
from lenscap.download import netguard, robots
from lenscap.download.img2dataset_hooks import robots_opener
from lenscap.download.options import PROJECT_URL, DownloadOptions
from lenscap.download.optout import opted_out
from lenscap.download.outcome import reason_of, retryable

RULED, NO_ROBOTS, ROBOTS_DOWN = "127.0.0.2", "127.0.0.3", "127.0.0.4"
HONEST = f"lenscap/{__version__} (+{PROJECT_URL})"


def _image(i: int) -> Route:
    return Route(jpeg_bytes(scene(i, (48, 32))))


def _rows(out) -> dict[str, dict]:
    ds = Dataset.open(out)
    return {r["url"]: r for i in ds.completed_ids() for r in ds.read_table(i).to_pylist()}


def _asked(server: ImageServer, since: int = 0) -> list[tuple[str, str]]:
    return [(r.host, r.path) for r in server.requests[since:]]


def test_paths_robots_txt_disallows_are_never_requested(tmp_path):
    routes = {f"/private/{i}.jpg": _image(i) for i in range(20)} | {f"/ok/{i}.jpg": _image(50 + i) for i in range(4)}
    # The lenscap group applies, not the * one: crawlers obey the most specific group for their token.
    routes[f"//{RULED}/robots.txt"] = Route(
        b"User-agent: *\nDisallow: /ok/\n\nUser-agent: lenscap\nDisallow: /private/\n", "text/plain"
    )
    routes[f"//{ROBOTS_DOWN}/robots.txt"] = Route(b"busy", "text/plain", 503)
    with ImageServer(routes, hosts=True) as server:
        urls = [server.url(p, RULED) for p in routes if not p.startswith("//")]
        urls += [server.url(f"/private/{i}.jpg", NO_ROBOTS) for i in range(3)]  # its robots.txt: 404, all allowed
        urls += [server.url(f"/ok/{i}.jpg", ROBOTS_DOWN) for i in range(2)]
        # A redirect is asked of its target's robots.txt.
        server.routes["/to-private"] = Route(b"", "text/plain", 302, {"Location": server.url("/private/0.jpg", RULED)})
        urls.append(server.url("/to-private", NO_ROBOTS))
        (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
        out = tmp_path / "out"
        common = ("--processes", "2", "--threads", "4", "--max-error-share", "1", "--json")
        code, _, err = run_cli_here("download", str(tmp_path / "urls.txt"), str(out), "--samples-per-shard", "8", *common)
        assert code == 0, err

        asked = _asked(server)
        assert not [a for a in asked if a[0] == RULED and a[1].startswith("/private/")], "a disallowed path was requested"
        assert not [a for a in asked if a[0] == ROBOTS_DOWN and a[1] != "/robots.txt"], "a host without rules was fetched"
        for host in (RULED, NO_ROBOTS, ROBOTS_DOWN):
            assert asked.count((host, "/robots.txt")) == 1, f"{host}: robots.txt once per job, for both processes"
        assert {r.user_agent for r in server.requests} == {HONEST}, "every request, robots.txt included"

        rows = _rows(out)
        for i in range(20):
            row = rows[server.url(f"/private/{i}.jpg", RULED)]
            assert row["status"] == "failed_to_download"
            assert row["error_message"].startswith("disallowed by robots.txt (http://127.0.0.2:"), row["error_message"]
        assert rows[server.url("/to-private", NO_ROBOTS)]["error_message"].startswith(
            "disallowed by robots.txt (http://127.0.0.2:"
        )
        assert all(rows[server.url(f"/ok/{i}.jpg", RULED)]["status"] == "success" for i in range(4))
        assert all(rows[server.url(f"/private/{i}.jpg", NO_ROBOTS)]["status"] == "success" for i in range(3))
        for i in range(2):
            message = rows[server.url(f"/ok/{i}.jpg", ROBOTS_DOWN)]["error_message"]
            assert message.startswith("robots.txt could not be read (") and "HTTP Error 503" in message, message
        manifest = Dataset.open(out).read_manifest()
        assert manifest["parameters"]["ignore_robots"] is False and manifest["parameters"]["user_agent"] == HONEST

        # A retry asks nothing: robots.txt's refusals are final, and the job's copy of each robots.txt
        # (the unreadable one too, for a while) is read from the work directory, not fetched again.
        before = len(server.requests)
        code, _, err = run_cli_here("download", "--retry-failed", str(out), "--json")
        assert code == 0, err
        assert _asked(server, before) == []

        # --ignore-robots fetches them, asks for no robots.txt, and says so in the manifest.
        code, stdout, err = run_cli_here("download", "--retry-failed", str(out), "--ignore-robots", "--json")
        assert code == 0, err
        again = _asked(server, before)
        assert sorted(again) == sorted(
            [(RULED, f"/private/{i}.jpg") for i in range(20)]
            + [(ROBOTS_DOWN, f"/ok/{i}.jpg") for i in range(2)]
            + [(NO_ROBOTS, "/to-private"), (RULED, "/private/0.jpg")]
        )
        assert json.loads(stdout)["status"] == {"success": 30}
        assert Dataset.open(out).read_manifest()["parameters"]["ignore_robots"] is True
        assert json.loads((out / ".lenscap" / "fetch.json").read_text())["ignore_robots"] is True


def test_an_opt_out_in_the_headers_stops_the_download_before_the_body(tmp_path):
    big = 32 << 20  # more than the sockets' buffers hold: the server is still sending when the client closes
    routes = {
        "/noai.jpg": Route(b"\xff\xd8" + bytes(big), headers={"X-Robots-Tag": "noai"}),
        "/noml.jpg": Route(jpeg_bytes(scene(1)), headers={"X-Robots-Tag": "noml"}),
        "/ours.jpg": Route(jpeg_bytes(scene(2)), headers={"X-Robots-Tag": "lenscap: noimageai"}),
        "/theirs.jpg": Route(jpeg_bytes(scene(3)), headers={"X-Robots-Tag": "otherbot: noai"}),
        "/fine.jpg": Route(jpeg_bytes(scene(4))),
    }
    agent = "ExampleBot/2 (+https://example.org/bot)"
    with ImageServer(routes, hosts=True) as server:
        (tmp_path / "urls.txt").write_text("\n".join(server.url(p, "127.0.0.5") for p in routes) + "\n")
        code, _, err = run_cli_here(
            "download",
            str(tmp_path / "urls.txt"),
            str(tmp_path / "out"),
            "--processes",
            "1",
            "--max-retries",
            "2",
            "--max-error-share",
            "1",
            "--user-agent",
            agent,
        )
        assert code == 0, err
        deadline = time.monotonic() + 5
        while not server.cut_off.get("/noai.jpg") and time.monotonic() < deadline:
            time.sleep(0.05)  # the server's thread sees the reset once its send fails
        assert server.cut_off.get("/noai.jpg") == 1, "the body was read: the server sent it all"
        assert server.hits["/noai.jpg"] == 1, "an opt-out is not asked again by img2dataset's retries"
        assert {r.user_agent for r in server.requests} == {agent}, "--user-agent replaces the whole header"
        rows = {r["url"].rsplit("/", 1)[1]: r for r in _rows(tmp_path / "out").values()}
    assert rows["noai.jpg"]["error_message"] == "disallowed by X-Robots-Tag: noai"
    assert rows["noml.jpg"]["error_message"] == "disallowed by X-Robots-Tag: noml"
    assert rows["ours.jpg"]["error_message"] == "disallowed by X-Robots-Tag: noimageai"
    assert rows["theirs.jpg"]["status"] == rows["fine.jpg"]["status"] == "success", "another crawler's opt-out"


@pytest.mark.parametrize(
    ("values", "said"),
    [
        (["noai"], "noai"),
        (["NoImageAI"], "noimageai"),
        (["nofollow, noml"], "noml"),
        (["lenscap: noai"], "noai"),
        (["otherbot: noai"], None),
        (["otherbot: noai", "lenscap: noindex"], "noindex"),
        (["unavailable_after: 25 Jun 2030 15:00:00 PST, noai"], "noai"),  # a directive with a value, not a crawler
        (["nofollow", "noarchive"], None),
        ([], None),
    ],
)
def test_which_x_robots_tag_values_opt_out(values, said):
    assert opted_out(values, "lenscap") == said


@pytest.fixture
def private_ok(monkeypatch):
    monkeypatch.setattr(netguard, "_allowed", True)  # this test's robots.txt is on loopback


def _rules(server: ImageServer, directory=None, token: str = "lenscap") -> robots.Robots:
    return robots.Robots(robots_opener(HONEST), token, None if directory is None else str(directory), timeout=5)


@pytest.mark.parametrize(
    ("robots_route", "allowed"),
    [
        (Route(b"User-agent: *\nDisallow: /a/\n", "text/plain"), False),
        (Route(b"gone", "text/plain", 404), True),  # RFC 9309 2.3.1.3: unavailable, no rules
        (Route(b"no", "text/plain", 403), True),
        (Route(b"busy", "text/plain", 503), False),  # 2.3.1.4: unreachable, complete disallow
        (Route(b"slow down", "text/plain", 429), False),
    ],
)
def test_robots_txt_is_read_as_rfc_9309_says(private_ok, robots_route, allowed):
    with ImageServer({"/robots.txt": robots_route}) as server:
        why = _rules(server).refusal(server.url("/a/1.jpg"))
    assert (why is None) == allowed, why
    if robots_route.status >= 500 or robots_route.status == 429:
        assert why.startswith(robots.UNREADABLE) and f"HTTP Error {robots_route.status}" in why


def test_robots_txt_redirects_and_size_are_capped(private_ok):
    hops = {f"/hop{i}": Route(b"", "text/plain", 301, {"Location": f"/hop{i + 1}"}) for i in range(6)}
    routes = hops | {"/hop5": Route(b"User-agent: *\nDisallow: /\n", "text/plain")}
    # Five redirects are followed; six make robots.txt unavailable (2.3.1.2): everything allowed.
    with ImageServer({**routes, "/robots.txt": Route(b"", "text/plain", 301, {"Location": "/hop1"})}) as server:
        assert _rules(server).refusal(server.url("/x.jpg")) is not None
    with ImageServer(
        {**hops, "/hop6": routes["/hop5"], "/robots.txt": Route(b"", "text/plain", 301, {"Location": "/hop1"})}
    ) as s:
        assert _rules(s).refusal(s.url("/x.jpg")) is None
    # Only the first 500 KiB are rules (2.5): a line after them is not read.
    padding = b"# " + b"." * robots.MAX_BYTES + b"\n"
    text = b"User-agent: *\nDisallow: /early/\n" + padding + b"Disallow: /late/\n"
    with ImageServer({"/robots.txt": Route(text, "text/plain")}) as server:
        rules = _rules(server)
        assert rules.refusal(server.url("/early/x.jpg")) is not None
        assert rules.refusal(server.url("/late/x.jpg")) is None


def test_the_job_keeps_each_robots_txt_until_it_expires(private_ok, tmp_path):
    text = b"User-agent: *\nDisallow: /a/\nCrawl-delay: 3\n\nUser-agent: lenscap\nDisallow: /b/\nCrawl-delay: 0.5\n"
    with ImageServer({"/robots.txt": Route(text, "text/plain")}, hosts=True) as server:
        first = _rules(server, tmp_path)
        assert first.refusal(server.url("/b/1.jpg")) and first.refusal(server.url("/b/2.jpg"))
        assert first.refusal(server.url("/a/1.jpg")) is None, "lenscap's group, not *'s"
        assert first.crawl_delay(server.url("/")) == 0.5
        assert _rules(server, tmp_path, token="otherbot").crawl_delay(server.url("/")) == 3.0
        other_host = server.url("/b/1.jpg", "127.0.0.7")
        assert first.refusal(other_host), "another origin: its own robots.txt"
        assert server.hits["/robots.txt"] == 2
        # Another process of the job (another instance) reads the job's copy...
        assert _rules(server, tmp_path).refusal(server.url("/b/1.jpg"))
        assert server.hits["/robots.txt"] == 2
        # ...until it expires: then it is fetched again.
        for path in tmp_path.glob("*.json"):
            held = json.loads(path.read_text())
            path.write_text(json.dumps(held | {"expires_at": time.time() - 1}))
        assert _rules(server, tmp_path).refusal(server.url("/b/1.jpg"))
        assert server.hits["/robots.txt"] == 3
        robots.configure(first)
        try:
            assert robots.crawl_delay(server.url("/x.jpg")) == 0.5
        finally:
            robots.configure(None)
        assert robots.crawl_delay(server.url("/x.jpg")) is None, "robots.txt ignored: no delay asked"


def test_a_robots_txt_on_a_refused_address_is_the_network_rules_refusal(monkeypatch):
    monkeypatch.setattr(netguard, "_allowed", False)
    with ImageServer({"/robots.txt": Route(b"User-agent: *\nAllow: /\n", "text/plain")}) as server:
        why = _rules(server).refusal(server.url("/a.jpg"))
        assert why.startswith(netguard.REFUSED) and server.hits == {}
    assert reason_of(why, "failed_to_download") == "refused: loopback address"


def test_a_retry_asks_a_robots_refusal_again_only_with_ignore_robots():
    refused = {"status": "failed_to_download", "error_message": f"{robots.DISALLOWED} (http://h/robots.txt, user-agent x)"}
    unreadable = {"status": "failed_to_download", "error_message": f"{robots.UNREADABLE} (http://h/robots.txt: HTTP Error 503)"}
    assert not retryable(refused, False) and retryable(refused, False, ignore_robots=True)
    assert retryable(unreadable, False)
    assert reason_of(refused["error_message"], "failed_to_download") == robots.DISALLOWED


def test_the_user_agent_names_lenscap_its_version_and_the_contact():
    assert DownloadOptions().user_agent_header == HONEST
    assert DownloadOptions(contact="mailto:me@example.org").user_agent_header == f"lenscap/{__version__} (+mailto:me@example.org)"
    assert DownloadOptions(contact="x", user_agent="Mine/1").user_agent_header == "Mine/1"
    code, _, err = run_cli_here("download", "urls.txt", "out", "--contact", "me\nX-Injected: 1")
    assert code == 2 and "--contact must be one line" in err


def test_crawl_delay_is_the_least_interval_between_requests_to_its_host(tmp_path):
    """With a per-host limiter on, robots.txt's Crawl-delay spaces a host's requests even where
    --per-host-rps would allow more; robots.txt's own request goes through the same limiter."""
    routes = {f"/{i}.jpg": _image(i) for i in range(4)}
    routes[f"//{RULED}/robots.txt"] = Route(b"User-agent: *\nCrawl-delay: 1\n", "text/plain")
    with ImageServer(routes, hosts=True) as server:
        (tmp_path / "urls.txt").write_text("\n".join(server.url(f"/{i}.jpg", RULED) for i in range(4)) + "\n")
        code, _, err = run_cli_here(
            "download", str(tmp_path / "urls.txt"), str(tmp_path / "out"), "--per-host-rps", "50", "--threads", "4", "--quiet"
        )
        assert code == 0, err
        images = [r.at for r in server.requests if r.host == RULED and r.path != "/robots.txt"]
    assert len(images) == 4
    gaps = [b - a for a, b in zip(images, images[1:])]
    assert min(gaps) > 0.9, gaps
