"""The repository check fails on every class of mismatch that NVIDIA's backends refuse
(issue 16's table), and passes what they load. Graphs are synthetic signatures built from
the committed configs, so no tensor list is repeated here."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from exporters.model_config import load_config
from exporters.repo_check import (
    GraphSignature,
    GraphTensor,
    check_repository,
    data_type_name,
    ensemble_errors,
    fil_errors,
    fixed_widths,
    graph_signature,
    onnxruntime_backend_errors,
    served_versions,
    shim_errors,
)
from exporters.triton_configs import pin_ensemble, production_config
from recstack.settings import PROJECT_ROOT

REPO = PROJECT_ROOT / "model_repository"
WIDTH = 7  # what an export fixes where the committed config leaves a width open


def _config(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def exported_graph(config: model_config_pb2.ModelConfig) -> GraphSignature:
    """The graph our exporters write for ``config``: the batch dim (max_batch_size > 0) or
    a leading -1 (the candidate axis) dynamic, every other -1 a fixed width."""

    def tensors(declared: object) -> dict[str, GraphTensor]:
        out = {}
        for t in declared:  # type: ignore[attr-defined]
            dims = [d if d != -1 or (i == 0 and config.max_batch_size == 0) else WIDTH
                    for i, d in enumerate(t.dims)]  # fmt: skip
            if config.max_batch_size > 0:
                dims = [-1, *dims]
            out[t.name] = GraphTensor(t.name, data_type_name(t.data_type), tuple(dims))
        return out

    return GraphSignature(tensors(config.input), tensors(config.output))


def native(model: str, graph: GraphSignature | None = None) -> model_config_pb2.ModelConfig:
    config = load_config(model, REPO)
    widths = fixed_widths(config, graph) if graph is not None else None
    return production_config(config, gpu=True, num_features=None, widths=widths)


def _replace(graph: GraphSignature, kind: str, name: str, **change: object) -> GraphSignature:
    tensors = dict(getattr(graph, kind))
    old = tensors[name]
    tensors[name] = GraphTensor(
        old.name, str(change.get("data_type", old.data_type)), change.get("dims", old.dims)
    )  # type: ignore[arg-type]
    other = "outputs" if kind == "inputs" else "inputs"
    return GraphSignature(**{kind: tensors, other: getattr(graph, other)})


# --- onnxruntime backend: the table ---------------------------------------------


def test_exported_graphs_pass_with_the_derived_production_configs() -> None:
    for model in ("user_tower", "item_tower", "rank_features"):
        graph = exported_graph(load_config(model, REPO))
        assert onnxruntime_backend_errors(native(model, graph), graph) == []
        assert shim_errors(load_config(model, REPO), graph) == []


def test_open_config_width_against_a_fixed_graph_width_fails() -> None:
    """rank_features: config [1,-1] vs graph [1,8]: "the model expects 2 dimensions (shape
    [1,8]) but the model configuration specifies ... [1,-1]". The embedded shim takes it."""
    config = load_config("rank_features", REPO)
    graph = exported_graph(config)
    open_inputs = [t.name for t in config.input if -1 in t.dims[1:]]
    open_outputs = [t.name for t in config.output if -1 in t.dims[1:]]
    assert open_inputs and open_outputs  # the committed config leaves widths open
    errors = onnxruntime_backend_errors(native("rank_features"), graph)
    for name in open_inputs + open_outputs:
        assert any(f"tensor '{name}': the model expects" in e for e in errors), name
    assert shim_errors(config, graph) == []


def test_symbolic_output_width_fails_the_exact_output_compare() -> None:
    """user_tower/item_tower: graph output ['batch', 'Div_dim_1'] is [-1,-1] to the
    backend; the config's [-1,64] must then fail (outputs compare exactly)."""
    for model in ("user_tower", "item_tower"):
        config = native(model)
        graph = exported_graph(config)
        (out,) = config.output
        bad = _replace(graph, "outputs", out.name, dims=(-1, -1))
        (error,) = onnxruntime_backend_errors(config, bad)
        assert f"tensor '{out.name}': the model expects 2 dimensions (shape [-1,-1])" in error
        # an input's symbolic dim is the model-side wildcard: accepted
        first = config.input[0]
        loose = _replace(graph, "inputs", first.name, dims=(-1,) * (len(first.dims) + 1))
        assert onnxruntime_backend_errors(config, loose) == []


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"dims": "fixed batch"}, "the first dimension must be -1"),
        ({"dims": "one more"}, "the model expects 3 dimensions"),
        ({"data_type": "TYPE_FP64"}, "model provides TYPE_FP64"),
        ({"drop": True}, "configuration expects 5 inputs, model provides 4|is not a model input"),
    ],
)
def test_batching_rank_dtype_and_missing_inputs_fail(change: dict, match: str) -> None:
    config = native("item_tower")
    graph = exported_graph(config)
    name = config.input[-1].name
    dims = graph.inputs[name].dims
    if change.get("drop"):
        inputs = {k: v for k, v in graph.inputs.items() if k != name}
        graph = GraphSignature(inputs, graph.outputs)
    elif change.get("dims") == "fixed batch":
        graph = _replace(graph, "inputs", name, dims=(1, *dims[1:]))
    elif change.get("dims") == "one more":
        graph = _replace(graph, "inputs", name, dims=(*dims, 1))
    else:
        graph = _replace(graph, "inputs", name, **change)
    errors = onnxruntime_backend_errors(config, graph)
    assert errors and any(re.search(match, e) for e in errors), errors


def test_graph_signature_reads_named_dynamic_axes_as_wildcards(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "width"])
    z = helper.make_tensor_value_info("z", TensorProto.INT64, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", None])
    w = helper.make_tensor_value_info("w", TensorProto.INT64, None)
    nodes = [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["z"], ["w"])]
    graph = helper.make_graph(nodes, "g", [x, z], [y, w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    sig = graph_signature(tmp_path / "m.onnx")
    assert sig.inputs["x"] == GraphTensor("x", "TYPE_FP32", (-1, -1))
    assert sig.inputs["z"] == GraphTensor("z", "TYPE_INT64", (1, 4))
    assert sig.outputs["y"].dims == (-1, -1)


# --- FIL ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import lightgbm as lgb
    import treelite

    from exporters.ranker_export import float32_model

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6)).astype(np.float32)
    booster = lgb.train(
        {"objective": "lambdarank", "num_leaves": 7, "verbose": -1},
        lgb.Dataset(x, rng.integers(0, 3, 400), group=[40] * 10),
        num_boost_round=5,
    )
    folder = tmp_path_factory.mktemp("fil")
    model64 = treelite.frontend.from_lightgbm(booster)
    model64.serialize(str(folder / "f64.tl"))
    float32_model(model64).serialize(str(folder / "f32.tl"))
    return {"float64": folder / "f64.tl", "float32": folder / "f32.tl"}


def _fil(width: int = 6, drop: str | None = None) -> model_config_pb2.ModelConfig:
    config = production_config(load_config("ranker", REPO), gpu=True, num_features=width)
    if drop:
        del config.parameters[drop]
    return config


def test_fil_config_and_float32_checkpoint_pass(checkpoints: dict[str, Path]) -> None:
    assert fil_errors(_fil(), checkpoints["float32"]) == []


@pytest.mark.parametrize(
    ("kwargs", "checkpoint", "match"),
    [
        ({"drop": "output_class"}, "float32", r"\['output_class'\] missing"),  # before 25.09
        ({"drop": "is_classifier"}, "float32", r"\['is_classifier'\] missing"),
        ({"width": 5}, "float32", "FIL needs"),
        ({}, "float64", "FIL rounds 64-bit parameters"),
    ],
)
def test_fil_mismatches_fail(
    checkpoints: dict[str, Path], kwargs: dict, checkpoint: str, match: str
) -> None:
    errors = fil_errors(_fil(**kwargs), checkpoints[checkpoint])
    assert any(re.search(match, e) for e in errors), errors


# --- versions and the ensemble -----------------------------------------------------------


def _ensemble_inputs() -> tuple[model_config_pb2.ModelConfig, dict]:
    ensemble = load_config("rank", REPO)
    steps = {s.model_name for s in ensemble.ensemble_scheduling.step}
    configs = {}
    for model in steps:
        config = load_config(model, REPO)
        if "compiled_artifact" in config.parameters:
            config = production_config(config, gpu=True, num_features=WIDTH)
        else:
            config = native(model, exported_graph(config))
        configs[model] = config
    return ensemble, configs


def test_ensemble_on_latest_with_two_versions_served_fails() -> None:
    """model_version -1 resolves to the latest: release-1 traffic would run release 2's
    steps."""
    ensemble, configs = _ensemble_inputs()
    served = {key: [1, 2] for key in configs}
    errors = ensemble_errors(ensemble, configs, served)
    assert len(errors) == len(configs) and all("model_version -1" in e for e in errors)
    one = {key: [1] for key in configs}
    assert ensemble_errors(ensemble, configs, one) == []
    assert ensemble_errors(pin_ensemble(ensemble, one), configs, one) == []


def test_ensemble_pinned_to_a_version_the_policy_does_not_serve_fails(tmp_path: Path) -> None:
    """No version_policy serves only the latest: a release pinned to an older version
    gets NOT_FOUND."""
    ensemble, configs = _ensemble_inputs()
    folder = tmp_path / "m"
    for v in (1, 2):
        (folder / str(v)).mkdir(parents=True)
    assert served_versions(model_config_pb2.ModelConfig(), folder) == [2]
    specific = model_config_pb2.ModelConfig()
    specific.version_policy.specific.versions[:] = [1, 2]
    assert served_versions(specific, folder) == [1, 2]
    pinned = pin_ensemble(ensemble, {key: [1] for key in configs})
    errors = ensemble_errors(pinned, configs, {key: [2] for key in configs})
    assert errors and all("is not served" in e for e in errors)


def test_ensemble_width_disagreement_fails() -> None:
    """A ranker that takes another width than the assembly produces."""
    ensemble, configs = _ensemble_inputs()
    one = {key: [1] for key in configs}
    fil = next(m for m, c in configs.items() if c.backend == "fil")
    ok = dict(configs)
    assembly_width = next(  # the step output feeding the ranker, as the export fixed it
        t.dims[-1] for m, c in configs.items() if m != fil for t in c.output
    )
    ok[fil] = production_config(load_config(fil, REPO), gpu=True, num_features=assembly_width)
    assert ensemble_errors(ensemble, ok, one) == []
    bad = dict(ok)
    bad[fil] = production_config(load_config(fil, REPO), gpu=True, num_features=assembly_width + 1)
    (error,) = ensemble_errors(ensemble, bad, one)
    assert "inconsistent shape" in error


def test_repository_walk_reports_missing_versions_and_names(tmp_path: Path) -> None:
    config = load_config("rank", REPO)
    config.version_policy.specific.versions[:] = [3]
    (tmp_path / "rank" / "1").mkdir(parents=True)
    (tmp_path / "rank" / "config.pbtxt").write_text(text_format.MessageToString(config))
    errors = check_repository(tmp_path)
    assert any("names versions [3] with no folder" in e for e in errors)
    assert any("step model" in e and "not in the repository" in e for e in errors)


@pytest.mark.slow
def test_the_trained_release_makes_loadable_repositories(trained_settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The real exporters' artifacts (towers with F.normalize, the feature assembly, the
    float32 ranker) of the pipeline's release: the production repository written for it
    passes every backend rule, and so does the embedded repository as the release loads it."""
    from exporters import release
    from exporters.triton_configs import write_configs

    out = tmp_path / "production"
    write_configs(trained_settings, "production", out)  # raises on any problem
    assert check_repository(out) == []
    rank_features = load_config_from(out / "rank_features" / "config.pbtxt")
    assert all(-1 not in list(t.dims)[1:] for t in rank_features.input)  # widths filled
    versions = release.model_versions(trained_settings)
    pinned = {m: [v] for m, v in versions.items()}
    assert check_repository(trained_settings.model_repository, pinned) == []


def load_config_from(path: Path) -> model_config_pb2.ModelConfig:
    return _config(path.read_text())


def test_an_empty_or_missing_folder_is_not_loadable(tmp_path: Path) -> None:
    from exporters.repo_check import check_repository

    (tmp_path / "empty").mkdir()
    assert check_repository(tmp_path / "empty") == [
        f"{tmp_path / 'empty'}: no model folder with a config.pbtxt (prepare it: "
        "`recstack repo init`)"
    ]
    assert check_repository(tmp_path / "absent") == [f"{tmp_path / 'absent'}: no such folder"]
