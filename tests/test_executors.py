"""The local executor: never more worker processes than tasks, and a worker whose setup refuses the job
says why instead of breaking the pool."""

from __future__ import annotations

import os

from lenscap.errors import MissingDependency
from lenscap.executors import LocalExecutor


class WherePid:
    def setup(self) -> None:
        pass

    def run(self, item: int) -> dict:
        return {"pid": os.getpid()}


class Refuses:
    def setup(self) -> None:
        raise MissingDependency("the nsfw annotator needs the nsfw extra")

    def run(self, item: int) -> dict:
        return {}


def test_one_task_runs_here_whatever_processes_says():
    done: dict[int, dict] = {}
    assert LocalExecutor(4).run(WherePid(), [7], lambda i, r: done.__setitem__(i, r), {}) is None
    assert done == {7: {"pid": os.getpid()}}


def test_a_worker_setup_that_refuses_the_job_is_that_error_not_a_broken_pool():
    failed: dict[int, str] = {}
    error = LocalExecutor(2).run(Refuses(), [0, 1, 2], lambda i, r: None, failed)
    assert isinstance(error, MissingDependency) and "nsfw extra" in str(error)
    assert failed == {}
