"""The Spark offline engine (exporters/spark_engine.py, docs/offline.md) against the pandas
engine on the small preset (read from the day-partitioned raw layout, with appended part
files) and the hand-made timeline: the same feature tables (schemas,
rows, values within float tolerance), the same ranker point-in-time rows through Feast's
Spark offline store, the same online rows after materialisation through Feast's Spark
engine, and a clear error without its set-up. Needs `make setup-spark` (Java + pyspark):
skipped on a developer's machine without it, a failure under CI, where `make test`
installs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from _features_fixtures import online_frames
from _raw_days_fixtures import appended_copy
from conftest import in_ci

from exporters import feature_tables as ft
from recstack.settings import PROJECT_ROOT, Settings


def require_spark() -> None:
    """Skip without Java + pyspark; fail under CI (set-up installs them)."""
    from exporters.spark_engine import require_spark as check
    from recstack.errors import UserError

    try:
        check()
    except UserError as e:
        if in_ci():
            pytest.fail(f"{e}; CI=true, so the Spark tests must run, not skip")
        pytest.skip(str(e))


pytestmark = pytest.mark.spark


def _canonical(df: pd.DataFrame, sort: bool = True) -> pd.DataFrame:
    """Rows in one order, list values as tuples (rounded: compared within tolerance)."""
    df = df.copy()
    for col in df.columns:
        if df[col].dtype == object:
            df[col] = df[col].map(
                lambda v: None if v is None else tuple(np.round(np.asarray(v, dtype=float), 5))
            )
    if not sort:
        return df
    return df.sort_values(list(df.columns), kind="stable").reset_index(drop=True)


@pytest.fixture(scope="module")
def both(
    small_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Settings, Settings]:
    require_spark()
    # The small preset as a full write plus an append: day partitions, two of them with a
    # second part file (merged in time order by both engines) and a day added by the
    # append (tests/_raw_days_fixtures.py).
    pandas_s = appended_copy(small_settings, tmp_path_factory.mktemp("pandas"))
    parts = list(pandas_s.raw_dir.glob("interactions/day=*/part-*.parquet"))
    assert len(parts) > 30 and sum(p.name == "part-000001.parquet" for p in parts) == 2
    # More partitions than the default 2: every partition holds a subset of the entities.
    spark_s = appended_copy(small_settings, tmp_path_factory.mktemp("spark")).model_copy(
        update={
            "offline_engine": "spark",
            "spark_master": "local[2]",
            "spark_partitions": 5,
            "spark_driver_memory": "1g",
        }
    )
    ft.build(pandas_s, "pandas")
    ft.build(spark_s)  # settings.offline_engine
    return pandas_s, spark_s


@pytest.mark.parametrize("name", list(ft.TABLE_FILES))
def test_spark_tables_equal_pandas_tables(both: tuple[Settings, Settings], name: str) -> None:
    pandas_s, spark_s = both
    want = pq.read_table(ft.table_path(pandas_s, name))
    got = pq.read_table(ft.table_path(spark_s, name))
    assert got.schema == want.schema
    assert got.num_rows == want.num_rows > 0
    pd.testing.assert_frame_equal(
        _canonical(got.to_pandas()), _canonical(want.to_pandas()), check_exact=False, rtol=1e-6
    )


def test_spark_tables_equal_pandas_on_the_hand_made_timeline(
    tmp_path: Path,
) -> None:
    """The hand-made timeline (tests/_features_fixtures.py): its two users' events end on
    different days (03-20, 03-02) and land in different partitions, so a table function
    that took the last day of data, or the popularity rank's competitors, from its own
    partition instead of the Context would differ here."""
    require_spark()
    from _features_fixtures import timeline_settings

    pandas_s = timeline_settings(tmp_path / "pandas")
    spark_s = timeline_settings(tmp_path / "spark").model_copy(
        update={"spark_master": "local[2]", "spark_partitions": 8, "spark_driver_memory": "1g"}
    )
    ft.build(pandas_s, "pandas")
    ft.build(spark_s, "spark")
    for name in ft.TABLE_FILES:
        want = pq.read_table(ft.table_path(pandas_s, name))
        got = pq.read_table(ft.table_path(spark_s, name))
        assert got.schema == want.schema, name
        pd.testing.assert_frame_equal(
            _canonical(got.to_pandas()), _canonical(want.to_pandas()), check_exact=False, rtol=1e-6
        )


def test_spark_build_leaves_no_part_files(both: tuple[Settings, Settings]) -> None:
    _, spark_s = both
    assert sorted(p.name for p in spark_s.features_dir.iterdir()) == sorted(ft.TABLE_FILES.values())


def test_spark_engine_without_java_names_the_setup_step(small_settings: Settings) -> None:
    env = {
        **os.environ,
        "PATH": str(Path(sys.executable).parent),  # no java on it
        "RECSTACK_DATA_DIR": str(small_settings.data_dir),
        "RECSTACK_OFFLINE_ENGINE": "spark",
    }
    env.pop("JAVA_HOME", None)
    proc = subprocess.run(
        [sys.executable, "-m", "recstack.cli", "features", "build"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "make setup-spark" in proc.stderr + proc.stdout


@pytest.fixture(scope="module")
def applied(both: tuple[Settings, Settings]) -> tuple[Settings, Settings]:
    """Both feature repositories applied: FileSources (pandas) and SparkSources (spark)."""
    from exporters import feast_ops

    for s in both:
        feast_ops.apply(s)
    return both


def test_ranker_rows_through_spark_equal_pandas(applied: tuple[Settings, Settings]) -> None:
    """The ranker's Feast inputs — point-in-time user and item features at event times,
    assembled as training assembles them — through Feast's Spark offline store."""
    from exporters import feature_assembly, ranker_train
    from exporters.raw_tables import read_table

    events = read_table(applied[0], "interactions").sample(400, random_state=3)
    times = pd.DatetimeIndex(events["timestamp"])
    arrays = {}
    for s in applied:
        layout = ranker_train.layout_for(s, ranker_train.n_categories_of(s))
        users = ranker_train.point_in_time_features(
            s, "user_id", events["user_id"].to_numpy(), times, layout.user_refs
        )
        items = ranker_train.point_in_time_features(
            s, "item_id", events["item_id"].to_numpy(), times, layout.item_refs
        )
        arrays[s.offline_engine] = [
            *feature_assembly.user_arrays(users, layout),
            *feature_assembly.item_arrays(items, layout),
        ]
    user_feats = np.asarray(arrays["pandas"][0], dtype=float)
    assert (user_feats != user_feats[0]).any()  # real, varied values, not all defaults
    for want, got in zip(arrays["pandas"], arrays["spark"], strict=True):
        np.testing.assert_allclose(
            np.asarray(got, dtype=float), np.asarray(want, dtype=float), rtol=1e-6
        )


def test_spark_materialisation_gives_the_same_online_rows(
    applied: tuple[Settings, Settings],
) -> None:
    from exporters import feast_ops

    for s in applied:
        feast_ops.materialize(s)
    want, got = online_frames(applied[0]), online_frames(applied[1])
    for w, g in zip(want, got, strict=True):
        assert list(g.columns) == list(w.columns)
        # Rows in the entity order asked for; most entities have stored values.
        assert w.iloc[:, 1:].notna().any(axis=1).mean() > 0.5
        pd.testing.assert_frame_equal(
            _canonical(g, sort=False), _canonical(w, sort=False), check_exact=False, rtol=1e-6
        )
