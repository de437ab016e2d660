"""Union-find over integer ids, vectorised: edges are merged a batch at a time with numpy.

Every root is the smallest id of its component (a union always hangs the larger root under the
smaller), so components and their ids come out the same whatever order the edges arrive in.
Memory is two int64 arrays over the ids that appear in an edge, not over the whole dataset.
"""

from __future__ import annotations

import numpy as np

__all__ = ["UnionFind"]


class UnionFind:
    def __init__(self, ids: np.ndarray) -> None:
        """``ids``: every id that edges will name, sorted, without repeats."""
        self.ids = np.asarray(ids, dtype=np.int64)
        self.parent = np.arange(len(self.ids), dtype=np.int64)

    def index(self, ids: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.ids, ids)
        if len(ids) and (idx.max(initial=0) >= len(self.ids) or not np.array_equal(self.ids[idx], ids)):
            raise ValueError("edge names an id that was not declared")
        return idx

    def _find(self, x: np.ndarray) -> np.ndarray:
        root = self.parent[x]
        while True:
            up = self.parent[root]
            if np.array_equal(up, root):
                break
            root = up
        self.parent[x] = root  # path compression for the next batch
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Merge the components of ``a[i]`` and ``b[i]`` for every i."""
        x, y = self.index(np.asarray(a, dtype=np.int64)), self.index(np.asarray(b, dtype=np.int64))
        while len(x):
            rx, ry = self._find(x), self._find(y)
            apart = rx != ry
            if not apart.any():
                return
            x, y, rx, ry = x[apart], y[apart], rx[apart], ry[apart]
            # Several unions may hang the same root in one step; the smallest new parent wins and
            # the others are retried on the next pass, against the merged roots.
            np.minimum.at(self.parent, np.maximum(rx, ry), np.minimum(rx, ry))

    def components(self) -> np.ndarray:
        """For each declared id (in order), the smallest id of its component."""
        return self.ids[self._find(np.arange(len(self.ids), dtype=np.int64))]
