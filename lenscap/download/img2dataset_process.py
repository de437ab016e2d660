"""img2dataset in a subprocess: started early, configured later, tied to this process's life.

Only the standard library here: the CLI starts the subprocess before it imports anything heavy, so
img2dataset's own imports (over a second) overlap lenscap's start-up and its reading of the URL list.
The config travels over the subprocess's stdin; until it arrives the subprocess only imports.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["Img2datasetProcess"]

# Before img2dataset is imported, two of its imports that a download never uses are kept out: torch,
# which webdataset imports only for its PyTorch classes (it does without them), and wandb, which
# img2dataset imports whatever --enable-wandb says (lenscap keeps it off). They were 2.5 s of a small
# download's start-up. Only in this process (and the workers it forks): a Ray worker is left alone.
_ENTRY = (
    "import sys, types; sys.modules.setdefault('torch', None); sys.modules.setdefault('wandb', types.ModuleType('wandb')); "
    "from lenscap.download.img2dataset_hooks import main; sys.exit(main(int(sys.argv[1])))"
)


class Img2datasetProcess:
    """One img2dataset run in its own process group (so that ending it ends its workers too)."""

    def __init__(self) -> None:
        env = os.environ | {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
        self.proc = subprocess.Popen(
            # -c rather than -m: img2dataset's spawned workers re-run a main *module* in each new
            # process; with -c there is none to re-run.
            [sys.executable, "-c", _ENTRY, str(os.getpid())],
            # stderr is a pipe until the config names the log file: a failure at start-up (a broken
            # install, say) is then copied into the log rather than lost.
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        self.early_output = b""

    def run(
        self,
        config: dict[str, Any],
        log_file: Path,
        on_poll: Callable[[], None],
        all_done: Callable[[], bool],
        poll_s: float = 0.1,
    ) -> int:
        """Hand img2dataset its config and wait, calling ``on_poll()`` every ``poll_s`` seconds, until it
        exits or ``all_done()``.

        img2dataset's own wind-down (logger process, temporary files) takes most of a second and
        makes nothing lenscap keeps, so its process group is ended once ``all_done()`` rather than
        waited for. Returns img2dataset's exit code (negative when ended that way).
        """
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"log_file": str(log_file), "download": config}).encode())
            self.proc.stdin.close()
        except BrokenPipeError:
            pass  # it died at start-up: its exit code says so below
        try:
            while self.proc.poll() is None:
                on_poll()
                if all_done():
                    break
                time.sleep(poll_s)
        finally:
            self.stop()
        on_poll()
        if self.early_output:
            with open(log_file, "ab") as log:
                log.write(self.early_output)
        return self.proc.returncode

    def stop(self) -> None:
        """End img2dataset and its workers (done, not needed, Ctrl-C or an error); what is committed stays."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        assert self.proc.stdin is not None and self.proc.stderr is not None
        if not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        if not self.proc.stderr.closed:
            self.early_output = self.proc.stderr.read()  # all it wrote before the log file took over
            self.proc.stderr.close()
