"""New items between releases, without servers: the item-file checks (the importer's),
delta segments written atomically, and the serving side's merge of added items into
search, catalog and features (orchestrator/new_items.py)."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from exporters.data_generate import generate
from exporters.item_delta import (
    delta_dir,
    fold,
    items_from_json,
    parse_ids,
    read_items,
    read_segment,
    refuse_known,
    segment_names,
    write_segment,
)
from exporters.raw_tables import read_keys, read_raw
from orchestrator.catalog import Catalog, Fallbacks
from orchestrator.faiss_index import FaissIndex
from orchestrator.new_items import AddedItems, AddedVectors, merged_search
from orchestrator.online_features import ItemSnapshot
from orchestrator.request import Filters
from recstack.errors import UserError
from recstack.ids import key_hash
from recstack.settings import Settings


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "new_items.csv"
    path.write_text(text)
    return path


def test_item_file_checked_like_the_importer(tmp_path: Path) -> None:
    good = _csv(
        tmp_path,
        "item_id,category,brand,price,created_at\n"
        "900001,3,7,19.5,2026-07-01T00:00:00Z\n900002,4,,,\n",
    )
    items = read_items(good)
    assert items.item_ids.tolist() == [900001, 900002]
    assert items.category.tolist() == [3, 4] and items.brand.tolist() == [7, 0]
    assert items.price.tolist() == [19.5, 0.0]
    assert items.created_at[0] == pytest.approx(1782864000.0)
    assert items.created_at[1] > 1.7e9  # no creation time: created at ingestion

    cases = {
        "item_id,price\n1,2.0\n2,abc\n": "line 3, column 'price': 'abc' is not a number",
        "item_id,price\n1,2.0\n1,3.0\n": "line 3, column 'item_id': duplicate item_id 1",
        "item_id,category\n1,shoes\n": "line 2, column 'category': 'shoes' is a label",
        "item_id,price\n-4,1\n": "line 2, column 'item_id'",
        "item_id,price\n1,-1\n": "line 2, column 'price': '-1' is negative",
        "category,price\n1,2\n": "missing column 'item_id'",
        "item_id,created_at\n1,yesterday\n": "line 2, column 'created_at': cannot parse",
    }
    for text, message in cases.items():
        path = _csv(tmp_path, text)
        with pytest.raises(UserError) as err:
            read_items(path)
        assert str(path) in str(err.value) and message in str(err.value), err.value


def test_json_items_checked_by_the_same_rules() -> None:
    ok = items_from_json([{"item_id": 5, "category": 2, "price": 1.25}, {"item_id": "6"}])
    assert ok.item_ids.tolist() == [5, 6] and ok.price.tolist() == [1.25, 0.0]
    bad = {
        "row 2, column 'price'": [{"item_id": 5}, {"item_id": 6, "price": "x"}],
        "row 1, column 'item_id'": [{"item_id": True}],
        "row 2 is not an object": [{"item_id": 1}, 7],
        "non-empty list": [],
    }
    for message, rows in bad.items():
        with pytest.raises(UserError, match=message):
            items_from_json(rows)
    items = items_from_json([{"item_id": 1}, {"item_id": 2}])
    with pytest.raises(UserError, match="row 2, column 'item_id': item 2 is already in release 4"):
        refuse_known(items, np.array([2, 3]), 4)


def test_segments_are_atomic_and_ordered(tmp_path: Path) -> None:
    items = items_from_json([{"item_id": 10, "category": 1}, {"item_id": 11, "category": 2}])
    emb = np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32)
    first = write_segment(tmp_path, "add", items.item_ids, items, emb)
    second = write_segment(tmp_path, "unavailable", np.array([10]))
    assert segment_names(tmp_path) == [first.name, second.name]
    seg = read_segment(first, dim=8)
    assert seg.kind == "add" and seg.item_ids.tolist() == [10, 11]
    np.testing.assert_array_equal(seg.embeddings, emb)
    assert seg.category.tolist() == [1, 2]
    # A segment that fails its check is never renamed into view, and no temp file stays.
    bad = emb.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        write_segment(tmp_path, "add", items.item_ids, items, bad)
    assert segment_names(tmp_path) == [first.name, second.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, second.name])
    with pytest.raises(ValueError, match=r"embeddings \(2, 8\), expected \[2, 16\]"):
        read_segment(first, dim=16)


def _flat(x: np.ndarray, ids: np.ndarray) -> FaissIndex:
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return FaissIndex(index, ids, "Flat", "", x.shape[1], False)


def test_merged_search_is_exact_over_index_and_added_items() -> None:
    rng = np.random.default_rng(1)
    base_x = rng.normal(size=(300, 16)).astype(np.float32)
    new_x = rng.normal(size=(40, 16)).astype(np.float32)
    base_ids, new_ids = np.arange(300) * 3, 10_000 + np.arange(40)
    q = rng.normal(size=(5, 16)).astype(np.float32)
    # IVF with every list probed is exact too: both index kinds merge the same way.
    quantizer = faiss.IndexFlatIP(16)
    ivf = faiss.IndexIVFFlat(quantizer, 16, 8, faiss.METRIC_INNER_PRODUCT)
    ivf.train(base_x)
    ivf.add(base_x)
    ivf.nprobe = 8
    for base in (_flat(base_x, base_ids), FaissIndex(ivf, base_ids, "IVF8,Flat", "", 16, False)):
        scores, ids = merged_search(
            base, AddedVectors.build(new_ids, new_x, faiss.METRIC_INNER_PRODUCT), q, 25
        )
        union = np.concatenate([base_x, new_x]) @ q.T
        all_ids = np.concatenate([base_ids, new_ids])
        want = all_ids[np.argsort(-union, axis=0, kind="stable")[:25].T]
        np.testing.assert_array_equal(ids, want)
        assert (np.diff(scores, axis=1) <= 1e-6).all()
        assert np.isin(new_ids, ids).any()  # the added items compete, not just append
    # k above the index's size: the added items fill the rest.
    _, ids = merged_search(
        _flat(base_x[:3], base_ids[:3]),
        AddedVectors.build(new_ids[:4], new_x[:4], faiss.METRIC_INNER_PRODUCT),
        q,
        10,
    )
    assert ids.shape == (5, 7) and (ids >= 0).all()


def test_added_items_reach_catalog_features_and_filters(tmp_path: Path) -> None:
    snapshot = ItemSnapshot(
        names=("category", "price", "item_clicks_7d"),
        ids=np.array([1, 2, 3]),
        matrix=np.array([[1, 5, 9], [2, 6, 9], [1, 7, 9]], np.float32),
        category=np.array([1, 2, 1]),
        created_at=np.array([10.0, 20.0, 30.0]),
    )
    items = items_from_json([{"item_id": 7, "category": 4, "price": 8.5}, {"item_id": 2}])
    emb = np.ones((2, 4), np.float32)
    add = write_segment(tmp_path, "add", items.item_ids, items, emb)
    off = write_segment(tmp_path, "unavailable", np.array([1, 7]))
    back = write_segment(tmp_path, "available", np.array([1]))
    segs = [read_segment(tmp_path / n) for n in (add.name, off.name, back.name)]
    added = AddedItems().with_segments(segs, lambda ids: np.isin(ids, [1, 2, 3]))
    assert added.item_ids.tolist() == [7]  # id 2 is the index's: the first wins
    assert added.unavailable.tolist() == [7]
    feats = added.overlay(snapshot).lookup(np.array([7, 3]))
    assert feats.known.all() and feats.category.tolist() == [4, 1]
    assert feats.matrix[0].tolist() == [4.0, 8.5, 0.0]  # statistics at their default
    catalog = Catalog.build(
        item_ids=np.array([1, 2, 3, 7]),
        category=np.array([1, 2, 1, 4]),
        price=np.zeros(4),
        created_at=np.zeros(4),
        popularity=np.zeros(4),
        embeddings=np.zeros((3, 4), np.float32),
        added_embeddings=added.embeddings,
        unavailable=added.unavailable,
    )
    np.testing.assert_array_equal(catalog.vectors(np.array([3, 0])), [[1] * 4, [0] * 4])
    mask = catalog.request_filter(Filters(), np.zeros(0, np.int64))(np.arange(4))
    assert mask.tolist() == [True, True, True, False]


def test_fold_hands_added_items_to_the_next_training(settings: Settings) -> None:
    """`recstack items fold`: the added items join the raw item table (atomically, like
    the import), once; the interactions stay as they were."""
    generate(settings, preset="small", seed=3)
    before = read_raw(settings)
    new_id = int(before.items["item_id"].max()) + 10
    items = items_from_json(
        [{"item_id": new_id, "category": 5, "brand": 2, "price": 3.5, "created_at": "2026-01-02"}]
    )
    folder = delta_dir(settings, 1)
    write_segment(folder, "add", items.item_ids, items, np.ones((1, 4), np.float32))
    write_segment(folder, "unavailable", items.item_ids)
    assert fold(settings, 1) == 1
    after = read_raw(settings)
    assert len(after.items) == len(before.items) + 1
    row = after.items.set_index("item_id").loc[new_id]
    assert (row["category"], row["brand"], row["price"]) == (5, 2, 3.5)
    assert str(row["created_at"]) == "2026-01-02 00:00:00+00:00"
    assert len(after.interactions) == len(before.interactions)
    assert fold(settings, 1) == 0


def test_extended_fallbacks_equal_a_full_build() -> None:
    """Applying added items merges them into the popular/fresh lists instead of sorting
    the catalog again: the lists must be exactly what a full build gives (ties too)."""
    rng = np.random.default_rng(4)
    n, m = 500, 40

    def catalog(size: int) -> Catalog:
        return Catalog.build(
            item_ids=np.arange(size),
            category=np.zeros(size, np.int64),
            price=np.zeros(size),
            created_at=created[:size],
            popularity=popularity[:size],
            embeddings=np.zeros((size, 2), np.float32),
        )

    created = rng.integers(0, 50, n + m).astype(np.float64)  # many ties
    popularity = np.concatenate([rng.integers(0, 20, n), np.full(m, -1)]).astype(np.float64)
    for depth in (30, 1000):
        base = Fallbacks.build(catalog(n), depth)
        full = catalog(n + m)
        got = base.extended(full, np.arange(n, n + m), depth)
        want = Fallbacks.build(full, depth)
        np.testing.assert_array_equal(got.fresh_rows, want.fresh_rows)
        np.testing.assert_array_equal(got.popular_rows, want.popular_rows)


def test_new_items_by_key_keep_their_keys_to_the_next_training(
    settings: Settings, tmp_path: Path
) -> None:
    """SKUs in an item file: hashed like the importer hashes them, kept in the segment,
    named in refusals, accepted by the mark/probe id parser, and written to the raw key
    table by the fold."""
    path = _csv(tmp_path, "item_id,category\nSKU-9.a,3\n1234,4\n")
    items = read_items(path)
    assert items.item_ids.tolist() == [key_hash("SKU-9.a"), 1234]
    assert items.item_keys.tolist() == ["SKU-9.a", ""]
    with pytest.raises(UserError, match=r"line 2, column 'item_id': item 'SKU-9\.a' is already"):
        refuse_known(items, np.array([key_hash("SKU-9.a")]), 1)
    with pytest.raises(UserError, match="line 3, column 'item_id': item 1234 is already"):
        refuse_known(items, np.array([1234]), 1)
    assert parse_ids(["SKU-9.a", 7, "8"]).tolist() == [key_hash("SKU-9.a"), 7, 8]
    for bad in (["-1"], [True], ["ümlaut"], [2**63], [1.5]):
        with pytest.raises(UserError, match=r"item_ids\[0\]"):
            parse_ids(bad)
    with pytest.raises(UserError, match=r"line 2, column 'item_id'.*not a valid item id"):
        read_items(_csv(tmp_path, "item_id\nbad key!\n"))

    generate(settings, preset="small", seed=3)
    folder = delta_dir(settings, 1)
    seg = write_segment(folder, "add", items.item_ids, items, np.ones((2, 4), np.float32))
    assert read_segment(seg).item_keys.tolist() == ["SKU-9.a", ""]
    assert fold(settings, 1) == 2
    keys = read_keys(settings)["items"]
    assert keys.loc[keys["item_key"] == "SKU-9.a", "item_id"].tolist() == [key_hash("SKU-9.a")]
    assert 1234 not in keys["item_id"].tolist()


def test_train_folds_the_items_added_to_the_served_releases(settings: Settings) -> None:
    """`recstack train` starts by folding what `recstack items add` gave the served
    releases, so the release it builds indexes them; a later run folds nothing more."""
    from exporters import pipeline
    from exporters.release_state import ReleaseState, save_state

    generate(settings, preset="small", seed=3)
    before = read_raw(settings)
    new_id = int(before.items["item_id"].max()) + 1
    save_state(settings, ReleaseState(live=1))
    items = items_from_json([{"item_id": new_id, "category": 2}, {"item_id": "SKU-x"}])
    write_segment(delta_dir(settings, 1), "add", items.item_ids, items, np.ones((2, 4), np.float32))
    said: list[str] = []
    assert pipeline.run(settings, only="split", progress=said.append) == ["split"]
    assert "folded 2 items added to releases [1] into the raw item table" in said
    after = read_raw(settings)
    assert {new_id, key_hash("SKU-x")} <= set(after.items["item_id"])
    said.clear()
    pipeline.run(settings, only="split", progress=said.append)
    assert not [m for m in said if "folded" in m]
    more = items_from_json([{"item_id": new_id + 1}])
    write_segment(delta_dir(settings, 1), "add", more.item_ids, more, np.ones((1, 4), np.float32))
    said.clear()
    pipeline.run(settings, only="features", progress=said.append)  # not the first step
    assert not [m for m in said if "folded" in m]
    assert new_id + 1 not in set(read_raw(settings).items["item_id"])
