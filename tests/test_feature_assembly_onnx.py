"""The shared feature assembly: ONNX export == PyTorch, training rows == serving rows,
and the layout is read from the Feast definitions."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from exporters import feature_assembly as fa
from recstack.settings import Settings

LAYOUT = fa.Layout(
    user_features=("user_clicks_7d", "user_last_event_at", "user_mean_purchase_price"),
    affinity_feature="user_category_affinity",
    n_categories=12,
    item_features=("category", "price", "item_views_7d"),
)


def test_onnx_matches_torch_and_has_dynamic_n(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "rank_features.onnx"
    record = fa.export_onnx(path, LAYOUT, settings.model_repository)
    assert path.exists()
    assert record["max_abs_diff"] < 1e-5
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == list(fa.example_inputs(LAYOUT, 1))
    for n in (2, 513):  # sizes other than the export's sample
        inputs = fa.example_inputs(LAYOUT, n, seed=n)
        got = sess.run(None, inputs)[0]
        want = fa.run_torch(fa.RankFeatures(LAYOUT), inputs)
        assert got.shape == (n, LAYOUT.n_features)
        np.testing.assert_allclose(got, want, atol=1e-5, equal_nan=True)


def test_onnx_of_another_layout_fails_parity(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "rank_features.onnx"
    fa.export_onnx(path, LAYOUT, settings.model_repository)
    other = replace(LAYOUT, user_price_feature=None)  # price cross feature now constant
    with pytest.raises(fa.AssemblyParityError):
        fa.check_onnx_parity(path, other)


def test_cross_features_by_hand() -> None:
    day = fa.SECONDS_PER_DAY
    now = 1.78e9 + 0.25  # float32 could not hold this time to the second
    inputs = {
        "user_features": np.array([[3.0, now - 2 * day, 20.0]], dtype=np.float32),
        "user_category_affinity": np.linspace(0, 1, 12, dtype=np.float32)[None, :] / 2,
        "user_embedding": np.eye(1, 64, dtype=np.float32),
        "item_features": np.array([[5, 10, 7], [0, 40, 1], [99, 5, 0]], dtype=np.float32),
        "item_category": np.array([11, 0, 99], dtype=np.int64),  # 99: unknown category
        "item_created_at": np.array([now - 1.5 * day, now - 0.5, now - 10 * day]),
        "item_embedding": np.stack([np.eye(1, 64)[0] * s for s in (0.5, -1, 0)]).astype(np.float32),
        "request_time": np.array([now]),
    }
    out = fa.run_torch(fa.RankFeatures(LAYOUT), inputs)
    col = {name: out[:, i] for i, name in enumerate(LAYOUT.names)}
    np.testing.assert_allclose(col["x_tower_score"], [0.5, -1, 0])
    np.testing.assert_allclose(col["x_category_affinity"], [0.5, 0.0, 0.0])
    np.testing.assert_allclose(col["x_category_affinity_rel"], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(col["x_item_age_days"], [1.5, 0.5 / day, 10], rtol=1e-6)
    np.testing.assert_allclose(col["x_price_vs_user_mean"], [0.5, 2.0, 0.25])
    # the user's last event time became an age; float32 time is good to ~2 minutes.
    np.testing.assert_allclose(col["user_last_event_days_ago"], 2.0, atol=2e-3)
    np.testing.assert_array_equal(col["price"], [10, 40, 5])


def test_assemble_equals_per_request_module() -> None:
    rng = np.random.default_rng(0)
    reqs = [fa.example_inputs(LAYOUT, n, seed=s) for s, n in enumerate((4, 1, 6))]
    query = np.repeat(np.arange(3), [4, 1, 6])
    perm = rng.permutation(len(query))  # rows of a request need not be contiguous

    def cat(key: str) -> np.ndarray:
        return np.concatenate([r[key] for r in reqs])

    rows = fa.assemble(
        LAYOUT,
        user_features=cat("user_features"),
        user_category_affinity=cat("user_category_affinity"),
        user_embedding=cat("user_embedding"),
        request_time=cat("request_time"),
        item_features=cat("item_features")[perm],
        item_category=cat("item_category")[perm],
        item_created_at=cat("item_created_at")[perm],
        item_embedding=cat("item_embedding")[perm],
        query=query[perm],
    )
    want = np.concatenate([fa.run_torch(fa.RankFeatures(LAYOUT), r) for r in reqs])[perm]
    np.testing.assert_array_equal(rows, want)


def test_missing_feast_values_get_the_shared_defaults() -> None:
    from exporters.feature_tables import default_value

    users = {n: [1.0, None] for n in LAYOUT.user_features}
    users[LAYOUT.affinity_feature] = [[0.5] * 12, None]
    feats, aff = fa.user_arrays(users, LAYOUT)
    assert feats[1].tolist() == [default_value(n) for n in LAYOUT.user_features]
    assert (aff[1] == 0).all() and (aff[0] == 0.5).all()
    items = {"category": [3, None], "price": [1.0, 2.0], "item_views_7d": [None, 4]}
    items["created_at"] = [1.7e9, None]
    feats, cat, created = fa.item_arrays(items, LAYOUT)
    assert cat.tolist() == [3, default_value("category")] == [3, -1]
    assert created.tolist() == [1.7e9, default_value("created_at")]
    assert feats[:, 2].tolist() == [default_value("item_views_7d"), 4]


@dataclass
class _Feature:
    view: str
    name: str
    dtype: str
    entity_key: str


def test_layout_from_service_features() -> None:
    """Shaped like exporters.feast_ops.service_features(store, "ranking")."""
    feats = [
        _Feature("user_activity", "user_clicks_7d", "Int64", "user_id"),
        _Feature("user_activity", "user_last_event_at", "Float64", "user_id"),
        _Feature("user_activity", "user_mean_purchase_price", "Float64", "user_id"),
        _Feature("user_activity", "user_category_affinity", "Array(Float32)", "user_id"),
        _Feature("item_profile", "category", "Int64", "item_id"),
        _Feature("item_profile", "price", "Float64", "item_id"),
        _Feature("item_profile", "created_at", "Float64", "item_id"),
        _Feature("item_statistics", "item_views_7d", "Int64", "item_id"),
    ]
    layout = fa.layout_from_service(feats, n_categories=12)
    assert layout == replace(
        LAYOUT,
        user_refs=tuple(f"{f.view}:{f.name}" for f in feats[:4]),
        item_refs=tuple(f"{f.view}:{f.name}" for f in feats[4:]),
    )
    assert fa.Layout.from_json(layout.to_json()) == layout
    assert len(layout.names) == layout.n_features == len(set(layout.names))
    assert not any(n.endswith(fa.TIME_SUFFIX) for n in layout.names)  # times became ages


def test_layout_refuses_a_service_without_affinity() -> None:
    feats = [_Feature("u", "a", "Int64", "user_id"), _Feature("i", "category", "Int64", "item_id")]
    with pytest.raises(ValueError, match="affinity"):
        fa.layout_from_service(feats, 5)
