"""``--max-cost``: a budget shared by every worker process of a run.

Before a request is sent its worst case (estimated input plus ``max_tokens`` of output) is reserved;
when the answer arrives the reservation is replaced by what the server says it used. A request is
only sent if the reservations fit, so the budget is never overrun by more than estimation error.
The budget covers everything the output directory has paid for across runs (spend recorded in
finished shards and in journals), so rerunning the same command never spends it twice.

On a Ray cluster the workers share no memory: ``ClusterBudget`` keeps the same ledger in a Ray actor.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

from lenscap.core.executors import import_ray

__all__ = ["Budget", "ClusterBudget"]


class Budget:
    def __init__(self, max_usd: float | None, spent_before: float = 0.0, ctx: Any = None) -> None:
        ctx = ctx or multiprocessing.get_context("spawn")
        self.max_usd = max_usd
        self.spent_before = spent_before
        self._values = ctx.Array("d", 2)  # [spent this run, reserved]; picklable to spawned workers

    @property
    def spent(self) -> float:
        return self.spent_before + self._values[0]

    @property
    def spent_this_run(self) -> float:
        return self._values[0]

    def reserve(self, usd: float) -> bool:
        if self.max_usd is None:
            return True
        with self._values.get_lock():
            if self.spent_before + self._values[0] + self._values[1] + usd > self.max_usd:
                return False
            self._values[1] += usd
            return True

    def reserve_forced(self, usd: float) -> None:
        """Reserve money already committed to (batches submitted by an earlier run)."""
        if self.max_usd is not None:
            with self._values.get_lock():
                self._values[1] += usd

    def settle(self, reserved: float, actual: float) -> None:
        with self._values.get_lock():
            self._values[1] = max(0.0, self._values[1] - (reserved if self.max_usd is not None else 0.0))
            self._values[0] += actual

    def on_cluster(self) -> Budget:
        """This budget for workers on other machines."""
        return ClusterBudget(self.max_usd, self.spent)


class _Ledger:
    """The Ray actor behind ``ClusterBudget``: one process, so its calls need no lock."""

    def __init__(self, max_usd: float | None, spent_before: float) -> None:
        self.budget = Budget(max_usd, spent_before)

    def reserve(self, usd: float) -> bool:
        return self.budget.reserve(usd)

    def reserve_forced(self, usd: float) -> None:
        self.budget.reserve_forced(usd)

    def settle(self, reserved: float, actual: float) -> None:
        self.budget.settle(reserved, actual)

    def spent_this_run(self) -> float:
        return self.budget.spent_this_run


class ClusterBudget(Budget):
    """A budget whose ledger is a Ray actor; every call is synchronous, so ``spent`` read after the
    shards finished counts every caption they paid for. (Without --max-cost, ``reserve`` asks nothing.)"""

    def __init__(self, max_usd: float | None, spent_before: float = 0.0) -> None:
        self.max_usd = max_usd
        self.spent_before = spent_before
        self._ledger = self._ray.remote(_Ledger).options(num_cpus=0).remote(max_usd, spent_before)

    @property
    def _ray(self) -> Any:  # the module, looked up where the budget is, never pickled with it
        return import_ray()

    @property
    def spent_this_run(self) -> float:
        return float(self._ray.get(self._ledger.spent_this_run.remote()))

    @property
    def spent(self) -> float:
        return self.spent_before + self.spent_this_run

    def reserve(self, usd: float) -> bool:
        return True if self.max_usd is None else bool(self._ray.get(self._ledger.reserve.remote(usd)))

    def reserve_forced(self, usd: float) -> None:
        self._ray.get(self._ledger.reserve_forced.remote(usd))

    def settle(self, reserved: float, actual: float) -> None:
        self._ray.get(self._ledger.settle.remote(reserved, actual))
