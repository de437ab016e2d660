"""Progress that moves (samples as img2dataset writes them), rates without start-up, the stdlib log
(``--log-file`` with ``--quiet``, no handlers piling up), and nothing from libraries on stderr."""

from __future__ import annotations

import csv
import logging
import re

import pytest
from conftest import run_cli

from lenscap.core import progress as progress_mod
from lenscap.core.progress import LogProgress, log, log_file, make_progress, set_log_file
from lenscap.demo.pictures import jpeg_bytes, scene
from lenscap.demo.server import ImageServer, Route
from lenscap.download.command import download
from lenscap.download.options import DownloadOptions

LINE_RE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d lenscap: ")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SpyProgress(LogProgress):
    """A LogProgress that keeps what it showed: (shards done, samples, failed) at each advance, and its lines."""

    def __init__(self, label: str = "download", **kwargs) -> None:
        super().__init__(label, quiet=False, **kwargs)  # its lines are kept, not printed
        self.seen: list[tuple[int, int, int]] = []
        self.lines: list[str] = []

    def advance(self, shards: int = 0, samples: int = 0, failed: int = 0) -> None:
        super().advance(shards, samples, failed)
        self.seen.append((self.done, self.samples, self.failed))

    def _line(self, final: bool = False) -> None:
        self.lines.append(", ".join(self._figures(final)))


@pytest.fixture
def no_log_file():
    yield
    set_log_file(None)


def _file_handlers() -> list[logging.Handler]:
    # lenscap's own (pytest adds its capture handlers, one of them a FileHandler, to the logger too)
    return [h for h in progress_mod.logger.handlers if getattr(h, "lenscap_handler", None) == "file"]


# -- rates ---------------------------------------------------------------------------------------


def test_rate_excludes_start_up():
    clock = Clock()
    p = LogProgress("download", quiet=True, clock=clock)
    p.start(3, 0, total_samples=300)
    clock.now += 25  # img2dataset's imports, the first fetches: no sample yet
    assert p.rate() == 0 and p.eta_s() is None
    p.advance(samples=1)  # the first sample: rates run from here
    clock.now += 2
    p.advance(samples=20, failed=2)
    assert p.rate() == pytest.approx(10.0)  # 20 samples in 2 s, not 21 in 27 s
    assert p.eta_s() == pytest.approx((300 - 21) / 10.0)  # from the samples left, the total being known
    figures = ", ".join(p._figures())
    assert "0/3 shards" in figures and "21/300 samples (2 failed)" in figures and "10.0 samples/s" in figures


def test_eta_from_shards_without_a_sample_total():
    clock = Clock()
    p = LogProgress("filter", quiet=True, clock=clock)
    p.start(4, 0)
    clock.now += 10
    p.advance(shards=1)
    assert p.eta_s() == pytest.approx(30.0)


def test_steps_of_a_pass_and_its_status_lines():
    clock = Clock()
    p = SpyProgress("dedup: searching", interval_s=5, unit="steps", clock=clock)
    p.start(1)
    p.status("step 1/6: loading signatures")
    clock.now += 6
    p.status("step 4/6: near duplicates, table 3/16")  # a pass that only reports its status still logs
    assert p.lines == ["step 4/6: near duplicates, table 3/16"]


# -- the download counts samples as they are written ---------------------------------------------


def test_download_reports_samples_before_its_shard_completes(tmp_path):
    routes = {f"/slow/{i}.jpg": Route(jpeg_bytes(scene(i, (64, 48))), delay_s=0.1) for i in range(19)}
    routes["/html.jpg"] = Route(b"<html>no</html>", "image/jpeg")
    with ImageServer(routes) as server:
        urls = tmp_path / "urls.csv"
        with open(urls, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["url", "caption"])
            for path in routes:
                w.writerow([server.url(path), path])
        spy = SpyProgress(interval_s=0.0)
        result = download(
            str(urls),
            tmp_path / "out",
            DownloadOptions(samples_per_shard=20, processes=1, threads=2, allow_private_network=True),
            progress=spy,
        )
    assert result.shards_completed == 1 and result.samples == 20
    assert spy.total_samples == 20
    before_done = [(n, f) for shards, n, f in spy.seen if shards == 0 and 0 < n < 20]
    assert before_done, f"no sample counts before the shard completed: {spy.seen}"
    assert spy.seen[-1] == (1, 20, 1)  # the finished shard's own counts: the HTML page failed
    assert any(re.search(r"0/1 shards, \d+/20 samples", line) for line in spy.lines), spy.lines
    assert not (tmp_path / "out" / ".lenscap" / "progress").exists()  # the counters go with the run


# -- the log -------------------------------------------------------------------------------------


def test_log_file_gets_quiet_lines_and_handlers_do_not_pile_up(tmp_path, capsys, no_log_file):
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    for _ in range(3):
        set_log_file(str(first))
    assert len(_file_handlers()) == 1 and log_file() == str(first)
    p = make_progress("filter", quiet=True)
    p.start(2, 0)
    log("a quiet line", to_stderr=False)
    set_log_file(str(second))  # a new path replaces the old
    assert len(_file_handlers()) == 1 and log_file() == str(second)
    log("on stderr too")
    p.finish()
    set_log_file(None)
    assert _file_handlers() == [] and log_file() is None
    log("after", to_stderr=False)  # nowhere: neither file, nor stderr

    a, b = first.read_text().splitlines(), second.read_text().splitlines()
    assert [line.split("lenscap: ", 1)[1] for line in a] == ["filter: 2 of 2 shards to do", "a quiet line"]
    assert b[0].endswith("lenscap: on stderr too") and b[1].endswith("lenscap: filter: 0/2 shards, 0s")
    assert all(LINE_RE.match(line) for line in a + b)
    err = capsys.readouterr().err
    assert err.count("on stderr too") == 1 and "quiet line" not in err and "shards" not in err


def test_log_file_that_cannot_be_opened_is_a_usage_error(tmp_path, no_log_file):
    from lenscap.core.errors import UsageError

    with pytest.raises(UsageError, match="--log-file"):
        set_log_file(str(tmp_path / "no" / "such" / "dir" / "x.log"))
    assert log_file() is None


def test_captured_warnings_go_to_the_log_file_only(tmp_path, capsys, no_log_file):
    import warnings

    set_log_file(str(tmp_path / "w.log"))
    try:
        progress_mod.capture_warnings()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            # catch_warnings put back the showwarning it found; an in-process CLI run earlier in the
            # session left logging's capture on, so it is turned off and on to take this one.
            logging.captureWarnings(False)
            logging.captureWarnings(True)
            warnings.warn("a library's warning", UserWarning, stacklevel=2)
    finally:
        logging.captureWarnings(False)
    assert "a library's warning" not in capsys.readouterr().err
    assert "warning: " in (tmp_path / "w.log").read_text() and "a library's warning" in (tmp_path / "w.log").read_text()


# -- nothing from libraries on stderr ------------------------------------------------------------


def test_quiet_commands_print_nothing_on_stderr(tmp_path, image_server):
    urls = tmp_path / "urls.csv"
    with open(urls, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        for path in ("/ok/0.jpg", "/ok/1.jpg", "/ok/2.jpg", "/html.jpg", "/missing.jpg"):
            w.writerow([image_server.url(path), "a photo"])
    log_path = tmp_path / "run.log"
    r = run_cli(
        "download",
        str(urls),
        str(tmp_path / "raw"),
        "--samples-per-shard",
        "3",
        "--processes",
        "1",
        "--quiet",
        "--log-file",
        str(log_path),
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    logged = log_path.read_text()
    assert "download: 2 of 2 shards to do (5 of 5 samples)" in logged and "download: 2/2 shards, 5/5 samples (2 failed)" in logged
    r = run_cli("filter", str(tmp_path / "raw"), str(tmp_path / "filtered"), "--min-side", "16", "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
