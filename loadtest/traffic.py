"""The request mix, drawn before the run so the send loop only reads arrays: users
Zipf-distributed over the user table (a few are hot, most are rare), a share of cold-start
users (ids not in the table), mixed ``k``, request filters, and RecordEvent calls."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.scenario import Traffic
from recstack.errors import UserError

log = logging.getLogger(__name__)

RECOMMEND, EVENT = 0, 1
KINDS = ("recommend", "event")
# Proto enum names of EventType, with the mix of a typical storefront.
EVENT_NAMES = ("VIEW", "CLICK", "PURCHASE")
EVENT_MIX = (0.7, 0.25, 0.05)
N_FILTER_VARIANTS = 32


@dataclass(frozen=True)
class Catalog:
    """What the traffic needs from the data: known user ids, item ids, categories, prices."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    categories: np.ndarray
    price_quantiles: tuple[float, float, float] = (5.0, 20.0, 100.0)


def load_catalog(raw_dir: Path, traffic: Traffic) -> Catalog:
    """Read ``users.parquet`` (required unless ``user_range``) and ``items.parquet``
    (optional: item ids, categories and prices for events and filters)."""
    # pyarrow is imported only when a table is read: worker start-up time counts.
    if traffic.user_range is not None:
        lo, hi = traffic.user_range
        users = np.arange(lo, hi + 1, dtype=np.int64)
    else:
        import pyarrow.parquet as pq

        path = raw_dir / "users.parquet"
        if not path.exists():
            raise UserError(
                f"no user table at {path}: run `recstack data generate` first, or set "
                "traffic.user_range: [first, last] in the scenario"
            )
        users = pq.read_table(path, columns=["user_id"]).column(0).to_numpy().astype(np.int64)
        if users.size == 0:
            raise UserError(f"{path} has no users")
    path = raw_dir / "items.parquet"
    if path.exists():
        import pyarrow.parquet as pq

        t = pq.read_table(path, columns=["item_id", "category", "price"])
        items = t.column("item_id").to_numpy().astype(np.int64)
        cats = np.unique(t.column("category").to_numpy().astype(np.int64))
        q = np.quantile(t.column("price").to_numpy(), [0.25, 0.5, 0.9])
        return Catalog(users, items, cats, (float(q[0]), float(q[1]), float(q[2])))
    log.info("no %s: events and filters use item ids 0..999 and categories 0..19", path)
    return Catalog(users, np.arange(1000, dtype=np.int64), np.arange(20, dtype=np.int64))


@dataclass
class OpPlan:
    """One row per scheduled request (arrays indexed like the arrival schedule)."""

    kind: np.ndarray  # int8: RECOMMEND / EVENT
    user_id: np.ndarray  # int64
    cold: np.ndarray  # bool: id not in the user table
    k: np.ndarray  # int32
    filters: np.ndarray  # int16: index into filter_variants, -1 = none
    surface: np.ndarray  # int8: index into surfaces
    device: np.ndarray  # int8: index into devices
    item_id: np.ndarray  # int64 (events)
    event: np.ndarray  # int8: index into EVENT_NAMES (events)
    deadline: np.ndarray  # float64: the call's client deadline, s
    filter_variants: list[dict[str, Any]] = field(default_factory=list)
    surfaces: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.kind.size)


def zipf_users(user_ids: np.ndarray, s: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` draws where the r-th most popular user has weight 1/r^s. Popularity ranks are
    a seeded permutation of the table, so hot users are not simply the smallest ids."""
    ranks = np.arange(1, user_ids.size + 1, dtype=np.float64)
    w = ranks**-s
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    order = rng.permutation(user_ids)
    idx = np.searchsorted(cdf, rng.random(n), side="right")
    return order[np.minimum(idx, user_ids.size - 1)]


def filter_variants(cat: Catalog, rng: np.random.Generator) -> list[dict[str, Any]]:
    """A fixed set of request filters in the proto's Filters shape (as plain dicts)."""
    out: list[dict[str, Any]] = []
    lo, mid, hi = cat.price_quantiles
    for i in range(N_FILTER_VARIANTS):
        f: dict[str, Any] = {}
        kind = i % 4
        if kind == 0:
            n = min(2, cat.categories.size)
            f["include_categories"] = [int(c) for c in rng.choice(cat.categories, n, False)]
        elif kind == 1:
            f["exclude_categories"] = [int(rng.choice(cat.categories))]
        elif kind == 2:
            f["price"] = {"min": 0.0, "max": float(hi if i % 8 == 2 else mid)}
        else:
            n = min(5, cat.item_ids.size)
            f["exclude_item_ids"] = [int(x) for x in rng.choice(cat.item_ids, n, False)]
            f["price"] = {"min": float(lo), "max": 0.0}
        out.append(f)
    return out


def build_plan(
    n: int,
    traffic: Traffic,
    cat: Catalog,
    rng: np.random.Generator,
    deadlines: tuple[float, ...] = (1.0,),
) -> OpPlan:
    """Draw the whole request mix for ``n`` arrivals, each call's deadline uniformly from
    ``deadlines``."""
    kind = (rng.random(n) < traffic.event_share).astype(np.int8)
    cold = rng.random(n) < traffic.cold_start_share
    users = zipf_users(cat.user_ids, traffic.zipf_s, n, rng)
    # Cold-start ids lie above every known id, so they are unknown to the server.
    cold_ids = int(cat.user_ids.max()) + 1 + rng.integers(0, 1_000_000_000, size=n)
    user_id = np.where(cold & (kind == RECOMMEND), cold_ids, users).astype(np.int64)
    ks = np.array(sorted(traffic.k), dtype=np.int32)
    kw = np.array([traffic.k[int(k)] for k in ks], dtype=np.float64)
    variants = filter_variants(cat, rng)
    filt = np.where(
        rng.random(n) < traffic.filters_share, rng.integers(0, len(variants), size=n), -1
    ).astype(np.int16)
    item_id = rng.choice(cat.item_ids, size=n)
    event = rng.choice(len(EVENT_NAMES), size=n, p=EVENT_MIX).astype(np.int8)
    # Drawn last, and only when there is a choice: the rest of the mix stays what the
    # same seed drew before per-call deadlines existed.
    ds = np.asarray(deadlines, dtype=np.float64)
    deadline = ds[rng.integers(0, ds.size, size=n)] if ds.size > 1 else np.full(n, ds[0])
    return OpPlan(
        kind=kind,
        user_id=user_id,
        cold=cold & (kind == RECOMMEND),
        k=rng.choice(ks, size=n, p=kw / kw.sum()),
        filters=filt,
        surface=rng.integers(0, len(traffic.surfaces), size=n).astype(np.int8),
        device=rng.integers(0, len(traffic.devices), size=n).astype(np.int8),
        item_id=item_id,
        event=event,
        deadline=deadline,
        filter_variants=variants,
        surfaces=list(traffic.surfaces),
        devices=list(traffic.devices),
    )
