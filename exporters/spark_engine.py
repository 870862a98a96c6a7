"""The Spark offline engine: the feature tables of exporters/feature_tables.py on Spark.

Selected by ``recstack train --engine spark`` / ``RECSTACK_OFFLINE_ENGINE=spark``; needs
``make setup-spark`` (Debian's Java runtime and pyspark, requirements/spark.lock). Spark
runs at ``settings.spark_master``: ``local[*]`` (local mode, this host's cores) by default,
a cluster's master URL otherwise (docs/offline.md).

There is no Spark version of any feature: each table's function
(``feature_tables.TABLES``) is per-entity separable, so Spark hash-partitions the raw rows
by the table's entity and calls the same pandas function once per partition
(``mapInArrow``). What a function needs of the whole data (the catalog, the last day of
data, the per-item daily event counts of the popularity rank) is computed once and shipped
to every task in its ``Context``. Within a partition rows are put back in the raw table's
order first, because ties in time are broken by row order (exporters/seen.py,
exporters/history.py), and neither Spark's file listing (it packs files by size) nor its
shuffle keeps it: each row carries its place (day, part, row in the part file: Spark's
``_metadata``) and ``event_days.order_rows`` — the pandas reader's own rule — sorts by it.
The interactions are read as the day-partitioned dataset's part files
(exporters/event_days.py), or a legacy single file.

Spark writes each table as part files; they are then merged, in the expected schema, into
the single parquet file the pandas engine writes (Feast's FileSources read those files),
one part at a time so the driver holds one part, not the table.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from exporters import event_days
from exporters import feature_tables as ft
from exporters.raw_tables import read_meta, read_table, table_parts
from recstack.errors import UserError
from recstack.settings import Settings

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

EVENTS_PER_PARTITION = 1_000_000
SETUP_HINT = "run `make setup-spark` (Debian's Java runtime + pyspark) first"


def require_spark() -> None:
    """UserError naming the set-up step unless pyspark and a Java runtime are installed."""
    try:
        import pyspark  # noqa: F401
    except ImportError as e:
        raise UserError(f"the spark offline engine needs pyspark: {SETUP_HINT}") from e
    java_home = os.environ.get("JAVA_HOME")
    if not shutil.which("java") and not (java_home and Path(java_home, "bin", "java").exists()):
        raise UserError(f"the spark offline engine needs a Java runtime: {SETUP_HINT}")


def prepare_python() -> None:
    """Check the set-up; make Spark's Python workers run this interpreter (the venv, with
    pandas and pyarrow), not PATH's python3."""
    require_spark()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


def spark_conf(settings: Settings) -> dict[str, str]:
    """The Spark session's configuration (settings.spark_*): the feature-table build's and
    Feast's (its Spark offline store and engine start theirs from it)."""
    return {
        "spark.app.name": "recstack-offline",
        "spark.master": settings.spark_master,
        "spark.driver.memory": settings.spark_driver_memory,
        "spark.executor.memory": settings.spark_executor_memory,
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
    }


def session(settings: Settings) -> SparkSession:
    """The Spark session of ``settings`` (see :func:`spark_conf`)."""
    prepare_python()
    from pyspark.sql import SparkSession

    builder = SparkSession.builder
    for key, value in spark_conf(settings).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def _partition_runner(
    make: Callable[[pd.DataFrame, ft.Context], pa.Table],
    ctx: ft.Context,
    schema: pa.Schema,
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """A mapInArrow function: the whole partition, in raw row order, through ``make``."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        parts = list(batches)
        if not parts or sum(b.num_rows for b in parts) == 0:
            return
        df = pa.Table.from_batches(parts).to_pandas()
        df = df.iloc[event_days.order_rows(df)].drop(columns=list(event_days.PLACE_COLUMNS))
        df = df.reset_index(drop=True)
        yield from make(df, ctx).cast(schema).to_batches()

    return run


def _by_entity(
    df: DataFrame,
    key: str,
    partitions: int,
    make: Callable[[pd.DataFrame, ft.Context], pa.Table],
    ctx: ft.Context,
    schema: pa.Schema,
) -> DataFrame:
    """``make`` over ``df`` hash-partitioned by ``key``, as a DataFrame of ``schema``."""
    from pyspark.sql.pandas.types import from_arrow_schema

    return df.repartition(partitions, key).mapInArrow(
        _partition_runner(make, ctx, schema), from_arrow_schema(schema)
    )


def _daily(df: pd.DataFrame, ctx: ft.Context) -> pa.Table:
    return pa.Table.from_pandas(ft.item_daily_counts(df), preserve_index=False)


def _merge_parts(parts_dir: Path, schema: pa.Schema, dest: Path) -> int:
    """Spark's part files -> one parquet file of ``schema`` at ``dest`` (atomically)."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    rows = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        for part in sorted(parts_dir.glob("part-*.parquet")):
            table = pq.read_table(part).cast(schema)
            rows += table.num_rows
            writer.write_table(table)
    os.replace(tmp, dest)
    return rows


def _read_placed(spark: SparkSession, parts: list[event_days.Part]) -> DataFrame:
    """The files of ``parts`` as one DataFrame whose rows carry their place
    (event_days.PLACE_COLUMNS): the day and part parsed from the file's path, the row's
    index in its file, and whether its day is held in several parts."""
    from pyspark.sql import functions as F

    per_day = Counter(p.day for p in parts)
    merged = [d for d, n in per_day.items() if n > 1]
    path = F.col("_metadata.file_path")
    day = F.regexp_extract(path, r"day=(\d{4}-\d{2}-\d{2})/part-\d+\.parquet$", 1)
    # "0" + the digits: a legacy file (no part number) reads as part 0, and the cast is
    # valid under ANSI mode.
    seq = F.concat(F.lit("0"), F.regexp_extract(path, r"part-(\d+)\.parquet$", 1))
    return (
        spark.read.parquet(*(str(p.path) for p in parts))
        .withColumn(event_days.DAY_COL, day)
        .withColumn(event_days.PART_COL, seq.cast("long"))
        .withColumn(event_days.POS_COL, F.col("_metadata.row_index"))
        .withColumn(event_days.MERGED_COL, day.isin(merged) if merged else F.lit(False))
    )


def build_feature_tables(settings: Settings) -> None:
    """Every table of ``feature_tables.TABLES`` through Spark (see the module docstring)."""
    from pyspark.sql import functions as F

    meta = read_meta(settings)
    items = read_table(settings, "items")
    t0 = time.perf_counter()
    spark = session(settings)
    log.info("spark session at %s in %.1f s", settings.spark_master, time.perf_counter() - t0)
    try:
        sources = {name: table_parts(settings, name) for name in ("interactions", "items", "users")}
        frames = {name: _read_placed(spark, ps) for name, ps in sources.items()}
        inter = frames["interactions"]
        stats = inter.agg(F.count(F.lit(1)), F.max(F.unix_micros("timestamp"))).collect()[0]
        n_events, last_us = int(stats[0]), stats[1]
        last_day = None if last_us is None else int(last_us) // ft.US_PER_DAY
        partitions = settings.spark_partitions or max(
            spark.sparkContext.defaultParallelism, math.ceil(n_events / EVENTS_PER_PARTITION)
        )
        empty = {
            name: pq.read_schema(ps[0].path).empty_table().to_pandas()
            for name, ps in sources.items()
        }
        # The per-item daily counts of all events: the popularity rank's global input.
        bare = ft.make_context(
            items, meta, settings, last_day, ft.item_daily_counts(empty["interactions"])
        )
        daily_schema = _daily(empty["interactions"], bare).schema
        daily = (
            _by_entity(inter, "item_id", partitions, _daily, bare, daily_schema)
            .toArrow()
            .cast(daily_schema)
            .to_pandas()
        )
        ctx = ft.make_context(items, meta, settings, last_day, daily)
        log.info(
            "%d events, last day %s, %d partitions, %d item-days in %.1f s",
            n_events,
            last_day,
            partitions,
            len(daily),
            time.perf_counter() - t0,
        )
        for spec in ft.TABLES:
            t = time.perf_counter()
            # The schema is the function's own output on no rows: one definition of it too.
            schema = spec.make(empty[spec.source], ctx).schema
            out = _by_entity(frames[spec.source], spec.key, partitions, spec.make, ctx, schema)
            dest = ft.table_path(settings, spec.name)
            parts = dest.with_name(f".{dest.name}.parts")
            shutil.rmtree(parts, ignore_errors=True)
            out.write.mode("overwrite").parquet(str(parts))
            rows = _merge_parts(parts, schema, dest)
            shutil.rmtree(parts, ignore_errors=True)
            log.info("%s: %d rows in %.1f s (spark)", spec.name, rows, time.perf_counter() - t)
    finally:
        spark.stop()
