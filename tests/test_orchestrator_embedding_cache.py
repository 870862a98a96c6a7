"""The user-embedding cache: keyed by the exact tower inputs, bounded, read-only values."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.embedding_cache import EmbeddingCache


def _inputs(user: int, recent: list[int]) -> dict[str, np.ndarray]:
    return {
        "user_id": np.array([[user]], np.int64),
        "recent_items": np.array([recent + [-1] * (4 - len(recent))], np.int64),
    }


def test_key_changes_with_any_input() -> None:
    base = EmbeddingCache.key(_inputs(1, [5, 6]))
    assert base == EmbeddingCache.key(_inputs(1, [5, 6]))
    assert base != EmbeddingCache.key(_inputs(2, [5, 6]))
    assert base != EmbeddingCache.key(_inputs(1, [7, 5, 6]))  # a new event: a new key
    as_int32 = {k: v.astype(np.int32) for k, v in _inputs(1, [5, 6]).items()}
    assert base != EmbeddingCache.key(as_int32)


def test_lru_bound_and_read_only_values() -> None:
    cache = EmbeddingCache(2)
    for user in (1, 2):
        cache.put(EmbeddingCache.key(_inputs(user, [])), np.full((1, 4), user, np.float32))
    assert cache.get(EmbeddingCache.key(_inputs(1, []))) is not None  # 1 is now newest
    cache.put(EmbeddingCache.key(_inputs(3, [])), np.full((1, 4), 3, np.float32))
    assert len(cache) == 2
    assert cache.get(EmbeddingCache.key(_inputs(2, []))) is None  # least recently used
    hit = cache.get(EmbeddingCache.key(_inputs(3, [])))
    assert hit is not None and hit.tolist() == [[3.0] * 4]
    with pytest.raises(ValueError):
        hit[0, 0] = 1.0


def test_disabled() -> None:
    cache = EmbeddingCache(0)
    key = EmbeddingCache.key(_inputs(1, []))
    cache.put(key, np.zeros((1, 4), np.float32))
    assert cache.get(key) is None and len(cache) == 0
    with pytest.raises(ValueError):
        EmbeddingCache(-1)
