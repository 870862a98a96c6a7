"""Publishing model versions (stage, validate, rename) and the two config runtimes."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
from _triton_fixtures import (
    EMB,
    ITEM_FEATS,
    RANK_FEATURES,
    USER_FEATS,
    Artifacts,
    publish_all,
    shared_artifacts,
)
from conftest import make_settings
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from exporters.model_config import load_config
from exporters.model_repo import list_versions, next_version, publish_version
from exporters.repo_check import check_repository
from exporters.triton_configs import write_configs
from recstack.errors import UserError
from recstack.settings import PROJECT_ROOT, Settings


@pytest.fixture
def art(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    return shared_artifacts(tmp_path_factory)


def _version_dirs(settings: Settings) -> list[Path]:
    return sorted(p for p in settings.model_repository.glob("*/[0-9]*"))


def test_publish_versions_and_files(settings: Settings, art: Artifacts) -> None:
    assert next_version(settings, "user_tower") == 1
    versions = publish_all(settings, art)
    assert versions == dict.fromkeys(versions, 1)
    assert publish_version(settings, "user_tower", {"model.onnx": art.user_tower}) == 2
    assert list_versions(settings, "user_tower") == [1, 2]
    repo = settings.model_repository
    assert sorted(p.name for p in (repo / "user_tower" / "2").iterdir()) == [
        "model.onnx",
        "onnx_model.py",
    ]
    assert sorted(p.name for p in (repo / "ranker" / "1").iterdir()) == [
        "checkpoint.tl",
        "model.so",
        "treelite_model.py",
    ]
    assert list((repo / "rank" / "1").iterdir()) == []
    assert not list((settings.releases_dir / ".staging").iterdir())
    with pytest.raises(UserError, match="already exists"):
        publish_version(settings, "user_tower", {"model.onnx": art.user_tower}, version=2)


@pytest.mark.parametrize(
    ("model", "files", "match"),
    [
        ("user_tower", {"model.onnx": "item_tower"}, "config inputs .* != graph inputs"),
        ("user_tower", {}, "missing artifact"),
        ("user_tower", {"model.onnx": "garbage"}, "does not load in onnxruntime"),
        ("ranker", {"checkpoint.tl": "garbage", "model.so": "library"}, "not a Treelite"),
        ("ranker", {"checkpoint.tl": "checkpoint", "model.so": "garbage"}, "does not load"),
        ("rank", {"model.onnx": "user_tower"}, "must be empty"),
    ],
)
def test_failed_validation_changes_nothing(
    settings: Settings, art: Artifacts, tmp_path: Path, model: str, files: dict, match: str
) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00not a model" * 10)
    sources = {
        "item_tower": art.item_tower,
        "user_tower": art.user_tower,
        "garbage": garbage,
        "library": art.library,
        "checkpoint": art.checkpoint,
    }
    before = _version_dirs(settings)
    with pytest.raises(UserError, match=match):
        publish_version(settings, model, {k: sources[v] for k, v in files.items()})
    assert _version_dirs(settings) == before
    staging = settings.releases_dir / ".staging"
    assert not staging.exists() or not list(staging.iterdir())


def test_onnx_dtype_mismatch_is_rejected(settings: Settings, tmp_path: Path) -> None:
    import torch

    class Wrong(torch.nn.Module):
        def forward(self, user_id, age_bucket, country, recent_items):  # type: ignore[no-untyped-def]
            x = user_id.float() + age_bucket + country + recent_items.float().sum(1, keepdim=True)
            return x.double().expand(-1, 64)  # FP64 where the config says FP32

    path = tmp_path / "wrong.onnx"
    sample = tuple(torch.zeros((1, d), dtype=torch.int64) for d in (1, 1, 1, 20))
    torch.onnx.export(
        Wrong(), sample, str(path), dynamo=False,
        input_names=["user_id", "age_bucket", "country", "recent_items"],
        output_names=["user_embedding"],
    )  # fmt: skip
    with pytest.raises(UserError, match="'user_embedding' is TYPE_FP64 in the graph"):
        publish_version(settings, "user_tower", {"model.onnx": path})
    assert list_versions(settings, "user_tower") == []


def _release(settings: Settings, release_id: int, versions: dict[str, int]) -> None:
    """A release manifest naming ``versions`` (all the production configs read of it)."""
    folder = settings.releases_dir / str(release_id)
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"models": versions}))


def test_production_configs_parse_and_name_existing_artifacts(
    settings: Settings, art: Artifacts, tmp_path: Path
) -> None:
    _release(settings, 1, publish_all(settings, art))
    out = tmp_path / "production"
    written = write_configs(settings, "production", out)
    assert len(written) == 5
    configs = {}
    for path in written:
        text = path.read_text()
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
        configs[config.name] = config
        embedded = load_config(config.name, settings.model_repository)
        # tensor contract unchanged (open widths become the artifacts')
        assert [t.name for t in config.input] == [t.name for t in embedded.input]
        assert [t.data_type for t in config.output] == [t.data_type for t in embedded.output]
        assert "python" not in text and "artifact" not in text
        assert list(config.version_policy.specific.versions) == [1]
        if config.platform != "ensemble":
            folder = out / config.name / "1"
            assert (folder / config.default_model_filename).is_file()
            assert [f.name for f in folder.iterdir()] == [config.default_model_filename]
            assert all(g.kind == g.KIND_GPU for g in config.instance_group)
    for model in ("user_tower", "item_tower", "rank_features"):
        assert configs[model].platform == "onnxruntime_onnx"
        assert configs[model].default_model_filename == "model.onnx"
    # The graphs' fixed widths replace the committed -1s (onnxruntime_backend compares a
    # fixed model dim with the config's exactly); the candidate axis stays -1.
    dims = {t.name: list(t.dims) for t in (*configs["rank_features"].input,
                                            *configs["rank_features"].output)}  # fmt: skip
    assert dims["user_features"] == [1, USER_FEATS]
    assert dims["item_features"] == [-1, ITEM_FEATS]
    assert dims["rank_input"] == [-1, RANK_FEATURES]
    assert [list(t.dims) for t in configs["user_tower"].output] == [[EMB]]
    ranker = configs["ranker"]
    assert ranker.backend == "fil"
    params = {k: v.string_value for k, v in ranker.parameters.items()}
    # spelled out, not the module's constant: FIL before 25.09 needs output_class, 25.09+
    # is_classifier (or output_class); a ranker is no classifier.
    assert params["model_type"] == "treelite_checkpoint"
    assert params["output_class"] == params["is_classifier"] == "false"
    assert list(ranker.input[0].dims) == [RANK_FEATURES]
    assert ranker.default_model_filename == "checkpoint.tl"
    steps = {s.model_name: s.model_version for s in configs["rank"].ensemble_scheduling.step}
    assert steps == {"rank_features": 1, "ranker": 1}
    assert check_repository(out) == []
    cpu = write_configs(settings, "production", tmp_path / "cpu", gpu=False)
    text = "".join(p.read_text() for p in cpu)
    assert "KIND_GPU" not in text


def test_production_repository_per_release(
    settings: Settings, art: Artifacts, tmp_path: Path
) -> None:
    """Two releases: each repository serves and pins its own versions; one repository
    for both cannot pin the ensemble's steps and says so."""
    first = publish_all(settings, art)
    _release(settings, 1, first)
    second = {m: publish_version(settings, m, files) for m, files in (
        ("rank_features", {"model.onnx": art.rank_features}),
        ("ranker", {"checkpoint.tl": art.checkpoint, "model.so": art.library}),
        ("rank", {}),
    )}  # fmt: skip
    _release(settings, 2, first | second)
    for rid, version in ((1, 1), (2, 2)):
        out = tmp_path / f"r{rid}"
        write_configs(settings, "production", out, releases=[rid])
        rank = text_format.Parse((out / "rank" / "config.pbtxt").read_text(),
                                 model_config_pb2.ModelConfig())  # fmt: skip
        assert {s.model_version for s in rank.ensemble_scheduling.step} == {version}
        assert list(rank.version_policy.specific.versions) == [version]
        assert sorted(p.name for p in (out / "ranker").iterdir()) == [str(version), "config.pbtxt"]
    with pytest.raises(UserError, match="one version per step"):
        write_configs(settings, "production", tmp_path / "both", releases=[1, 2])


def test_production_needs_a_release_and_another_folder(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no release"):
        write_configs(settings, "production", tmp_path / "out")
    with pytest.raises(UserError, match="--out"):
        write_configs(settings, "production")


def test_embedded_configs_in_place_and_gpu(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, device="cpu")
    committed = {m: (PROJECT_ROOT / "model_repository" / m / "config.pbtxt") for m in
                 ("user_tower", "ranker", "rank")}  # fmt: skip
    write_configs(settings, "embedded")
    for model, source in committed.items():
        assert (
            settings.model_repository / model / "config.pbtxt"
        ).read_text() == source.read_text()
    out = tmp_path / "gpu"
    write_configs(settings, "embedded", out, gpu=True)
    assert "KIND_GPU" in (out / "user_tower" / "config.pbtxt").read_text()
    assert "KIND_CPU" in (out / "ranker" / "config.pbtxt").read_text()  # tl2cgen: CPU only
    assert (out / "_shims" / "onnx_model.py").is_file()


def _load_shim(name: str) -> types.ModuleType:
    """Import a shim outside Triton with a stand-in for triton_python_backend_utils."""
    fake = types.ModuleType("triton_python_backend_utils")
    sys.modules.setdefault("triton_python_backend_utils", fake)
    path = PROJECT_ROOT / "model_repository" / "_shims" / name
    spec = importlib.util.spec_from_file_location(f"shim_{path.stem}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_onnx_shim_provider_choice() -> None:
    shim = _load_shim("onnx_model.py")
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert shim.choose_providers("GPU", 1, cuda)[0] == ("CUDAExecutionProvider", {"device_id": 1})
    assert shim.choose_providers("CPU", 0, cuda) == ["CPUExecutionProvider"]
    # a GPU instance without onnxruntime-gpu falls back to the CPU
    assert shim.choose_providers("GPU", 0, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_shims_are_copied_verbatim(settings: Settings, art: Artifacts) -> None:
    publish_all(settings, art)
    for model, shim in (("user_tower", "onnx_model.py"), ("ranker", "treelite_model.py")):
        copied = settings.model_repository / model / "1" / shim
        source = PROJECT_ROOT / "model_repository" / "_shims" / shim
        assert copied.read_bytes() == source.read_bytes()


def test_repo_check_cli_fails_on_a_broken_production_repository(
    settings: Settings,
    art: Artifacts,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from exporters import triton_configs
    from recstack.cli import main

    _release(settings, 1, publish_all(settings, art))
    monkeypatch.setattr(triton_configs, "get_settings", lambda: settings)
    assert main(["repo", "check"]) == 0  # the embedded repository, as release 1 loads it
    out = tmp_path / "production"
    write_configs(settings, "production", out)
    assert main(["repo", "check", str(out)]) == 0
    assert "loadable" in capsys.readouterr().out
    # Hand edits that NVIDIA's container would refuse: a FIL config without output_class
    # (required before 25.09) and a tower whose output width is left open.
    ranker = out / "ranker" / "config.pbtxt"
    ranker.write_text(ranker.read_text().replace('key: "output_class"', 'key: "unused"'))
    tower = out / "user_tower" / "config.pbtxt"
    tower.write_text(tower.read_text().replace(f"dims: {EMB}", "dims: -1"))
    assert main(["repo", "check", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "['output_class'] missing" in printed
    assert "tensor 'user_embedding': the model expects" in printed
