"""Shared fixtures: a loopback image server with the web's failure modes, and a CLI runner."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
from PIL import Image

from lenscap.demo.pictures import bomb_png, html_page, jpeg_bytes, png_bytes, scene, truncated_jpeg
from lenscap.demo.server import ImageServer, Route

# Keep every subprocess offline and quiet about update checks.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``dev.py test`` runs the suite on several workers, ``--dist loadgroup``): a
    module's tests run on one worker, so its module fixtures are made once; and every test that joins
    the session's Ray cluster runs on one worker, so there is one cluster, not one per worker."""
    for item in items:
        group = "ray" if "ray_cluster" in getattr(item, "fixturenames", ()) else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session", autouse=True)
def _no_shared_lenscap_dirs(tmp_path_factory):
    """Nothing in the session reads or writes the user's ``~/.cache/lenscap``: the response cache and
    remote datasets' work directories are in this session's temporary directory (also for the processes, Ray's
    included, started before a test's own directories are set)."""
    mp = pytest.MonkeyPatch()
    base = tmp_path_factory.mktemp("lenscap-session")
    mp.setenv("LENSCAP_CACHE_DIR", str(base / "cache"))
    mp.setenv("LENSCAP_WORK_DIR", str(base / "work"))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _own_lenscap_dirs(tmp_path_factory, monkeypatch):
    """Each test its own response cache and work directory of remote datasets. A cache shared between tests (or with
    the user's earlier runs) answers from an earlier test's captions: ``caption_cached`` then depends
    on what ran before, and a test comparing two runs compares a cold cache with a warm one. A test
    that gives its own ``LENSCAP_CACHE_DIR`` / ``LENSCAP_WORK_DIR`` (``env=``, ``monkeypatch``) overrides these."""
    base = tmp_path_factory.mktemp("lenscap-test")
    monkeypatch.setenv("LENSCAP_CACHE_DIR", str(base / "cache"))
    monkeypatch.setenv("LENSCAP_WORK_DIR", str(base / "work"))


def standard_routes() -> dict[str, Route]:
    routes = {f"/ok/{i}.jpg": Route(jpeg_bytes(scene(i))) for i in range(8)}
    routes["/big.jpg"] = Route(jpeg_bytes(scene(100, (2000, 1000))))
    routes["/small.png"] = Route(png_bytes(scene(101, (100, 80))), "image/png")
    routes["/redirect"] = Route(b"", "text/plain", 302, {"Location": "/ok/0.jpg"})
    routes["/slow.jpg"] = Route(jpeg_bytes(scene(102)), delay_s=2.5)
    routes["/html.jpg"] = Route(html_page(), "image/jpeg")
    routes["/truncated.jpg"] = Route(truncated_jpeg(3))
    routes["/bomb.png"] = Route(bomb_png(), "image/png")
    routes["/noai.jpg"] = Route(jpeg_bytes(scene(103)), headers={"X-Robots-Tag": "noai, noimageai"})
    routes["/corrupt.jpg"] = Route(b"\xff\xd8\xff\xe0" + os.urandom(2000) + b"\xff\xd9")
    return routes


@pytest.fixture(scope="session")
def image_server():
    with ImageServer(standard_routes()) as server:
        yield server


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def loopback(args: tuple[str, ...] | list[str]) -> list[str]:
    """``args`` of a ``download`` with ``--allow-private-network``: this suite serves its images on
    loopback, which a download refuses by default. A test of that refusal says ``--no-allow-private-network``."""
    args = list(args)
    if args[:1] == ["download"] and not {"--allow-private-network", "--no-allow-private-network"} & set(args):
        args.append("--allow-private-network")
    return args


def run_cli(*args: str, stdin: str | None = None, timeout: float = 180, env: dict[str, str] | None = None) -> CliResult:
    """``lenscap ARGS`` in a subprocess; ``env`` entries are added to (None values removed from) ours."""
    args = tuple(loopback(args))
    full_env = dict(os.environ)
    for k, v in (env or {}).items():
        if v is None:
            full_env.pop(k, None)
        else:
            full_env[k] = v
    proc = subprocess.run(
        [sys.executable, "-m", "lenscap.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        env=full_env,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def cli():
    return run_cli


def run_cli_here(*args: str) -> tuple[int, str, str]:
    """``lenscap ARGS`` in this process (``memory://`` exists only in one process): exit code, stdout, stderr."""
    from lenscap.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["lenscap", *loopback(args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as e:
                code = int(e.code or 0)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def solid_jpeg(size=(64, 48), colour=(10, 120, 200)) -> bytes:
    return jpeg_bytes(Image.new("RGB", size, colour))


@pytest.fixture(scope="session")
def s3_store():
    """A local object store speaking the S3 API (moto's server on loopback), with bucket ``lenscap``.

    Its address and test credentials go into this process's environment, so every process started
    later (CLI subprocesses, img2dataset, Ray workers) reaches it through s3fs like a real bucket.
    Returns an s3fs filesystem on it.
    """
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ACCESS_KEY_ID="lenscap-test",
        AWS_SECRET_ACCESS_KEY="lenscap-test-secret",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
    )
    fs = s3fs.S3FileSystem()
    fs.mkdir("lenscap")
    yield fs
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_store):
    """One local Ray cluster (2 CPUs) for the whole session; its GCS address, for CLI subprocesses to join.
    Started after the object store, so its workers inherit the store's address. It is on loopback
    (``start_local_ray``): node address 127.0.0.1, nothing listening on the machine's network address;
    the processes started later (CLI subprocesses, img2dataset) inherit Ray's single-machine mode from
    this one's environment, and join it at 127.0.0.1."""
    ray = pytest.importorskip("ray")
    from lenscap.core.executors import start_local_ray

    started = not ray.is_initialized()
    if started:
        start_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()
