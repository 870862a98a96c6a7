"""Two-tower training: inputs respect time, training is deterministic, the model learns."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from _two_tower_fixtures import TEST_HPARAMS, Trained, build_trained, write_tiny
from conftest import make_settings

from exporters import two_tower
from exporters.history import HISTORY_LEN, PAD, recent_items_table
from exporters.split import write_split
from exporters.tower_inputs import history_before, item_inputs, pad_lists, user_inputs
from recstack.settings import Settings

T0 = pd.Timestamp("2026-01-01", tz="UTC")


@pytest.fixture(scope="module")
def trained(small_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return build_trained(small_settings, tmp_path_factory)


def _events(rows: list[tuple[int, int, int, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": np.array([r[0] for r in rows], dtype=np.int64),
            "item_id": np.array([r[1] for r in rows], dtype=np.int64),
            "timestamp": [T0 + pd.Timedelta(seconds=r[2]) for r in rows],
            "event": [r[3] for r in rows],
        }
    )


def test_history_is_strictly_before_the_example_time() -> None:
    inter = _events(
        [
            (1, 10, 0, "click"),
            (1, 11, 5, "view"),  # views are not history
            (1, 12, 10, "purchase"),
            (1, 13, 10, "click"),  # same second as 12
            (2, 20, 3, "click"),
        ]
    )
    at = [T0 + pd.Timedelta(seconds=s) for s in (0, 1, 10, 11, 11, 11)]
    got = history_before(inter, np.array([1, 1, 1, 1, 2, 3]), pd.Series(at))
    assert got.shape == (6, HISTORY_LEN)
    assert (got[0] == PAD).all()  # its own click at t=0 is not visible
    assert list(got[1][:1]) == [10]
    assert list(got[2][:2]) == [10, PAD]  # both events at t=10 excluded
    assert list(got[3][:3]) == [13, 12, 10]  # most recent first (stable order at ties)
    assert list(got[4][:2]) == [20, PAD]
    assert (got[5] == PAD).all()  # unknown user


def test_pad_lists_matches_history_pad() -> None:
    from exporters.history import pad

    lists = [[], [1, 2, 3], list(range(30))]
    got = pad_lists(lists)
    assert got.dtype == np.int64
    for row, lst in zip(got, lists, strict=True):
        assert (row == pad(lst)).all()


def test_unknown_users_and_items_get_unknown_codes() -> None:
    users = pd.DataFrame({"user_id": [5], "age_bucket": [2], "country": [3]})
    u = user_inputs(users, np.array([5, 6]), np.full((2, HISTORY_LEN), PAD))
    assert u["age_bucket"].ravel().tolist() == [2, -1]
    assert u["user_id"].shape == (2, 1)
    items = pd.DataFrame(
        {
            "item_id": [7],
            "category": [4],
            "brand": [1],
            "price": [9.5],
            "created_at": [T0 - pd.Timedelta(days=3)],
        }
    )
    i = item_inputs(items, np.array([7, 8]), T0)
    assert i["category"].ravel().tolist() == [4, -1]
    assert i["age_days"].ravel().tolist() == pytest.approx([3.0, 0.0])
    assert i["price"].dtype == np.float32


def _fit_tiny(tmp_path, seed: int) -> tuple[two_tower.TwoTower, two_tower.TrainResult]:
    s = make_settings(tmp_path / f"s{seed}", seed=seed)
    write_tiny(s, n_events=3000)
    write_split(s)
    hp = two_tower.HParams(batch_size=128, epochs=1)
    model, result, _ = two_tower.fit(s, hp, progress=False)
    return model, result


def test_training_is_deterministic_for_a_seed(tmp_path) -> None:
    m1, r1 = _fit_tiny(tmp_path / "a", seed=3)
    m2, r2 = _fit_tiny(tmp_path / "b", seed=3)
    _, r3 = _fit_tiny(tmp_path / "c", seed=4)
    assert r1.epoch_losses == r2.epoch_losses
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert r1.epoch_losses != r3.epoch_losses


def test_embeddings_are_unit_norm_and_checkpoint_round_trips(trained: Trained) -> None:
    s = trained.settings
    model, meta = two_tower.load(s.work_dir / two_tower.CHECKPOINT)
    assert meta["hparams"]["epochs"] == TEST_HPARAMS.epochs
    assert meta["vocab"]["item_buckets"] >= 1
    for k, v in trained.model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    b = 4
    with torch.no_grad():
        u = model.user(
            torch.arange(b).reshape(-1, 1),
            torch.zeros(b, 1, dtype=torch.int64),
            torch.full((b, 1), -5),  # unknown country code
            torch.full((b, HISTORY_LEN), PAD),
        )
    assert u.shape == (b, 64)
    assert torch.allclose(u.norm(dim=1), torch.ones(b), atol=1e-5)


def test_training_lowers_the_loss(trained: Trained) -> None:
    m = trained.meta["metrics"]
    assert m["epoch_losses"][-1] < m["epoch_losses"][0]
    # An untrained model scores log(batch) at best; the trained one must do much better.
    assert m["val_loss"] < np.log(TEST_HPARAMS.batch_size) - 0.5


def test_no_train_positives_is_a_user_error(tmp_path) -> None:
    from recstack.errors import UserError

    s = make_settings(tmp_path)
    tables = write_tiny(s, n_events=200)
    split_json = s.data_dir / "split.json"
    start = tables.interactions["timestamp"].min()
    split_json.write_text(
        f'{{"train_end": "{start.isoformat()}", "val_end": "{start.isoformat()}"}}'
    )
    with pytest.raises(UserError, match="fewer than 2"):
        two_tower.fit(s, progress=False)


def test_recent_items_table_agrees_with_history_before(trained: Trained) -> None:
    """Online lookup right after an event == training history just after that event."""
    from exporters.raw_tables import read_raw

    inter = read_raw(trained.settings).interactions
    table = recent_items_table(inter).iloc[:200]
    after = table["event_timestamp"] + pd.Timedelta(microseconds=1)
    got = history_before(inter, table["user_id"].to_numpy(), after)
    # Several events of one user in the same microsecond: the table's row is mid-tie.
    last = ~table.duplicated(["user_id", "event_timestamp"], keep="last").to_numpy()
    assert last.sum() > 0
    want = pad_lists(list(table["recent_items"]))
    assert (got[last] == want[last]).all()
