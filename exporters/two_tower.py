"""Two-tower retrieval model: PyTorch towers and their training (pipeline step ``two_tower``).

User tower: hashed user-id embedding, age-bucket and country embeddings, and the masked
mean of the item-id embeddings of the user's recent items (shared with the item tower, so
history and catalog live in one space). Item tower: hashed item-id embedding, category and
brand embeddings, log price and log age (days since ``created_at`` at the event time).
Both end in a small MLP and an L2 normalisation to ``OUT_DIM``.

Ids are hashed inside the model (``id mod buckets``), so the ONNX graph needs no vocabulary
file and unseen ids still produce an embedding. Categorical codes outside the training
vocabulary map to one shared "unknown" row.

Training: positives are clicks and purchases of the train split; in-batch sampled softmax
with a popularity logQ correction (the logit of in-batch item j is reduced by log q_j, its
share of training positives, because popular items appear as negatives more often than
uniform sampling would give) and a temperature.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from exporters.history import HISTORY_EVENTS, HISTORY_LEN, PAD, recent_items_table
from exporters.model_config import load_config
from exporters.raw_tables import RawTables, read_raw
from exporters.split import load_split
from exporters.tower_inputs import (
    history_before,
    item_inputs,
    take,
    user_inputs,
    vocab_sizes,
)
from recstack.atomic_files import write_json_atomic
from recstack.errors import UserError
from recstack.settings import Settings

log = logging.getLogger(__name__)

CHECKPOINT = "two_tower.pt"


@dataclass(frozen=True)
class HParams:
    """Every hyper-parameter of the towers and their training, in one place."""

    id_dim: int = 32
    cat_dim: int = 16
    demo_dim: int = 8
    hidden: int = 128
    out_dim: int = 64
    temperature: float = 0.05
    lr: float = 3e-3
    # Regularisation for sparse data: decoupled weight decay on the dense layers, dropout
    # before each tower's MLP, and an L2 penalty on the id-embedding rows a batch uses
    # (SparseAdam has no weight decay of its own).
    weight_decay: float = 1e-4
    dropout: float = 0.1
    id_l2: float = 1e-6
    batch_size: int = 1024
    # Early stopping: at most ``epochs``; stop when the validation loss has not improved
    # for ``patience`` epochs and keep the best epoch's weights.
    epochs: int = 12
    patience: int = 2
    # Validation loss above this × training loss (at the best epoch) is reported as
    # over-fitting.
    overfit_ratio: float = 1.5
    # Hash buckets for ids: the id range when it is smaller (no collisions), else this cap.
    max_id_buckets: int = 1 << 18
    # Cap on training examples (most recent kept); None = all train positives.
    max_examples: int | None = None
    # torch CPU threads while training. Measured here (2 shared cores, batch 1024): one
    # thread 0.07 s CPU per step, two threads 0.40 s (OpenMP spinning under contention).
    cpu_threads: int = 1


@dataclass
class Vocab:
    """Sizes the towers are built with (saved beside the weights)."""

    user_buckets: int
    item_buckets: int
    age_bucket: int
    country: int
    category: int
    brand: int

    @classmethod
    def from_tables(cls, tables: RawTables, hp: HParams) -> Vocab:
        v = vocab_sizes(tables)
        max_user = max(v["max_user_id"], int(tables.interactions["user_id"].max()))
        return cls(
            user_buckets=min(max_user + 1, hp.max_id_buckets),
            item_buckets=min(v["max_item_id"] + 1, hp.max_id_buckets),
            age_bucket=v["age_bucket"],
            country=v["country"],
            category=v["category"],
            brand=v["brand"],
        )


class CodeEmbedding(nn.Module):
    """Embedding of a small categorical code; codes outside ``[0, vocab)`` share one row."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.emb = nn.Embedding(vocab + 1, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.where((x >= 0) & (x < self.vocab), x, torch.full_like(x, self.vocab))
        return self.emb(x)


class HashEmbedding(nn.Module):
    """Embedding of an arbitrary int64 id through ``id mod buckets`` (no vocabulary)."""

    def __init__(self, buckets: int, dim: int) -> None:
        super().__init__()
        self.buckets = buckets
        # Sparse gradients: a step touches ~batch rows of a table that can hold 2^18.
        self.emb = nn.Embedding(buckets, dim, sparse=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(torch.remainder(x, self.buckets))


def _mlp(d_in: int, hidden: int, d_out: int, dropout: float = 0.0) -> nn.Sequential:
    # Dropout is the identity in eval mode, so the exported ONNX graph has none.
    return nn.Sequential(
        nn.Dropout(dropout), nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out)
    )


class ItemTower(nn.Module):
    """``(item_id, category, brand, price, age_days)`` each ``[B, 1]`` → ``[B, out_dim]``."""

    num_mean: torch.Tensor  # buffers (register_buffer below), typed for the checker
    num_std: torch.Tensor

    def __init__(self, vocab: Vocab, hp: HParams, item_ids: HashEmbedding) -> None:
        super().__init__()
        self.item_ids = item_ids
        self.category = CodeEmbedding(vocab.category, hp.cat_dim)
        self.brand = CodeEmbedding(vocab.brand, hp.cat_dim)
        # log1p(price), log1p(age_days) standardised with training statistics.
        self.register_buffer("num_mean", torch.zeros(2))
        self.register_buffer("num_std", torch.ones(2))
        self.mlp = _mlp(hp.id_dim + 2 * hp.cat_dim + 2, hp.hidden, hp.out_dim, hp.dropout)

    def numeric(self, price: torch.Tensor, age_days: torch.Tensor) -> torch.Tensor:
        x = torch.cat([price, age_days], dim=1).clamp(min=0.0)
        return (torch.log1p(x) - self.num_mean) / self.num_std

    def forward(
        self,
        item_id: torch.Tensor,
        category: torch.Tensor,
        brand: torch.Tensor,
        price: torch.Tensor,
        age_days: torch.Tensor,
    ) -> torch.Tensor:
        x = torch.cat(
            [
                self.item_ids(item_id[:, 0]),
                self.category(category[:, 0]),
                self.brand(brand[:, 0]),
                self.numeric(price, age_days),
            ],
            dim=1,
        )
        return F.normalize(self.mlp(x), dim=1)


class UserTower(nn.Module):
    """``(user_id, age_bucket, country)`` each ``[B, 1]`` and ``recent_items [B, H]``
    → ``[B, out_dim]``; PAD entries of ``recent_items`` are masked out of the mean."""

    def __init__(self, vocab: Vocab, hp: HParams, item_ids: HashEmbedding) -> None:
        super().__init__()
        self.user_ids = HashEmbedding(vocab.user_buckets, hp.id_dim)
        self.age_bucket = CodeEmbedding(vocab.age_bucket, hp.demo_dim)
        self.country = CodeEmbedding(vocab.country, hp.demo_dim)
        self.item_ids = item_ids
        self.mlp = _mlp(2 * hp.id_dim + 2 * hp.demo_dim, hp.hidden, hp.out_dim, hp.dropout)

    def forward(
        self,
        user_id: torch.Tensor,
        age_bucket: torch.Tensor,
        country: torch.Tensor,
        recent_items: torch.Tensor,
    ) -> torch.Tensor:
        mask = (recent_items != PAD).to(torch.float32).unsqueeze(-1)
        hist = (self.item_ids(recent_items) * mask).sum(dim=1)
        hist = hist / mask.sum(dim=1).clamp(min=1.0)
        x = torch.cat(
            [
                self.user_ids(user_id[:, 0]),
                self.age_bucket(age_bucket[:, 0]),
                self.country(country[:, 0]),
                hist,
            ],
            dim=1,
        )
        return F.normalize(self.mlp(x), dim=1)


class TwoTower(nn.Module):
    """Both towers; the item-id embedding is shared between them."""

    def __init__(self, vocab: Vocab, hp: HParams) -> None:
        super().__init__()
        self.vocab = vocab
        self.hp = hp
        item_ids = HashEmbedding(vocab.item_buckets, hp.id_dim)
        self.item = ItemTower(vocab, hp, item_ids)
        self.user = UserTower(vocab, hp, item_ids)


class Optimizer:
    """SparseAdam for the hashed id tables (sparse gradients), Adam for the rest."""

    def __init__(self, model: TwoTower, hp: HParams) -> None:
        sparse = [
            p for m in model.modules() if isinstance(m, HashEmbedding) for p in m.parameters()
        ]
        ids = {id(p) for p in sparse}
        dense = [p for p in model.parameters() if id(p) not in ids]
        self.opts = [
            torch.optim.SparseAdam(sparse, lr=hp.lr),
            torch.optim.AdamW(dense, lr=hp.lr, weight_decay=hp.weight_decay),
        ]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.opts:
            o.step()


@dataclass
class Examples:
    """Aligned training rows: example i is (user side i, item side i)."""

    users: dict[str, np.ndarray]
    items: dict[str, np.ndarray]
    log_q: np.ndarray  # log sampling probability of each row's item (logQ correction)

    def __len__(self) -> int:
        return len(self.log_q)


@dataclass
class TrainResult:
    """What ``train`` measured (also saved in the checkpoint)."""

    train_loss: float
    val_loss: float | None
    seconds: float
    cpu_seconds: float  # process CPU time: comparable across runs on a shared machine
    n_train: int
    n_val: int
    epoch_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    best_epoch: int = 0  # 1-based; the weights kept
    warnings: list[str] = field(default_factory=list)


def resolve_device(settings: Settings) -> torch.device:
    """CUDA when asked for or available (``auto``), else CPU."""
    if settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("settings.device is 'cuda' but torch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def positive_events(interactions: pd.DataFrame) -> pd.DataFrame:
    """Clicks and purchases: the training positives (same events as the history)."""
    return interactions[interactions["event"].isin(HISTORY_EVENTS)]


def build_examples(
    tables: RawTables,
    positives: pd.DataFrame,
    history: pd.DataFrame,
    item_counts: pd.Series,
    n_train_positives: int,
) -> Examples:
    """Tower inputs for each positive event; the user's history is taken strictly before
    the event and the item's age at the event time."""
    uid = positives["user_id"].to_numpy(np.int64)
    iid = positives["item_id"].to_numpy(np.int64)
    ts = positives["timestamp"]
    recent = history_before(tables.interactions, uid, ts, history=history)
    # Smoothed share of training positives: items never positive in train keep a finite q.
    n_items = max(len(tables.items), 1)
    counts = item_counts.reindex(iid).fillna(0.0).to_numpy(np.float64)
    log_q = np.log((counts + 1.0) / (n_train_positives + n_items)).astype(np.float32)
    return Examples(
        users=user_inputs(tables.users, uid, recent),
        items=item_inputs(tables.items, iid, ts),
        log_q=log_q,
    )


def _to_torch(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()}


def batch_loss(
    model: TwoTower,
    users: dict[str, torch.Tensor],
    items: dict[str, torch.Tensor],
    log_q: torch.Tensor,
) -> torch.Tensor:
    """In-batch sampled softmax with logQ correction; other rows holding the same item are
    not negatives (masked)."""
    u = model.user(**users) / model.hp.temperature  # scale [B, d], not the [B, B] logits
    v = model.item(**items)
    logits = u @ v.T - log_q.unsqueeze(0)
    ids = items["item_id"][:, 0]
    duplicate = ids.unsqueeze(0) == ids.unsqueeze(1)
    duplicate.fill_diagonal_(False)
    logits = logits.masked_fill(duplicate, float("-inf"))
    target = torch.arange(len(ids), device=ids.device)
    loss = F.cross_entropy(logits, target)
    if model.training and model.hp.id_l2 > 0:
        item_rows = model.item.item_ids(ids)
        user_rows = model.user.user_ids(users["user_id"][:, 0])
        penalty = item_rows.pow(2).sum() + user_rows.pow(2).sum()
        loss = loss + model.hp.id_l2 * penalty / len(ids)
    return loss


def _numeric_stats(items: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    x = np.log1p(np.clip(np.hstack([items["price"], items["age_days"]]), 0.0, None))
    mean = x.mean(axis=0) if len(x) else np.zeros(2)
    std = x.std(axis=0) if len(x) else np.ones(2)
    std = np.where(std > 1e-6, std, 1.0)
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def _check_contract(settings: Settings, hp: HParams) -> None:
    """The towers' output width and history length must match config.pbtxt."""
    for model, out in (("user_tower", "user_embedding"), ("item_tower", "item_embedding")):
        cfg = load_config(model, settings.model_repository)
        dims = {t.name: list(t.dims) for t in cfg.output}
        if dims.get(out) != [hp.out_dim]:
            raise ValueError(f"{model} config says {out} dims {dims.get(out)}, model {hp.out_dim}")
    cfg = load_config("user_tower", settings.model_repository)
    dims = {t.name: list(t.dims) for t in cfg.input}
    if dims.get("recent_items") != [HISTORY_LEN]:
        raise ValueError(f"user_tower recent_items dims {dims.get('recent_items')} != HISTORY_LEN")


def fit(
    settings: Settings,
    hp: HParams | None = None,
    *,
    progress: bool = True,
    refit_epochs: int | None = None,
) -> tuple[TwoTower, TrainResult, dict[str, Any]]:
    """Train on the train split of ``settings``' raw tables, early-stopped on the
    validation split; returns the model (eval mode, CPU), what was measured, and the
    checkpoint metadata.

    ``refit_epochs``: instead, train for exactly that many epochs on every event of the
    snapshot (train, validation and test): the released towers, with the epoch count
    chosen by the early-stopped run."""
    hp = hp or HParams()
    _check_contract(settings, hp)
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    device = resolve_device(settings)

    tables = read_raw(settings)
    split = load_split(settings)
    history = recent_items_table(tables.interactions)
    pos = positive_events(tables.interactions)
    if refit_epochs is None:
        train_pos = split.train(pos).sort_values("timestamp", kind="stable")
        val_pos = split.val(pos)
    else:
        train_pos = pos.sort_values("timestamp", kind="stable")
        val_pos = pos.iloc[:0]
    if hp.max_examples is not None and len(train_pos) > hp.max_examples:
        train_pos = train_pos.iloc[-hp.max_examples :]
    if len(train_pos) < 2:
        raise UserError("the train split has fewer than 2 clicks/purchases: nothing to learn")
    counts = train_pos["item_id"].value_counts()
    train_ex = build_examples(tables, train_pos, history, counts, len(train_pos))
    val_ex = build_examples(tables, val_pos, history, counts, len(train_pos))

    model = TwoTower(Vocab.from_tables(tables, hp), hp)
    mean, std = _numeric_stats(train_ex.items)
    model.item.num_mean.copy_(mean)
    model.item.num_std.copy_(std)
    model.to(device)
    log.info("two-tower: examples built in %.1f s", time.perf_counter() - t0)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(hp.cpu_threads)
    try:
        val = val_ex if len(val_ex) >= 2 else None
        epochs = refit_epochs if refit_epochs is not None else hp.epochs
        epoch_losses, val_losses, best_epoch = _run_epochs(
            model, hp, train_ex, val, epochs, device, rng, progress
        )
        model.eval()
    finally:
        torch.set_num_threads(threads)
    model.to("cpu")
    best = best_epoch - 1
    val_loss = val_losses[best] if val_losses else None
    warnings = _warnings(hp, epoch_losses[best], val_loss, tables, train_pos, split, refit_epochs)
    for w in warnings:
        log.warning("two-tower: %s", w)
    result = TrainResult(
        train_loss=epoch_losses[best],
        val_loss=val_loss,
        seconds=time.perf_counter() - t0,
        cpu_seconds=time.process_time() - cpu0,
        n_train=len(train_ex),
        n_val=len(val_ex),
        epoch_losses=epoch_losses,
        val_losses=val_losses,
        best_epoch=best_epoch,
        warnings=warnings,
    )
    meta = {
        "hparams": asdict(hp),
        "vocab": asdict(model.vocab),
        "seed": settings.seed,
        "train_end": split.train_description() if refit_epochs is None else "all events",
        "metrics": asdict(result),
    }
    log.info(
        "two-tower: best epoch %d, train loss %.4f, val loss %s, %.1f s",
        best_epoch,
        result.train_loss,
        f"{val_loss:.4f}" if val_loss is not None else "-",
        result.seconds,
    )
    return model, result, meta


def _warnings(
    hp: HParams,
    train_loss: float,
    val_loss: float | None,
    tables: RawTables,
    train_pos: pd.DataFrame,
    split: Any,
    refit_epochs: int | None,
) -> list[str]:
    """What a user should know about this training run (also in the report)."""
    out = []
    if val_loss is not None and val_loss > hp.overfit_ratio * train_loss:
        out.append(
            f"the towers over-fit: validation loss {val_loss:.2f} vs training loss "
            f"{train_loss:.2f} at the best epoch (more data, or stronger regularisation)"
        )
    if refit_epochs is None:
        later = split.val(tables.interactions)["user_id"].unique()
        trained = train_pos["user_id"].unique()
        untrained = int((~np.isin(later, trained)).sum())
        if untrained:
            out.append(
                f"{untrained} of {len(later)} users active in the validation window have no "
                "training event before it: their id embeddings are untrained in the "
                "selection run (the released towers are refit on all events)"
            )
    return out


def _run_epochs(
    model: TwoTower,
    hp: HParams,
    ex: Examples,
    val: Examples | None,
    epochs: int,
    device: torch.device,
    rng: np.random.Generator,
    progress: bool,
) -> tuple[list[float], list[float], int]:
    """The optimisation loop. Returns the mean training loss of each epoch, the
    validation loss after each epoch (empty without ``val``) and the 1-based epoch whose
    weights the model holds at the end (the best validation loss; the last without)."""
    opt = Optimizer(model, hp)
    n = len(ex)
    bs = min(hp.batch_size, n)
    steps = n // bs  # drop the ragged tail: in-batch negatives need full batches
    log.info("two-tower: %d examples, %d steps x ≤%d epochs on %s", n, steps, epochs, device)
    users_t = _to_torch(ex.users, torch.device("cpu"))
    items_t = _to_torch(ex.items, torch.device("cpu"))
    logq_t = torch.from_numpy(ex.log_q)
    epoch_losses: list[float] = []
    val_losses: list[float] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch, stale = epochs, 0
    bar = tqdm(total=steps * epochs, desc="two-tower", unit="batch", disable=not progress)
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.from_numpy(rng.permutation(n))
        total = 0.0
        for s in range(steps):
            idx = perm[s * bs : (s + 1) * bs]
            loss = batch_loss(
                model,
                {k: v[idx].to(device) for k, v in users_t.items()},
                {k: v[idx].to(device) for k, v in items_t.items()},
                logq_t[idx].to(device),
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            total += value
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", refresh=False)
        epoch_losses.append(total / max(steps, 1))
        if val is None:
            continue
        model.eval()
        val_losses.append(evaluate_loss(model, val, bs, device))
        bar.set_postfix(loss=f"{epoch_losses[-1]:.3f}", val=f"{val_losses[-1]:.3f}")
        if val_losses[-1] <= min(val_losses):
            best_epoch, stale = epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= hp.patience:
                log.info("two-tower: early stop after epoch %d (best %d)", epoch, best_epoch)
                break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    elif val is None:
        best_epoch = len(epoch_losses)
    return epoch_losses, val_losses, best_epoch


@torch.no_grad()
def evaluate_loss(model: TwoTower, ex: Examples, batch_size: int, device: torch.device) -> float:
    """Mean in-batch softmax loss over consecutive batches (deterministic)."""
    n = len(ex)
    bs = min(batch_size, n)
    losses = []
    for s in range(0, n - bs + 1, bs):
        rows = slice(s, s + bs)
        losses.append(
            float(
                batch_loss(
                    model,
                    _to_torch(take(ex.users, rows), device),
                    _to_torch(take(ex.items, rows), device),
                    torch.from_numpy(ex.log_q[rows]).to(device),
                )
            )
        )
    return float(np.mean(losses)) if losses else math.nan


def save(model: TwoTower, meta: dict[str, Any], path: Path) -> None:
    """Checkpoint = state dict + hyper-parameters + vocab sizes + metrics; atomic write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"state_dict": model.state_dict(), **meta}, tmp)
    os.replace(tmp, path)


def load(path: Path) -> tuple[TwoTower, dict[str, Any]]:
    """Rebuild the model from a checkpoint (eval mode, CPU) and return its metadata."""
    if not path.exists():
        raise UserError(f"{path} missing: run the two_tower step first (recstack train)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    hp = HParams(**ckpt["hparams"])
    model = TwoTower(Vocab(**ckpt["vocab"]), hp)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model, meta


METRICS_FILE = "two_tower.json"
REFIT_DIR = "refit"


def train(settings: Settings) -> None:
    """Pipeline step ``two_tower``: train (early-stopped on validation) and write
    ``work/two_tower.pt`` and ``work/two_tower.json`` (metrics and warnings)."""
    model, result, meta = fit(settings)
    save(model, meta, settings.work_dir / CHECKPOINT)
    _write_metrics(settings.work_dir / METRICS_FILE, result)
    log.info("wrote %s: %s", settings.work_dir / CHECKPOINT, json.dumps(meta["metrics"]))


def refit(settings: Settings) -> None:
    """Pipeline step ``refit``: the released towers, the catalog index built from them,
    trained on every event of the snapshot for the epoch count the early-stopped run
    chose, into ``work/refit/`` (what ``exporters/release.py`` publishes). The selection
    run's towers stay in ``work/``: the ranker and the evaluation were made with them."""
    from exporters import index_build, onnx_export

    out = settings.work_dir / REFIT_DIR
    if not settings.refit_towers:
        shutil.rmtree(out, ignore_errors=True)
        log.info("refit: off (RECSTACK_REFIT_TOWERS=false): the selection towers are released")
        return
    chosen = json.loads((settings.work_dir / METRICS_FILE).read_text())
    epochs = max(int(chosen["best_epoch"]), 1)
    out.mkdir(parents=True, exist_ok=True)
    model, result, meta = fit(settings, refit_epochs=epochs)
    save(model, meta, out / CHECKPOINT)
    _write_metrics(out / METRICS_FILE, result)
    onnx_export.export_towers(settings, work=out)
    index_build.build(settings, work=out)
    log.info("refit: %d epochs on %d examples -> %s", epochs, result.n_train, out)


def _write_metrics(path: Path, result: TrainResult) -> None:
    write_json_atomic(path, asdict(result))
