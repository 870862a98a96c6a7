"""Tiny real artifacts for the Triton tests, built here so the tests do not depend on the
training pipeline: two towers and a feature assembly exported from small torch modules to
ONNX with the tensor names of config.pbtxt, and a LightGBM lambdarank ranker exported to a
Treelite checkpoint plus a tl2cgen-compiled library."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exporters.model_config import input_names, load_config, output_names
from exporters.model_repo import publish_version
from exporters.onnx_export import declare_config_dims
from exporters.ranker_export import float32_model
from recstack.settings import PROJECT_ROOT, Settings

EMB = 64
N_USERS, N_ITEMS, N_AGE, N_COUNTRY, N_CAT, N_BRAND = 100, 300, 6, 5, 5, 7
RECENT = 20
USER_FEATS, ITEM_FEATS = 3, 4
# rank_input = user features, affinity of the item's category, user·item dot, item
# features, item age in days.
RANK_FEATURES = USER_FEATS + 1 + 1 + ITEM_FEATS + 1


@dataclass(frozen=True)
class Artifacts:
    folder: Path
    user_tower: Path
    item_tower: Path
    rank_features: Path
    checkpoint: Path
    library: Path
    booster_file: Path


def _towers(torch):  # type: ignore[no-untyped-def]
    nn = torch.nn

    class UserTower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.user = nn.Embedding(N_USERS, EMB)
            self.age = nn.Embedding(N_AGE, EMB)
            self.country = nn.Embedding(N_COUNTRY, EMB)
            self.items = nn.Embedding(N_ITEMS, EMB)
            self.out = nn.Linear(EMB, EMB)

        def forward(self, user_id, age_bucket, country, recent_items):  # type: ignore[no-untyped-def]
            h = (
                self.user(user_id[:, 0])
                + self.age(age_bucket[:, 0])
                + self.country(country[:, 0])
                + self.items(recent_items).mean(dim=1)
            )
            return torch.nn.functional.normalize(self.out(torch.tanh(h)), dim=1)

    class ItemTower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.item = nn.Embedding(N_ITEMS, EMB)
            self.cat = nn.Embedding(N_CAT, EMB)
            self.brand = nn.Embedding(N_BRAND, EMB)
            self.num = nn.Linear(2, EMB)

        def forward(self, item_id, category, brand, price, age_days):  # type: ignore[no-untyped-def]
            h = self.item(item_id[:, 0]) + self.cat(category[:, 0]) + self.brand(brand[:, 0])
            h = h + self.num(torch.cat([torch.log1p(price), age_days / 365.0], dim=1))
            return torch.nn.functional.normalize(h, dim=1)

    class RankFeatures(nn.Module):
        def forward(  # type: ignore[no-untyped-def]
            self,
            user_features,
            user_category_affinity,
            user_embedding,
            item_features,
            item_category,
            item_created_at,
            item_embedding,
            request_time,
        ):
            n = item_features.shape[0]
            user = user_features.expand(n, -1)
            affinity = user_category_affinity[0].index_select(0, item_category).unsqueeze(1)
            dot = (item_embedding * user_embedding).sum(dim=1, keepdim=True)
            age = ((request_time - item_created_at) / 86400.0).to(torch.float32).unsqueeze(1)
            return torch.cat([user, affinity, dot, item_features, age], dim=1)

    return UserTower(), ItemTower(), RankFeatures()


def assemble(inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The same feature assembly as RankFeatures, as numpy code (the in-process path)."""
    n = inputs["item_features"].shape[0]
    user = np.broadcast_to(inputs["user_features"], (n, USER_FEATS))
    affinity = inputs["user_category_affinity"][0][inputs["item_category"]][:, None]
    dot = (inputs["item_embedding"] * inputs["user_embedding"]).sum(axis=1, keepdims=True)
    age = ((inputs["request_time"] - inputs["item_created_at"]) / 86400.0).astype(np.float32)
    return np.concatenate(
        [user, affinity, dot, inputs["item_features"], age[:, None]], axis=1, dtype=np.float32
    )


def user_inputs(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "user_id": rng.integers(0, N_USERS, (batch, 1)),
        "age_bucket": rng.integers(0, N_AGE, (batch, 1)),
        "country": rng.integers(0, N_COUNTRY, (batch, 1)),
        "recent_items": rng.integers(0, N_ITEMS, (batch, RECENT)),
    }


def item_inputs(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "item_id": rng.integers(0, N_ITEMS, (batch, 1)),
        "category": rng.integers(0, N_CAT, (batch, 1)),
        "brand": rng.integers(0, N_BRAND, (batch, 1)),
        "price": rng.uniform(1, 100, (batch, 1)).astype(np.float32),
        "age_days": rng.uniform(0, 400, (batch, 1)).astype(np.float32),
    }


def rank_inputs(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    now = 1.76e9
    return {
        "user_features": rng.normal(size=(1, USER_FEATS)).astype(np.float32),
        "user_category_affinity": rng.uniform(size=(1, N_CAT)).astype(np.float32),
        "user_embedding": rng.normal(size=(1, EMB)).astype(np.float32),
        "item_features": rng.normal(size=(n, ITEM_FEATS)).astype(np.float32),
        "item_category": rng.integers(0, N_CAT, n),
        "item_created_at": now - rng.uniform(0, 90 * 86400, n),
        "item_embedding": rng.normal(size=(n, EMB)).astype(np.float32),
        "request_time": np.array([now]),
    }


def export_user_tower(path: Path, seed: int) -> Path:
    """Just the user tower, with weights from ``seed`` (a second version for tests)."""
    import torch

    torch.manual_seed(seed)
    user, _, _ = _towers(torch)
    _export(torch, "user_tower", user, user_inputs(2), path)
    return path


def _export(torch, model: str, module, sample: dict[str, np.ndarray], path: Path) -> None:  # type: ignore[no-untyped-def]
    names = input_names(model)
    torch.onnx.export(
        module.eval(),
        tuple(torch.from_numpy(sample[n]) for n in names),
        str(path),
        input_names=names,
        output_names=output_names(model),
        dynamic_axes={n: {0: "batch"} for n in names + output_names(model)},
        dynamo=False,
    )
    declare_config_dims(path, model, PROJECT_ROOT / "model_repository")  # as the exporter does


def build_artifacts(folder: Path, seed: int = 0) -> Artifacts:
    """Export the tiny towers, assembly and ranker into ``folder``."""
    import lightgbm as lgb
    import tl2cgen
    import torch
    import treelite

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    user, item, assembly = _towers(torch)
    paths = {}
    for model, module, sample in (
        ("user_tower", user, user_inputs(2)),
        ("item_tower", item, item_inputs(2)),
    ):
        path = folder / f"{model}.onnx"
        _export(torch, model, module, sample, path)
        paths[model] = path
    sample = rank_inputs(3)
    names = input_names("rank_features")
    path = folder / "rank_features.onnx"
    torch.onnx.export(
        assembly,
        tuple(torch.from_numpy(sample[n]) for n in names),
        str(path),
        input_names=names,
        output_names=output_names("rank_features"),
        # Widths are fixed by the export (as the real exporter's are); N, the leading -1
        # of config.pbtxt, is dynamic.
        dynamic_axes={
            t.name: {0: "n"}
            for t in (*load_config("rank_features").input, *load_config("rank_features").output)
            if list(t.dims[:1]) == [-1]
        },
        dynamo=False,
    )
    paths["rank_features"] = path

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2000, RANK_FEATURES))
    y = np.clip((x[:, 0] + x[:, 4] + rng.normal(size=2000) * 0.5) * 1.5 + 2, 0, 4).astype(int)
    booster = lgb.train(
        {"objective": "lambdarank", "num_leaves": 15, "verbose": -1, "seed": seed},
        lgb.Dataset(x, y, group=[50] * 40),
        num_boost_round=30,
    )
    booster_file = folder / "ranker.txt"
    booster.save_model(str(booster_file))
    # The float32 checkpoint the export ships (FIL computes in float32).
    tl_model = float32_model(treelite.frontend.from_lightgbm(booster))
    checkpoint = folder / "checkpoint.tl"
    tl_model.serialize(str(checkpoint))
    library = folder / "model.so"
    tl2cgen.export_lib(tl_model, toolchain="gcc", libpath=str(library), params={})
    return Artifacts(
        folder,
        paths["user_tower"],
        paths["item_tower"],
        paths["rank_features"],
        checkpoint,
        library,
        booster_file,
    )


def publish_all(settings: Settings, art: Artifacts) -> dict[str, int]:
    """Publish one version of every model (the ensemble's folder is empty)."""
    return {
        "user_tower": publish_version(settings, "user_tower", {"model.onnx": art.user_tower}),
        "item_tower": publish_version(settings, "item_tower", {"model.onnx": art.item_tower}),
        "rank_features": publish_version(
            settings, "rank_features", {"model.onnx": art.rank_features}
        ),
        "ranker": publish_version(
            settings, "ranker", {"checkpoint.tl": art.checkpoint, "model.so": art.library}
        ),
        "rank": publish_version(settings, "rank", {}),
    }


_shared: dict[str, Artifacts] = {}


def shared_artifacts(factory) -> Artifacts:  # type: ignore[no-untyped-def]
    """Build the artifacts once per test session (``factory``: tmp_path_factory)."""
    if "art" not in _shared:
        _shared["art"] = build_artifacts(factory.mktemp("triton_artifacts"))
    return _shared["art"]
