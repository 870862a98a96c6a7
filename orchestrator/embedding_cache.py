"""A bounded LRU of user-tower outputs, keyed by the exact tower inputs.

The user tower is a pure function of its inputs (user id, profile, recent items) for a
given model version, and a release pins that version, so an embedding computed once is
valid for as long as the release serves and the user's inputs do not change. A new event
changes ``recent_items`` and therefore the key: no invalidation is needed, and a hit is
bit-identical to asking Triton again. Each :class:`~orchestrator.serving_release.ServingRelease`
owns its cache, so embeddings of different tower versions never mix.

Why: the Triton hop for one user costs ~1 ms of CPU on each side and ~3 ms of latency on
this machine (docs/benchmark.md), and users who come back within minutes (paging,
refreshes) are the common case.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from orchestrator import metrics


class EmbeddingCache:
    """Thread-safe LRU: tower inputs -> embedding. ``capacity`` 0 disables it."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._data: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(inputs: Mapping[str, np.ndarray]) -> bytes:
        """The inputs' names, dtypes, shapes and bytes, in name order."""
        parts = []
        for name in sorted(inputs):
            a = np.ascontiguousarray(inputs[name])
            parts.append(f"{name}:{a.dtype.str}:{a.shape};".encode())
            parts.append(a.tobytes())
        return b"".join(parts)

    def get(self, key: bytes) -> np.ndarray | None:
        if self.capacity == 0:
            return None
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
        metrics.EMBEDDING_CACHE.labels("hit" if value is not None else "miss").inc()
        return value

    def put(self, key: bytes, value: np.ndarray) -> None:
        if self.capacity == 0:
            return
        stored = np.array(value, copy=True)
        stored.flags.writeable = False  # shared by every request that hits it
        with self._lock:
            self._data[key] = stored
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)
