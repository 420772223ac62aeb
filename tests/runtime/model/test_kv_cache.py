"""KV caches: truncation and snapshot/restore reproduce logits; sessions are capped LRU."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import RotatingKVCache

from layerline.errors import SessionError, SessionLimitError
from layerline.runtime.decode.local_pipeline import LocalPipeline
from layerline.runtime.model.kv_cache import RangeCache, SessionStore

PREFIX = [1, 504, 3458, 282, 4649, 314, 2114, 30, 1248, 2056, 17, 9, 600, 601, 602, 603]
DRAFT = [700, 701, 702, 703, 704]


@pytest.fixture(scope="module")
def tiny(tiny_llama_package) -> LocalPipeline:
    return LocalPipeline.load(tiny_llama_package, "0:2,2:4", "f32", tokenizer=False)


def feed(pipeline: LocalPipeline, caches: list[RangeCache], tokens: list[int]) -> np.ndarray:
    logits = pipeline(mx.array([tokens]), caches)
    mx.eval(logits)
    return np.array(logits)


@pytest.mark.parametrize("position", [0, 1, 9, 15, 16])
def test_truncating_to_a_position_and_refeeding_reproduces_the_logits(tiny, position):
    caches = tiny.make_cache()
    first = feed(tiny, caches, PREFIX)
    extended = feed(tiny, caches, DRAFT)
    for cache in caches:
        cache.truncate(position)
        assert cache.length == position
    again = feed(tiny, caches, (PREFIX + DRAFT)[position:])
    combined = np.concatenate([first, extended], axis=1)[:, position:]
    np.testing.assert_allclose(again, combined, rtol=0, atol=1e-5)


def test_rejected_tokens_do_not_come_back_through_snapshot_and_restore(tiny):
    caches = tiny.make_cache()
    feed(tiny, caches, PREFIX)
    feed(tiny, caches, DRAFT)
    for cache in caches:
        cache.truncate(len(PREFIX))
    snapshots = [c.snapshot() for c in caches]
    fresh = tiny.make_cache()
    for cache, snap in zip(fresh, snapshots, strict=True):
        cache.restore(snap)
        assert cache.length == len(PREFIX)
    reference = tiny.make_cache()
    feed(tiny, reference, PREFIX)
    np.testing.assert_allclose(feed(tiny, fresh, [42]), feed(tiny, reference, [42]), rtol=0, atol=1e-5)


def test_rotating_cache_restores_a_snapshot_after_wrapping(tiny):
    window = 8  # smaller than the prefix: the cache wraps and can no longer trim
    caches = [RangeCache([RotatingKVCache(max_size=window, keep=4) for _ in r.layers]) for r in tiny.ranges]
    feed(tiny, caches, PREFIX)
    snapshots = [c.snapshot() for c in caches]
    original = [feed(tiny, caches, [t]) for t in DRAFT]
    assert not caches[0].can_truncate(len(PREFIX))
    with pytest.raises(SessionError, match="snapshot"):
        caches[0].truncate(len(PREFIX))
    for _ in range(2):  # a snapshot stays valid for another restore
        for cache, snap in zip(caches, snapshots, strict=True):
            cache.restore(snap)
        assert caches[0].length == len(PREFIX)
        replay = [feed(tiny, caches, [t]) for t in DRAFT]
        for got, expected in zip(replay, original, strict=True):
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_truncate_beyond_the_cache_is_refused(tiny):
    caches = tiny.make_cache()
    feed(tiny, caches, PREFIX)
    with pytest.raises(SessionError, match="cannot truncate a cache of 16 positions to position 17"):
        caches[0].truncate(17)


def _store(tiny: LocalPipeline, **caps) -> SessionStore:
    return SessionStore(tiny.ranges[0].make_cache, **caps)


def test_sessions_are_created_found_and_dropped(tiny):
    store = _store(tiny)
    cache = store.create("a")
    assert store.get("a") is cache and "a" in store
    with pytest.raises(SessionError, match="already exists"):
        store.create("a")
    assert store.get_or_create("a") is cache
    assert store.drop("a") and not store.drop("a")
    with pytest.raises(SessionError, match="no session 'a'"):
        store.get("a")


def test_a_full_store_refuses_a_new_session_and_evicts_none(tiny):
    store = _store(tiny, max_sessions=2)
    store.create("a")
    store.get_or_create("b")
    with pytest.raises(SessionLimitError, match="most sessions"):
        store.get_or_create("c")
    assert "a" in store and "b" in store and "c" not in store
    store.drop("a")
    assert store.create("c") is store.get("c")
