"""The multi-source candidates (exporters/candidates.py) and seen items (exporters/seen.py):
planted item-to-item neighbours are found, seen items never come back whatever the
history, and the batch seen lists equal the real-time rule folded over the events."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from exporters import candidates, seen
from exporters.candidates import ABSENT_RANK, CANDIDATE_FEATURES, SOURCES, Quotas


def _planted(n_users: int = 400, n_pairs: int = 30, seed: int = 0) -> pd.DataFrame:
    """Items 2k and 2k+1 are consumed together; every user also consumes random noise."""
    rng = np.random.default_rng(seed)
    rows = []
    t0 = pd.Timestamp("2026-01-01", tz="UTC")
    for u in range(n_users):
        for k in rng.choice(n_pairs, size=3, replace=False):
            rows += [(u, 2 * k), (u, 2 * k + 1)]
        rows += [(u, int(i)) for i in rng.integers(0, 2 * n_pairs, size=2)]
    df = pd.DataFrame(rows, columns=["user_id", "item_id"])
    df["timestamp"] = t0 + pd.to_timedelta(np.arange(len(df)), unit="s")
    df["event"] = "click"
    return df


@pytest.mark.parametrize("covisit", [False, True])
def test_item_to_item_finds_planted_neighbours(covisit: bool, monkeypatch) -> None:
    events = _planted()
    item_ids = np.arange(60, dtype=np.int64)
    if covisit:  # the large-catalog method, forced on a small case
        monkeypatch.setattr(candidates.baselines, "EASE_MAX_ITEMS", 10)
    model = candidates.build_model(events, item_ids, ["click"], before=None, top_n=5)
    assert ("covisitation" in model.info["method"]) == covisit
    for k in range(30):
        assert model.neighbours[2 * k, 0] == 2 * k + 1
        assert model.neighbours[2 * k + 1, 0] == 2 * k
    # A user who consumed only item 10 gets item 11 first from the source.
    rows, scores = candidates.i2i_scores(model, np.array([10]))
    assert rows[0] == 11 and scores[0] > 0


def test_before_cut_uses_only_earlier_events() -> None:
    events = _planted()
    cut = events["timestamp"].iloc[len(events) // 2]
    model = candidates.build_model(events, np.arange(60), ["click"], before=cut, top_n=5)
    early = events[events["timestamp"] < cut]
    assert model.info["interactions"] == len(early.drop_duplicates(["user_id", "item_id"]))


def test_seen_items_never_come_back_property() -> None:
    """Random catalogs, models and histories: no merged candidate is ever a seen item, no
    candidate repeats, and the features say which source found each one."""
    rng = np.random.default_rng(1)
    for trial in range(300):
        n = int(rng.integers(5, 400))
        top_n = int(rng.integers(1, 20))
        neighbours = rng.integers(-1, n, size=(n, top_n)).astype(np.int32)
        weights = rng.random((n, top_n)).astype(np.float32)
        model = candidates.SourceModel.from_arrays(
            np.arange(n) * 3 + 1,
            neighbours,
            weights,
            rng.integers(0, 50, n),
            {},
            category=rng.integers(-1, 6, n),
            created_at=rng.uniform(0, 100, n),
        )
        quotas = Quotas(
            ann=int(rng.integers(0, 50)),
            i2i=int(rng.integers(0, 50)),
            popular=int(rng.integers(0, 20)),
            category_popular=int(rng.integers(0, 20)),
            fresh=int(rng.integers(0, 20)),
        )
        history = rng.integers(-1, n, size=int(rng.integers(0, 3 * n)))
        blocked = history[history >= 0]
        extra = rng.random(n) < rng.random() * 0.5  # request filters, not-yet-created items

        def allowed(rows: np.ndarray, blocked: np.ndarray = blocked, extra=extra) -> np.ndarray:
            return ~np.isin(rows, blocked) & ~extra[rows]

        ann = rng.permutation(n)[: int(rng.integers(0, n + 1))]
        now = float(rng.uniform(0, 120))
        rows, feats, found = candidates.gather_found(model, quotas, ann, history, allowed, now)
        plain = candidates.gather(model, quotas, ann, history, allowed, now)
        assert np.array_equal(plain[0], rows) and np.array_equal(plain[1], feats)
        # Which sources found each row (the answer's `sources`), against the features.
        bit = {name: (found >> i & 1).astype(bool) for i, name in enumerate(SOURCES)}
        assert (found > 0).all(), trial
        assert np.array_equal(bit["retrieval"], feats[:, 0] < ABSENT_RANK), trial
        assert np.array_equal(bit["item_to_item"], feats[:, 1] < quotas.i2i), trial
        assert np.array_equal(bit["category_popular"], feats[:, 5] < ABSENT_RANK), trial
        assert np.array_equal(bit["fresh"], feats[:, 6] < ABSENT_RANK), trial
        assert np.isin(rows[bit["popular"]], model.popular_rows).all(), trial
        assert bit["popular"].sum() <= quotas.popular, trial
        assert not np.isin(rows, blocked).any(), trial
        assert not extra[rows].any(), trial
        assert len(np.unique(rows)) == len(rows), trial
        assert len(rows) <= quotas.total
        assert feats.shape == (len(rows), len(CANDIDATE_FEATURES))
        found_any = (feats[:, [0, 1, 5, 6]] < ABSENT_RANK).any(axis=1)
        assert (found_any | np.isin(rows, model.popular_rows)).all()
        fresh = feats[:, 6] < ABSENT_RANK
        assert (model.created_at[rows[fresh]] <= now).all()


def _gather_found_plainly(
    model: candidates.SourceModel,
    quotas: Quotas,
    ann_rows: np.ndarray,
    seen_rows: np.ndarray,
    allowed,
    now: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """gather_found as first written (one filter call and one sort per list, positions by
    binary search in each list): the oracle of the vectorised version (issue 13)."""

    def positions(source: np.ndarray, rows: np.ndarray) -> np.ndarray:
        order = np.argsort(source, kind="stable")
        pos = np.searchsorted(source[order], rows)
        pos_c = np.minimum(pos, max(len(source) - 1, 0))
        hit = (pos < len(source)) & (source[order][pos_c] == rows) if len(source) else pos < 0
        return np.where(hit, order[pos_c] if len(source) else 0, ABSENT_RANK).astype(np.float32)

    ann = np.asarray(ann_rows, dtype=np.int64)
    ann = ann[allowed(ann)][: quotas.ann]
    n_seen = int((np.asarray(seen_rows) >= 0).sum())
    reach_rows, reach_scores = candidates.i2i_scores(model, seen_rows)
    head = reach_rows[: 4 * quotas.i2i + n_seen]
    i2i = head[allowed(head)]
    head = model.popular_rows[: 4 * quotas.popular + n_seen]
    pop = head[allowed(head)][: quotas.popular]
    catpop = candidates._category_popular(model, seen_rows, 4 * quotas.category_popular + n_seen)
    catpop = catpop[allowed(catpop)][: quotas.category_popular]
    fresh = np.zeros(0, dtype=np.int64)
    if model.newest_rows is not None and model.newest_neg_created is not None:
        first_ok = int(np.searchsorted(model.newest_neg_created, -now, side="left"))
        head = model.newest_rows[first_ok : first_ok + 4 * quotas.fresh + n_seen]
        fresh = head[allowed(head)][: quotas.fresh]
    lists = (ann, i2i[: quotas.i2i], pop, catpop, fresh)
    stacked = np.concatenate(lists)
    unique, first, inverse = np.unique(stacked, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rows = unique[order]
    bits = np.repeat(np.uint8(1) << np.arange(len(lists), dtype=np.uint8), [len(a) for a in lists])
    found_unique = np.zeros(len(unique), dtype=np.uint8)
    np.bitwise_or.at(found_unique, inverse.ravel(), bits)
    feats = np.empty((len(rows), len(CANDIDATE_FEATURES)), dtype=np.float32)
    feats[:, 0] = positions(ann, rows)
    feats[:, 1] = positions(i2i, rows)
    pos = positions(reach_rows, rows)
    found = pos < ABSENT_RANK
    feats[:, 2] = 0.0
    feats[found, 2] = reach_scores[pos[found].astype(np.int64)]
    n = len(model.item_ids)
    inside = rows < n
    feats[:, 3] = np.where(inside, model.pop_rank[np.minimum(rows, n - 1)], n)
    feats[:, 4] = np.where(inside, np.log1p(model.pop_count[np.minimum(rows, n - 1)]), 0.0)
    feats[:, 5] = positions(catpop, rows)
    feats[:, 6] = positions(fresh, rows)
    return rows, feats, found_unique[order]


@pytest.mark.parametrize("dense", [False, True])
def test_gather_found_equals_the_plain_merge(dense: bool) -> None:
    """The vectorised merge (one filter call, positions from the merge itself) gives
    exactly the rows, features and source bits of the plain one, on random catalogs,
    sparse and dense item-to-item models, histories with unknown items, rows added since
    the model, and filters; and it calls ``allowed`` once."""
    rng = np.random.default_rng(7 + dense)
    for trial in range(300):
        n = int(rng.integers(1, 300))
        top_n = int(rng.integers(1, 15))
        model = candidates.SourceModel.from_arrays(
            np.arange(n) * 2 + 5,
            rng.integers(-1, n, size=(n, top_n)).astype(np.int32),
            rng.random((n, top_n)).astype(np.float32),
            rng.integers(0, 50, n),
            {},
            category=rng.integers(-1, 6, n),
            created_at=rng.uniform(0, 100, n),
        )
        if dense:
            model = dataclasses.replace(model, dense=rng.random((n, n)).astype(np.float32))
        quotas = Quotas(*(int(q) for q in rng.integers(0, 40, size=5)))
        n_all = n + int(rng.integers(0, 20))  # rows past the model's: added items
        history = rng.integers(-1, n_all, size=int(rng.integers(0, 2 * n + 1)))
        blocked = history[history >= 0]
        extra = rng.random(n_all) < rng.random() * 0.5
        calls = []

        def allowed(rows: np.ndarray, blocked=blocked, extra=extra, calls=calls) -> np.ndarray:
            calls.append(len(rows))
            return ~np.isin(rows, blocked) & ~extra[rows]

        ann = rng.permutation(n_all)[: int(rng.integers(0, n_all + 1))]
        now = float(rng.uniform(0, 120))
        got = candidates.gather_found(model, quotas, ann, history, allowed, now)
        assert len(calls) == 1, trial
        want = _gather_found_plainly(model, quotas, ann, history, allowed, now)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and np.array_equal(g, w), trial


def test_category_popular_and_fresh_sources() -> None:
    """The user's main category (of their newest seen items) brings its most popular
    unseen items; the newest items created by the request time come too."""
    n = 12
    category = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    pop = np.array([9, 8, 7, 1, 2, 3, 4, 50, 40, 30, 20, 10], dtype=float)
    created = np.arange(n, dtype=float)  # row 11 is the newest
    model = candidates.SourceModel.from_arrays(
        np.arange(n),
        np.full((n, 1), -1, np.int32),
        np.zeros((n, 1), np.float32),
        pop,
        {},
        category=category,
        created_at=created,
    )
    quotas = Quotas(ann=0, i2i=0, popular=0, category_popular=2, fresh=2)
    seen = np.array([3, 4, 0])  # mostly category 1

    def allowed(rows: np.ndarray) -> np.ndarray:
        return ~np.isin(rows, seen) & (created[rows] <= 9.5)

    rows, feats = candidates.gather(model, quotas, np.array([], np.int64), seen, allowed, 9.5)
    catpop = rows[feats[:, 5] < ABSENT_RANK].tolist()
    fresh = rows[feats[:, 6] < ABSENT_RANK].tolist()
    assert catpop == [6, 5]  # category 1, most popular first, seen 3 and 4 skipped
    assert fresh == [9, 8]  # the newest created by 9.5
    assert candidates.source_names(feats).tolist() == ["popular", "popular", "fresh", "fresh"]
    _, _, found = candidates.gather_found(model, quotas, np.array([], np.int64), seen, allowed, 9.5)
    assert candidates.found_names(found) == [
        ["category_popular"],
        ["category_popular"],
        ["fresh"],
        ["fresh"],
    ]
    # At 9.0 exactly, row 9 is created "now": not offered yet (exists_at), the fresh list
    # itself starts below it (the filter here checks no time). An import without creation
    # times dates an item by its first interaction; offline, that is the very event a
    # request at 9.0 is labelled by.
    rows, feats = candidates.gather(
        model, quotas, np.array([], np.int64), seen, lambda r: ~np.isin(r, seen), 9.0
    )
    assert rows[feats[:, 6] < ABSENT_RANK].tolist() == [8, 7]
    assert candidates.exists_at(created, 9.0).tolist() == [t < 9.0 for t in created]


def test_seen_table_equals_the_real_time_rule() -> None:
    rng = np.random.default_rng(2)
    n = 3000
    df = pd.DataFrame(
        {
            "user_id": rng.integers(0, 40, n),
            "item_id": rng.integers(0, 60, n),
            "timestamp": pd.Timestamp("2026-01-01", tz="UTC")
            + pd.to_timedelta(rng.integers(0, 10_000, n), unit="s"),
            "event": rng.choice(["view", "click", "purchase"], n),
        }
    ).sort_values("timestamp", kind="stable")
    events = ("click", "purchase")
    table = seen.seen_table(df, events, cap=25)
    got = dict(zip(table["user_id"], [list(x) for x in table["seen_items"]], strict=True))
    for u, g in df[df["event"].isin(events)].groupby("user_id"):
        folded: list[int] = []
        for item in g["item_id"]:
            folded = seen.update_seen(folded, int(item), cap=25)
        assert got[u] == folded


def test_seen_events_come_from_the_data_unless_overridden() -> None:
    assert seen.seen_events({}) == ("click", "purchase")
    assert seen.seen_events({"seen_events": ["view", "click", "purchase"]}) == (
        "view",
        "click",
        "purchase",
    )
    assert seen.seen_events({"seen_events": ["view"]}, ("purchase",)) == ("purchase",)
    with pytest.raises(ValueError):
        seen.seen_events({}, ("rated",))


def _country_world(seed: int = 3) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """60 items in 3 categories (item i in category i % 3), globally Zipf-popular by id.
    Country 1's users (120) take category 2 nine times in ten; country 0's (300) follow
    global popularity; country 2 has 10 users (thin). Ages: 0 or 1 at random."""
    rng = np.random.default_rng(seed)
    n_items = 60
    zipf = 1.0 / np.arange(1, n_items + 1)
    zipf /= zipf.sum()
    cat2 = np.flatnonzero(np.arange(n_items) % 3 == 2)
    country = np.array([0] * 300 + [1] * 120 + [2] * 10)
    rows = []
    for u, c in enumerate(country):
        for _ in range(10):
            if c == 1 and rng.random() < 0.9:
                rows.append((u, int(rng.choice(cat2, p=zipf[cat2] / zipf[cat2].sum()))))
            else:
                rows.append((u, int(rng.choice(n_items, p=zipf))))
    events = pd.DataFrame(rows, columns=["user_id", "item_id"])
    t0 = pd.Timestamp("2026-01-01", tz="UTC")
    events["timestamp"] = t0 + pd.to_timedelta(np.arange(len(events)), unit="s")
    events["event"] = "click"
    users = pd.DataFrame(
        {
            "user_id": np.arange(len(country)),
            "country": country,
            "age_bucket": rng.integers(0, 2, size=len(country)),
        }
    )
    items = pd.DataFrame(
        {
            "item_id": np.arange(n_items),
            "category": np.arange(n_items) % 3,
            "created_at": [t0] * n_items,
        }
    )
    return events, users, items


def test_segment_lists_follow_the_segment_and_thin_ones_fall_back(tmp_path) -> None:
    events, users, items = _country_world()
    item_ids = np.arange(60, dtype=np.int64)
    model = candidates.build_model(
        events, item_ids, ["click"], before=None, top_n=5, items=items, users=users
    )
    # Global popularity leads with items 0 and 1 (categories 0 and 1) ...
    assert model.popular_rows[0] == 0
    # ... country 1's list leads with category 2, most of its head too.
    name, rows = model.segment_popular({"country": 1, "age_bucket": -1})
    assert name == "country=1"
    assert rows[0] % 3 == 2 and (rows[:10] % 3 == 2).mean() >= 0.8
    # Its order is the count of its users who consumed each item.
    members = users.loc[users["country"] == 1, "user_id"]
    pairs = events[events["user_id"].isin(members)].drop_duplicates(["user_id", "item_id"])
    counts = pairs["item_id"].value_counts()
    assert counts.loc[rows[:5]].is_monotonic_decreasing
    assert counts.loc[rows[0]] == counts.max()
    # Country 2 has 10 users (< SEGMENT_MIN_USERS): no list, so its users get the age
    # bucket's (the next most specific segment that is not thin) ...
    assert model.segment_popular({"country": 2, "age_bucket": 1})[0] == "age_bucket=1"
    # ... or, with nothing else known, no segment: the caller serves the global list.
    assert model.segment_popular({"country": 2, "age_bucket": -1}) is None
    assert model.segment_popular({"country": 7, "age_bucket": -1}) is None
    info = model.info["segments"]
    assert info["attributes"] == ["country", "age_bucket"]
    assert "country=2" not in model.segment_names and info["thin"] >= 1
    assert info["kept"] == len(model.segment_names)
    # Joint segments exist when not thin: country 0 × age bucket, most specific first.
    assert model.segment_popular({"country": 0, "age_bucket": 1})[0] == "country=0,age_bucket=1"
    # Saved and loaded whole; a file without segments (an older release) loads with none.
    path = tmp_path / "candidates.npz"
    model.save(path)
    loaded = candidates.SourceModel.load(path)
    assert loaded.segment_names == model.segment_names
    np.testing.assert_array_equal(loaded.segment_rows, model.segment_rows)
    old = candidates.build_model(events, item_ids, ["click"], before=None, top_n=5)
    old.save(path)
    assert candidates.SourceModel.load(path).segment_popular({"country": 1}) is None


def test_segment_lists_are_point_in_time_and_skip_constant_attributes() -> None:
    events, users, items = _country_world()
    item_ids = np.arange(60, dtype=np.int64)
    # Before the cut only country 0's users acted (they come first): country 1 is thin.
    cut = events.loc[events["user_id"] == 300, "timestamp"].min()
    early = candidates.build_model(
        events, item_ids, ["click"], before=cut, top_n=5, items=items, users=users
    )
    assert early.segment_popular({"country": 1}) is None
    assert early.segment_popular({"country": 0})[0] == "country=0"
    # An import without a country column writes 0 for every user: no country segments.
    flat = users.assign(country=0)
    model = candidates.build_model(
        events, item_ids, ["click"], before=None, top_n=5, items=items, users=flat
    )
    assert model.info["segments"]["attributes"] == ["age_bucket"]
    assert all(n.startswith("age_bucket=") for n in model.segment_names)


def test_context_lists_follow_the_request_context() -> None:
    """Popular lists per request context value (``surface=cart``) from the events' own
    context: what was consumed there, thin values dropped, one-valued columns ignored;
    the user's attribute segments come first."""
    events, users, items = _country_world()
    rng = np.random.default_rng(1)
    on_cart = (events["item_id"] % 3 == 2) & (rng.random(len(events)) < 0.8)
    events["surface"] = np.where(on_cart, "cart", "home")
    events.loc[events.index[:40], "surface"] = "tiny"  # 40 events: thin
    events["device"] = "web"  # one value: no device segments
    item_ids = np.arange(60, dtype=np.int64)
    model = candidates.build_model(
        events, item_ids, ["click"], before=None, top_n=5, items=items, users=users
    )
    name, rows = model.segment_popular({}, {"surface": "cart", "device": "web"})
    assert name == "surface=cart" and (rows[:10] % 3 == 2).all()
    pairs = events[events["surface"] == "cart"].drop_duplicates(["user_id", "item_id"])
    counts = pairs["item_id"].value_counts()
    assert counts.loc[rows[0]] == counts.max()
    assert model.segment_popular({}, {"surface": "home"})[0] == "surface=home"
    for surface in ("tiny", "search", "a page/with spaces", ""):
        assert model.segment_popular({}, {"surface": surface}) is None
    # Who the user is comes before where they are.
    assert model.segment_popular({"country": 1}, {"surface": "cart"})[0] == "country=1"
    assert model.info["segments"]["context"] == {"columns": ["surface"], "kept": 2, "thin": 1}
    assert candidates.segment_candidates({"country": 3}, {"surface": "cart", "device": "ios"}) == [
        "country=3",
        "surface=cart",
        "device=ios",
    ]
