"""Ranker export parity: the Treelite checkpoint and the tl2cgen library reproduce
LightGBM's raw scores, and a tampered (stale or corrupted) artifact fails the check."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from exporters import feature_assembly as fa
from exporters import ranker_export
from exporters.ranker_export import ExportParams, RankerParityError, check_ranker_parity
from exporters.ranker_train import MANIFEST_FILE, MODEL_FILE, SAMPLE_FILE
from recstack.settings import Settings

LAYOUT = fa.Layout(
    user_features=("user_clicks_7d", "user_last_event_at", "user_mean_purchase_price"),
    affinity_feature="user_category_affinity",
    n_categories=6,
    item_features=("category", "price", "item_views_7d"),
)
N_TREES = 12
# Tiny trees compile in seconds; parallel_comp=1 keeps gcc to one process.
PARAMS = ExportParams(parallel_comp=1, bench_repeats=3, bench_other_variant=False)


def _rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, LAYOUT.n_features)).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = np.nan  # missing values take the default branches
    return x


def _booster(rows: np.ndarray, n_trees: int = N_TREES) -> lgb.Booster:
    rng = np.random.default_rng(1)
    y = (np.nan_to_num(rows[:, 0]) + rng.normal(0, 0.5, len(rows)) > 0.8).astype(int)
    y[::7] = 2
    params = {"objective": "lambdarank", "num_leaves": 7, "min_data_in_leaf": 5}
    params |= {"verbosity": -1, "seed": 1, "num_threads": 1, "deterministic": True}
    data = lgb.Dataset(rows, y, group=[40] * (len(rows) // 40))
    return lgb.train(params, data, num_boost_round=n_trees)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A booster, its checkpoint and library, and those of the same booster minus its last
    tree (a stale artifact: the classic way a served model silently drifts)."""
    import treelite

    base = tmp_path_factory.mktemp("ranker")
    rows = _rows(400, 0)
    booster = _booster(rows)
    stale = lgb.Booster(model_str=booster.model_to_string(num_iteration=N_TREES - 1))
    out: dict[str, object] = {"booster": booster, "rows": _rows(300, 2)}
    for name, b in (("good", booster), ("stale", stale)):
        model = treelite.frontend.from_lightgbm(b)
        model.serialize(str(base / f"{name}.tl"))
        ranker_export.compile_library(model, base / f"{name}.so", PARAMS, quantize=1)
        out[f"{name}_checkpoint"] = base / f"{name}.tl"
        out[f"{name}_library"] = base / f"{name}.so"
    return out


def test_parity_passes(artifacts: dict) -> None:
    rec = check_ranker_parity(
        artifacts["booster"],
        artifacts["rows"],
        checkpoint=artifacts["good_checkpoint"],
        library=artifacts["good_library"],
    )
    assert rec["checkpoint"]["max_abs_diff"] < 1e-5
    assert rec["library"]["max_abs_diff"] < 1e-5


@pytest.mark.parametrize("kind", ["checkpoint", "library"])
def test_stale_artifact_fails(artifacts: dict, kind: str) -> None:
    with pytest.raises(RankerParityError, match="max abs diff"):
        check_ranker_parity(
            artifacts["booster"], artifacts["rows"], **{kind: artifacts[f"stale_{kind}"]}
        )


@pytest.mark.parametrize("kind", ["checkpoint", "library"])
def test_corrupted_artifact_fails(artifacts: dict, kind: str, tmp_path: Path) -> None:
    data = bytearray(Path(artifacts[f"good_{kind}"]).read_bytes())
    bad = tmp_path / f"bad.{kind}"
    bad.write_bytes(bytes(data[: len(data) // 2]))  # truncated file
    with pytest.raises(RankerParityError, match="cannot score"):
        check_ranker_parity(artifacts["booster"], artifacts["rows"], **{kind: bad})


def _work_dir(settings: Settings, booster: lgb.Booster) -> Path:
    """What the ranker step leaves in work/ (model, manifest, sample rows)."""
    work = settings.work_dir
    work.mkdir(parents=True)
    booster.save_model(str(work / MODEL_FILE))
    manifest = {"feature_names": LAYOUT.names, "layout": LAYOUT.to_json(), "n_candidates": 40}
    (work / MANIFEST_FILE).write_text(json.dumps(manifest))
    np.save(work / SAMPLE_FILE, _rows(200, 3))
    return work


FINAL = ("checkpoint.tl", "model.so", "rank_features.onnx", "ranker_parity.json")


def test_export_writes_checked_artifacts(settings: Settings, artifacts: dict) -> None:
    work = _work_dir(settings, artifacts["booster"])
    ranker_export.export(settings, replace(PARAMS, bench_other_variant=True))
    assert all((work / f).exists() for f in FINAL)
    rec = json.loads((work / "ranker_parity.json").read_text())
    assert rec["ranker"]["library"]["max_abs_diff"] < 1e-5
    # FIL computes in float32: the shipped checkpoint is float32 and was gated as such
    import treelite

    shipped = treelite.Model.deserialize(str(work / "checkpoint.tl"))
    assert (shipped.input_type, shipped.output_type) == ("float32", "float32")
    f32 = rec["ranker"]["float32"]
    assert f32["same_leaf_decisions"] == N_TREES * (200 + 256)
    assert rec["ranker"]["checkpoint"]["max_abs_diff"] < f32["tolerance"] < 1e-3
    assert rec["ranker"]["float64_checkpoint"]["max_abs_diff"] < 1e-5
    assert rec["rank_features_onnx"]["max_abs_diff"] < 1e-5
    assert rec["num_features"] == LAYOUT.n_features
    # 2-thread timings are skipped when an earlier test (FAISS) capped OpenMP in this
    # process at one thread; the 1-thread ones choose the library and must be there.
    one = {"lightgbm_1thread_ms", "tl2cgen_1thread_ms", "tl2cgen_quantized_1thread_ms"}
    two = {"tl2cgen_2thread_ms", "tl2cgen_quantized_2thread_ms"}
    assert one <= set(rec["timings_ms"]) <= one | two
    assert rec["library_quantize"] in (0, 1)
    # whichever variant was installed, the final model.so still matches LightGBM
    check_ranker_parity(artifacts["booster"], artifacts["rows"], library=work / "model.so")


def test_export_writes_nothing_when_the_library_is_wrong(
    settings: Settings, artifacts: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    work = _work_dir(settings, artifacts["booster"])
    (work / "ranker_parity.json").write_text("{}")  # left by an export of an older ranker

    def stale_compile(model: object, libpath: Path, params: object, quantize: int) -> float:
        shutil.copy(artifacts["stale_library"], libpath)  # a build of another model
        return 0.0

    monkeypatch.setattr(ranker_export, "compile_library", stale_compile)
    with pytest.raises(RankerParityError):
        ranker_export.export(settings, PARAMS)
    assert not any((work / f).exists() for f in FINAL)
    assert not list(work.glob(".ranker_export*"))  # the staging folder is gone too


def _threshold_rows(model: object, base: np.ndarray) -> np.ndarray:
    """Rows that put one feature on each finite threshold's float32 neighbours: the
    values where rounding a float64 threshold to float32 can change a branch."""
    rows = []
    for i in range(model.num_tree):  # type: ignore[attr-defined]
        tree = model.get_tree_accessor(i)  # type: ignore[attr-defined]
        numerical = tree.get_field("node_type") == 1
        for f, t in zip(
            tree.get_field("split_index")[numerical],
            tree.get_field("threshold")[numerical],
            strict=True,
        ):
            if not np.isfinite(t) or abs(t) < 1e-30:  # LightGBM's zero sentinel: not ours
                continue
            t32 = np.float32(t)
            for v in (np.nextafter(t32, np.float32(-np.inf)), t32, np.nextafter(t32, np.inf)):
                row = base.copy()
                row[f] = v
                rows.append(row)
    return np.asarray(rows, dtype=np.float32)


def test_float32_checkpoint_keeps_every_decision(
    artifacts: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FIL computes with float32 parameters. The exported float32 checkpoint takes the
    same branch as LightGBM's float64 thresholds for every float32 row, also on the
    thresholds themselves; plain round-to-nearest (what FIL does to a float64 checkpoint)
    does not, and the gate's leaf check catches it."""
    import treelite

    booster = _booster(_rows(2000, 5), n_trees=40)
    model64 = treelite.frontend.from_lightgbm(booster)
    edge = _threshold_rows(model64, np.nan_to_num(artifacts["rows"][0]))
    model32 = ranker_export.float32_model(model64)
    assert (model32.input_type, model32.output_type) == ("float32", "float32")
    assert ranker_export.check_same_leaves(model64, model32, edge, Path("f32")) == len(edge) * 40
    tolerance = ranker_export.float32_tolerance(model32)
    got = treelite.gtil.predict(model32, edge, pred_margin=True).reshape(-1)
    want = booster.predict(edge, raw_score=True)
    assert np.max(np.abs(got - want)) < tolerance

    monkeypatch.setattr(ranker_export, "_round_threshold", lambda t, op: float(np.float32(t)))
    nearest = ranker_export.float32_model(model64)
    with pytest.raises(RankerParityError, match="decisions differ"):
        ranker_export.check_same_leaves(model64, nearest, edge, Path("nearest"))


def test_compiling_prints_no_treelite_version_notice(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """tl2cgen's bundled Treelite (4.1.2) tells on stderr that the checkpoint comes from a
    newer Treelite (4.8.1): harmless (ranker_export.TREELITE_NEWER_NOTICE) and dropped;
    what else the compile writes stays, and the library still scores like LightGBM."""
    import sys

    import treelite

    rows = _rows(200, 0)
    booster = _booster(rows, n_trees=3)
    model = treelite.frontend.from_lightgbm(booster)
    capfd.readouterr()
    ranker_export.compile_library(model, tmp_path / "lib.so", PARAMS, quantize=0)
    print("after the compile", file=sys.stderr)  # the stderr descriptor is ours again
    out, err = capfd.readouterr()
    assert "Treelite version" not in out + err, out + err
    assert err.endswith("after the compile\n")
    rec = check_ranker_parity(booster, _rows(50, 3), library=tmp_path / "lib.so")
    assert rec["library"]["max_abs_diff"] < 1e-5
