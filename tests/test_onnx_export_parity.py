"""ONNX export of the towers: names from config.pbtxt, dynamic batch, parity that can fail."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from _two_tower_fixtures import Trained, build_trained
from onnx import numpy_helper

from exporters import onnx_export
from exporters.model_config import input_names, output_names
from exporters.onnx_export import (
    ARTIFACTS,
    ParityError,
    check_parity,
    random_rows,
    run_onnx,
    tower_module,
)
from recstack.settings import Settings


@pytest.fixture(scope="module")
def trained(small_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return build_trained(small_settings, tmp_path_factory)


def _tamper(src: Path, dst: Path, scale: float = 1e-2) -> None:
    """Copy of ``src`` with every float initializer nudged (a corrupted artifact)."""
    model = onnx.load(str(src))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.size > 1:
            w = w + rng.normal(0.0, scale, w.shape).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(dst))


@pytest.mark.parametrize("tower", ["user_tower", "item_tower"])
def test_names_and_dynamic_batch(trained: Trained, tower: str) -> None:
    s = trained.settings
    path = s.work_dir / ARTIFACTS[tower]
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == input_names(tower, s.model_repository)
    assert [o.name for o in model.graph.output] == output_names(tower, s.model_repository)
    for b in (1, 512):
        rows = random_rows(tower, trained.model, s.model_repository, b, seed=b)
        out = run_onnx(path, rows)
        assert out.shape == (b, 64) and out.dtype == np.float32
        assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_parity_report_written(trained: Trained) -> None:
    report = json.loads((trained.settings.work_dir / onnx_export.PARITY_FILE).read_text())
    for tower in onnx_export.TOWERS:
        assert report[tower]["max_abs_diff"] < 1e-4
        cases = report[tower]["cases"]
        assert {"real_batch1", "random_batch1", "random_batch512"} <= set(cases)


@pytest.mark.parametrize("tower", ["user_tower", "item_tower"])
def test_parity_fails_on_tampered_artifact(trained: Trained, tower: str, tmp_path: Path) -> None:
    s = trained.settings
    module = tower_module(trained.model, tower)
    rows = random_rows(tower, trained.model, s.model_repository, 64, seed=1)
    good = s.work_dir / ARTIFACTS[tower]
    assert check_parity(good, module, rows) < 1e-4
    bad = tmp_path / "tampered.onnx"
    _tamper(good, bad)
    with pytest.raises(ParityError, match="max abs diff"):
        check_parity(bad, module, rows)


def test_failed_parity_writes_nothing(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken exporter (here: one that corrupts its output) makes the step fail and
    leaves the work directory as it was."""
    s = trained.settings
    work = s.work_dir
    before = {p.name: p.stat().st_mtime_ns for p in work.iterdir()}
    real_export = onnx_export.export_onnx

    def corrupting_export(module, tower, repository, path):  # type: ignore[no-untyped-def]
        real_export(module, tower, repository, path)
        if tower == "item_tower":
            _tamper(path, path)

    monkeypatch.setattr(onnx_export, "export_onnx", corrupting_export)
    with pytest.raises(ParityError, match="item_tower"):
        onnx_export.export_towers(s)
    after = {p.name: p.stat().st_mtime_ns for p in work.iterdir()}
    assert after == before


def test_dynamo_exporter_also_passes_parity(trained: Trained, tmp_path: Path) -> None:
    """The torch.export path stays a working alternative to the legacy default."""
    s = trained.settings
    module = tower_module(trained.model, "item_tower")
    path = tmp_path / "item_tower_dynamo.onnx"
    onnx_export.export_onnx(module, "item_tower", s.model_repository, path, dynamo=True)
    for b in (1, 512):
        rows = random_rows("item_tower", trained.model, s.model_repository, b, seed=b)
        assert check_parity(path, module, rows) < 1e-4
