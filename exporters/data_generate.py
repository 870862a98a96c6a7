"""A synthetic marketplace with structure worth learning (``recstack data generate``).

The world, in short:

- categories have a centre in a latent taste space (unit vectors, ``dim``-d); items are
  their category's centre plus noise; users are a mix of 1-3 category centres plus noise,
  and their age bucket / country lean towards what their main category prefers;
- items have Zipf popularity and a log-normal price whose level depends on the category;
  users have heavy-tailed (log-normal) activity;
- some items and users only appear during the 90-day window (cold start); nobody acts
  before signing up and nobody sees an item before it exists;
- each impression ("view") picks a category from the user's tastes (or, for exploration,
  by category popularity), draws ``candidates`` items of that category by popularity among
  those already created, and keeps one with probability ∝ exp(β·<u,i>) × freshness — so
  the chosen item follows popularity × affinity, which a personalised model can learn
  and a popularity baseline cannot;
- the funnel view → click → purchase: click and purchase probabilities grow with affinity,
  purchase probability falls with the item's price relative to its category; repeat
  purchases of the same item are mostly dropped.

Everything is vectorised numpy (events in chunks), deterministic by seed.

The ``sparse`` preset is a different world on purpose (:class:`RatingsPreset`,
:func:`build_ratings`): explicit 1-5 ratings whose statistics resemble public rating data
such as MovieLens-100k — where most-popular and item-item baselines are strong and the
marketplace's assumptions (prices, brands, a funnel driven by the model's own kind of
affinity) do not hold. See :func:`build_ratings` for its model.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from exporters.data_import import rating_cut
from exporters.raw_tables import RawTables, read_meta, write_raw
from exporters.schema import CONTEXT_COLUMNS, EVENTS
from recstack.errors import UserError
from recstack.settings import Settings, get_settings

log = logging.getLogger(__name__)

# Fixed, not "now": the same seed gives the same tables on any day.
END = pd.Timestamp("2026-09-30T00:00:00Z")
US_PER_DAY = 86_400 * 1_000_000
N_AGE_BUCKETS = 6
N_COUNTRIES = 20


@dataclass(frozen=True)
class Preset:
    """Size and shape of one synthetic world. Event counts follow from ``n_views`` and the
    funnel: roughly ``n_views`` × 1.25 events in total."""

    n_users: int
    n_items: int
    n_views: int
    n_categories: int = 50
    brands_per_category: int = 12
    dim: int = 16
    days: float = 90.0
    # Items/users created before the window are spread over this many days before it.
    history_days: float = 730.0
    item_zipf: float = 1.0  # popularity ∝ rank^-item_zipf
    user_activity_sigma: float = 1.2  # log-normal activity: a heavy tail of busy users
    new_item_frac: float = 0.15  # created inside the window: cold-start items
    new_user_frac: float = 0.12  # signed up inside the window: cold-start users
    item_noise: float = 0.6  # norm of an item's offset from its category centre
    user_noise: float = 0.5
    candidates: int = 8  # popularity-drawn items per impression, one kept by affinity
    beta: float = 5.0  # affinity strength of the choice among candidates
    explore: float = 0.15  # impressions from category popularity, no affinity
    fresh_boost: float = 2.0  # choice weight × (1 + fresh_boost · exp(-age / fresh_days))
    fresh_days: float = 7.0
    chunk: int = 200_000  # impressions per vectorised chunk (bounds memory for `large`)


@dataclass(frozen=True)
class RatingsPreset:
    """Size and shape of an explicit-ratings world (see :func:`build_ratings`). The
    defaults resemble MovieLens-100k: ~950 users, ~1,700 items, ~100k ratings over ~7
    months, 20 to ~700 ratings per user (median ~60), a few items rated by ~half the
    users and a long tail rated by 1-5."""

    n_users: int = 943
    n_items: int = 1_682
    n_ratings: int = 103_000  # ~100k after the cap on heavy users
    days: float = 212.0  # ~7 months
    n_genres: int = 18  # the item's only attribute (``category`` codes 1..n_genres)
    n_age_buckets: int = 7  # the user's only attribute (``age_bucket`` codes 1..n)
    dim: int = 8  # latent taste space of genres and item clusters
    cluster_mean: float = 4.0  # mean size of an item cluster (franchise, sequels, author)
    pop_sigma: float = 1.3  # log-normal item popularity: a heavy head and a long tail
    beta: float = 1.0  # strength of latent user × cluster affinity in what users rate
    gamma: float = 0.5  # strength of the user's genre shares in what users rate
    min_ratings: int = 20
    max_ratings: int = 737
    activity_sigma: float = 1.1  # log-normal user activity above min_ratings
    # Users rate popular items first (a new user's first page is the popular titles), so
    # each user's latest ratings lean towards the tail: key = −order_pop·z(pop) + N(0,1).
    order_pop: float = 0.15
    rating_affinity: float = 0.5  # how much affinity (vs item quality, user bias) raises a rating
    # Share of ratings 1..4 (5 takes the rest), as in public data: positives ≥ 4 ≈ 55 %.
    rating_shares: tuple[float, float, float, float] = (0.06, 0.11, 0.27, 0.34)
    sessions_mean: float = 1.0  # extra rating sessions per user (Poisson) after the first
    session_gap_days: float = 20.0  # mean gap between a user's sessions (exponential)
    rating_gap_s: float = 40.0  # mean time between two ratings within a session


PRESETS: dict[str, Preset | RatingsPreset] = {
    "small": Preset(n_users=1_500, n_items=800, n_views=40_000),
    "demo": Preset(n_users=20_000, n_items=10_000, n_views=820_000),
    "large": Preset(n_users=100_000, n_items=1_000_000, n_views=3_300_000, chunk=250_000),
    "sparse": RatingsPreset(),
}

# The ratings world ends years before any wall clock, as public rating data does: serving
# it exercises features computed against a clock outside the data.
SPARSE_END = pd.Timestamp("1998-04-23T00:00:00Z")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _noise(rng: np.random.Generator, shape: tuple[int, int], norm: float) -> np.ndarray:
    # Per-dimension sigma so the offset's expected norm is ``norm``.
    return rng.normal(0.0, norm / np.sqrt(shape[1]), size=shape)


@dataclass
class _World:
    """Latent state the tables are drawn from (not written out)."""

    item_cat: np.ndarray
    item_vec: np.ndarray  # float32 (n_items, dim), unit rows
    item_pop: np.ndarray  # popularity weight
    item_created: np.ndarray  # µs since epoch
    item_price_z: np.ndarray  # log-price relative to the category
    cat_pop: np.ndarray
    user_vec: np.ndarray
    user_tastes: np.ndarray  # (n_users, 3) category codes
    user_taste_cum: np.ndarray  # (n_users, 3) cumulative taste weights
    user_signup: np.ndarray  # µs
    user_activity: np.ndarray
    user_click_bias: np.ndarray


def _items(
    p: Preset, rng: np.random.Generator, centres: np.ndarray, start_us: int, end_us: int
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    n, c = p.n_items, p.n_categories
    cat_share = rng.dirichlet(np.full(c, 2.0))
    cat = rng.choice(c, size=n, p=cat_share)
    vec = _unit(centres[cat] + _noise(rng, (n, p.dim), p.item_noise)).astype(np.float32)
    # Zipf by a random rank, so popularity is independent of category and creation time.
    rank = rng.permutation(n) + 1
    pop = rank.astype(np.float64) ** -p.item_zipf
    # A category's brands also have Zipf shares; codes are unique across categories.
    brand_rank = np.minimum(rng.zipf(1.6, size=n), p.brands_per_category) - 1
    brand = cat * p.brands_per_category + brand_rank
    cat_mu = rng.normal(3.2, 0.8, size=c)  # e^3.2 ≈ 25 currency units
    log_price = cat_mu[cat] + rng.normal(0.0, 0.5, size=n)
    price = np.round(np.exp(log_price), 2)
    new = rng.random(n) < p.new_item_frac
    hist_us = int(p.history_days * US_PER_DAY)
    created = np.where(
        new,
        rng.integers(start_us, end_us, size=n),
        rng.integers(start_us - hist_us, start_us, size=n),
    )
    df = pd.DataFrame(
        {
            "item_id": np.arange(n, dtype=np.int64),
            "category": cat.astype(np.int64),
            "brand": brand.astype(np.int64),
            "price": price,
            "created_at": pd.to_datetime(created, unit="us", utc=True),
        }
    )
    latent: dict[str, np.ndarray] = {
        "cat": cat,
        "vec": vec,
        "pop": pop,
        "created": created,
        "price_z": (log_price - cat_mu[cat]) / 0.5,
        "cat_pop": np.bincount(cat, weights=pop, minlength=c),
    }
    return df, latent


def _users(
    p: Preset,
    rng: np.random.Generator,
    centres: np.ndarray,
    cat_pop: np.ndarray,
    start_us: int,
    end_us: int,
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    n, c = p.n_users, p.n_categories
    # 1-3 taste categories, drawn without replacement ∝ sqrt(category popularity)
    # (Gumbel top-k keeps it vectorised).
    keys = 0.5 * np.log(cat_pop + 1e-12)[None, :] + rng.gumbel(size=(n, c))
    tastes = np.argsort(-keys, axis=1)[:, :3]
    n_taste = rng.choice([1, 2, 3], size=n, p=[0.4, 0.4, 0.2])
    w = rng.gamma(2.0, size=(n, 3)) * (np.arange(3)[None, :] < n_taste[:, None])
    w /= w.sum(axis=1, keepdims=True)
    # Main taste first so "primary category" is column 0.
    order = np.argsort(-w, axis=1)
    tastes = np.take_along_axis(tastes, order, axis=1)
    w = np.take_along_axis(w, order, axis=1)
    vec = np.einsum("nk,nkd->nd", w, centres[tastes])
    vec = _unit(vec + _noise(rng, (n, p.dim), p.user_noise)).astype(np.float32)
    # Demographics lean towards the main category's audience.
    cat_age = rng.integers(0, N_AGE_BUCKETS, size=c)
    cat_country = rng.integers(0, N_COUNTRIES, size=c)
    country_share = 1.0 / np.arange(1, N_COUNTRIES + 1)
    country_share /= country_share.sum()
    age = np.where(
        rng.random(n) < 0.5, cat_age[tastes[:, 0]], rng.integers(0, N_AGE_BUCKETS, size=n)
    )
    country = np.where(
        rng.random(n) < 0.3,
        cat_country[tastes[:, 0]],
        rng.choice(N_COUNTRIES, size=n, p=country_share),
    )
    new = rng.random(n) < p.new_user_frac
    hist_us = int(p.history_days * US_PER_DAY)
    signup = np.where(
        new,
        rng.integers(start_us, end_us, size=n),
        rng.integers(start_us - hist_us, start_us, size=n),
    )
    # Activity is a rate: users who joined late get proportionally fewer events.
    active = (end_us - np.maximum(signup, start_us)) / (end_us - start_us)
    activity = rng.lognormal(0.0, p.user_activity_sigma, size=n) * active
    df = pd.DataFrame(
        {
            "user_id": np.arange(n, dtype=np.int64),
            "age_bucket": age.astype(np.int64),
            "country": country.astype(np.int64),
            "signup_at": pd.to_datetime(signup, unit="us", utc=True),
        }
    )
    latent: dict[str, np.ndarray] = {
        "vec": vec,
        "tastes": tastes,
        "taste_cum": np.cumsum(w, axis=1),
        "signup": signup,
        "activity": activity,
        "click_bias": rng.normal(0.0, 0.5, size=n),
    }
    return df, latent


class _PrefixSampler:
    """Draw items of a category ∝ popularity among those created at or before time t.

    Items are sorted by (category, created_at) with a running sum of popularity, so the
    items of category c created by t are one contiguous prefix of c's segment: one
    searchsorted finds its end, a second one draws inside it. Fully vectorised.
    """

    def __init__(self, cat: np.ndarray, created: np.ndarray, pop: np.ndarray, n_cat: int):
        self.base = int(created.min())
        self.span = int(created.max()) - self.base + 1
        key = cat.astype(np.int64) * self.span + (created - self.base)
        self.order = np.argsort(key, kind="stable")
        self.key = key[self.order]
        self.cum = np.concatenate([[0.0], np.cumsum(pop[self.order])])
        self.seg_lo = np.searchsorted(self.key, np.arange(n_cat, dtype=np.int64) * self.span)

    def sample(
        self, rng: np.random.Generator, cat: np.ndarray, t: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Item ids (and a validity mask: False where no item of ``cat`` exists by ``t``)."""
        lo = self.seg_lo[cat]
        rel = np.clip(t - self.base, -1, self.span - 1)
        hi = np.searchsorted(self.key, cat.astype(np.int64) * self.span + rel, side="right")
        ok = hi > lo
        r = self.cum[lo] + rng.random(cat.shape) * (self.cum[hi] - self.cum[lo])
        pos = np.clip(np.searchsorted(self.cum, r, side="right") - 1, lo, np.maximum(hi - 1, lo))
        return self.order[pos], ok


def _impressions(
    p: Preset, rng: np.random.Generator, w: _World, start_us: int, end_us: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, item, timestamp µs) of every view."""
    n_cat = p.n_categories
    by_cat = _PrefixSampler(w.item_cat, w.item_created, w.item_pop, n_cat)
    # One "category" holding every item: the fallback when a category is still empty.
    anywhere = _PrefixSampler(np.zeros_like(w.item_cat), w.item_created, w.item_pop, 1)
    cat_p = w.cat_pop / w.cat_pop.sum()
    act_p = w.user_activity / w.user_activity.sum()
    users_out, items_out, ts_out = [], [], []
    fresh_us = p.fresh_days * US_PER_DAY
    n_chunks = -(-p.n_views // p.chunk)
    for k in tqdm(range(n_chunks), desc="events", unit="chunk", disable=n_chunks < 4):
        m = min(p.chunk, p.n_views - k * p.chunk)
        u = rng.choice(p.n_users, size=m, p=act_p)
        lo = np.maximum(w.user_signup[u], start_us)
        t = lo + (rng.random(m) * (end_us - lo)).astype(np.int64)
        explore = rng.random(m) < p.explore
        pick = (rng.random(m)[:, None] > w.user_taste_cum[u]).sum(axis=1)
        cat = np.where(
            explore,
            rng.choice(n_cat, size=m, p=cat_p),
            w.user_tastes[u, np.minimum(pick, 2)],
        )
        # Candidates: popularity-weighted within the category, existing at time t.
        reps = p.candidates
        cand, ok = by_cat.sample(rng, np.repeat(cat, reps), np.repeat(t, reps))
        fallback, _ = anywhere.sample(rng, np.zeros(m * reps, dtype=np.int64), np.repeat(t, reps))
        cand = np.where(ok, cand, fallback).reshape(m, reps)
        # Keep one candidate ∝ exp(β·<u,i>) × freshness (Gumbel-max); explorers take the
        # first, i.e. popularity alone.
        aff = np.einsum("md,mkd->mk", w.user_vec[u], w.item_vec[cand])
        age = (t[:, None] - w.item_created[cand]).astype(np.float64)
        fresh = np.log1p(p.fresh_boost * np.exp(-age / fresh_us))
        score = p.beta * aff + fresh + rng.gumbel(size=(m, reps))
        choice = np.where(explore, 0, np.argmax(score, axis=1))
        users_out.append(u)
        items_out.append(cand[np.arange(m), choice])
        ts_out.append(t)
    u, i, t = np.concatenate(users_out), np.concatenate(items_out), np.concatenate(ts_out)
    # The fallback can only fail if no item at all exists yet at t; never show those.
    keep = w.item_created[i] <= t
    return u[keep], i[keep], t[keep]


def _funnel(
    rng: np.random.Generator, w: _World, u: np.ndarray, i: np.ndarray, t: np.ndarray, end_us: int
) -> pd.DataFrame:
    """Views plus the clicks and purchases they lead to, sorted by time."""
    aff = np.einsum("nd,nd->n", w.user_vec[u], w.item_vec[i]).astype(np.float64)
    p_click = 1.0 / (1.0 + np.exp(-(-3.0 + 3.0 * aff + w.user_click_bias[u])))
    click = rng.random(u.size) < p_click
    p_buy = 1.0 / (1.0 + np.exp(-(-1.9 + 2.0 * aff - 0.8 * w.item_price_z[i])))
    buy = click & (rng.random(u.size) < p_buy)
    last = end_us - 1
    t_click = np.minimum(t + rng.exponential(30e6, size=u.size).astype(np.int64) + 1, last)
    t_buy = np.minimum(t_click + rng.exponential(600e6, size=u.size).astype(np.int64) + 1, last)
    cu, ci, ct = u[click], i[click], t_click[click]
    bu, bi, bt = u[buy], i[buy], t_buy[buy]
    # Repeat purchases of the same item are rare: keep the first, and a few repeats.
    order = np.argsort(bt, kind="stable")
    bu, bi, bt = bu[order], bi[order], bt[order]
    dup = pd.DataFrame({"u": bu, "i": bi}).duplicated().to_numpy()
    keep = ~dup | (rng.random(bu.size) < 0.05)
    bu, bi, bt = bu[keep], bi[keep], bt[keep]
    users = np.concatenate([u, cu, bu])
    items = np.concatenate([i, ci, bi])
    ts = np.concatenate([t, ct, bt])
    ev = np.concatenate(
        [np.zeros(u.size, np.int8), np.ones(cu.size, np.int8), np.full(bu.size, 2, np.int8)]
    )
    order = np.lexsort((ev, items, users, ts))
    return pd.DataFrame(
        {
            "user_id": users[order].astype(np.int64),
            "item_id": items[order].astype(np.int64),
            "timestamp": pd.to_datetime(ts[order], unit="us", utc=True),
            "event": pd.Categorical.from_codes(ev[order], categories=list(EVENTS)),
        }
    )


@dataclass(frozen=True)
class RatingsTables:
    """An explicit-ratings world as an importer would receive it: ``ratings``
    (``user_id, item_id, rating, timestamp``; int ratings 1-5, UTC timestamps, sorted by
    time), ``items`` (``item_id, category``) and ``users`` (``user_id, age_bucket``)."""

    ratings: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame


def build_ratings(
    preset: RatingsPreset, seed: int, end: pd.Timestamp = SPARSE_END
) -> RatingsTables:
    """An explicit-ratings world with strong popularity, noisy tastes and item-item
    structure, ending at ``end``. The model:

    - items form clusters (geometric sizes, mean ``cluster_mean``: franchises, sequels,
      one author's works); each cluster has a genre and a latent vector (its genre's
      centre plus noise), items share their cluster's vector plus a little noise;
    - item popularity is log-normal (``pop_sigma``), partly shared within a cluster;
    - users have sparse genre shares (Dirichlet 0.3), a latent vector near their genres'
      centres plus noise, and a log-normal number of ratings (``min_ratings`` ..
      ``max_ratings``); an age bucket that leans weakly towards their main genre;
    - each user rates the top n_u items of log-popularity + ``beta``·<user, item> +
      ``gamma``·log(genre share) + Gumbel noise (a draw without replacement), so
      co-rated items cluster — what item-item models find — and popularity is strong;
    - the rating (1-5, shares ``rating_shares``) grows with item quality (correlated with
      popularity), affinity and a user bias, plus noise;
    - time: a user's ratings come in bursts — a first session at a uniform time in the
      window and Poisson(``sessions_mean``) later ones — with popular items a little
      earlier within the user (``order_pop``).

    Items nobody rated are dropped (an importer never sees them). Deterministic by seed.
    """
    p = preset
    rng = np.random.default_rng(seed)
    n_u_total, n_i = p.n_users, p.n_items
    # Clusters, with geometric sizes summing to n_items.
    sizes = 1 + rng.geometric(1.0 / p.cluster_mean, size=n_i) - 1
    sizes = np.minimum(sizes, 30)
    sizes = sizes[: int(np.searchsorted(np.cumsum(sizes), n_i)) + 1]
    sizes[-1] -= int(sizes.sum()) - n_i
    sizes = sizes[sizes > 0]
    n_c = sizes.size
    cluster = np.repeat(np.arange(n_c), sizes)[rng.permutation(n_i)]
    genre_share = rng.dirichlet(np.full(p.n_genres, 1.0))
    cluster_genre = rng.choice(p.n_genres, size=n_c, p=genre_share)
    genre = cluster_genre[cluster]
    genre_vec = rng.normal(size=(p.n_genres, p.dim)) / np.sqrt(p.dim)
    cluster_vec = genre_vec[cluster_genre] + rng.normal(size=(n_c, p.dim)) / np.sqrt(p.dim)
    item_vec = cluster_vec[cluster] + 0.3 * rng.normal(size=(n_i, p.dim)) / np.sqrt(p.dim)
    log_pop = p.pop_sigma * (0.8 * rng.normal(size=n_i) + 0.6 * rng.normal(size=n_c)[cluster])
    pop_z = (log_pop - log_pop.mean()) / log_pop.std()
    # Users.
    taste = rng.dirichlet(np.full(p.n_genres, 0.3), size=n_u_total)
    user_vec = taste @ genre_vec + rng.normal(size=(n_u_total, p.dim)) / np.sqrt(p.dim)
    act = rng.lognormal(0.0, p.activity_sigma, size=n_u_total)
    extra = act / act.sum() * (p.n_ratings - p.min_ratings * n_u_total)
    n_rated = np.minimum(np.round(p.min_ratings + extra).astype(np.int64), p.max_ratings)
    n_rated = np.minimum(n_rated, n_i)
    genre_age = rng.integers(1, p.n_age_buckets + 1, size=p.n_genres)
    main_genre = taste.argmax(axis=1)
    age = np.where(
        rng.random(n_u_total) < 0.3,
        genre_age[main_genre],
        rng.integers(1, p.n_age_buckets + 1, size=n_u_total),
    )
    # What each user rates: Gumbel top-n_u of the choice logits, one block of users at a time.
    users_l, items_l = [], []
    block = max(1, 4_000_000 // n_i)
    for lo in range(0, n_u_total, block):
        hi = min(lo + block, n_u_total)
        logit = (
            log_pop[None, :]
            + p.beta * (user_vec[lo:hi] @ item_vec.T)
            + p.gamma * np.log(taste[lo:hi][:, genre] + 1e-3)
            + rng.gumbel(size=(hi - lo, n_i))
        )
        order = np.argsort(-logit, axis=1)
        for k in range(hi - lo):
            items_l.append(order[k, : n_rated[lo + k]])
        users_l.append(np.repeat(np.arange(lo, hi), n_rated[lo:hi]))
    u = np.concatenate(users_l)
    i = np.concatenate(items_l)
    # Ratings: quality (leaning to popular items) + affinity + user bias + noise, cut into
    # the target shares.
    aff = np.einsum("nd,nd->n", user_vec[u], item_vec[i])
    quality = 0.5 * pop_z + rng.normal(0.0, 0.7, size=n_i)
    latent = (
        quality[i]
        + p.rating_affinity * (aff - aff.mean()) / aff.std()
        + rng.normal(0.0, 0.5, size=n_u_total)[u]
        + rng.normal(size=u.size)
    )
    cuts = np.quantile(latent, np.cumsum(p.rating_shares))
    rating = (1 + np.searchsorted(cuts, latent)).astype(np.int64)
    # Time: order within a user (popular a little earlier), then bursty sessions.
    key = -p.order_pop * pop_z[i] + rng.normal(size=u.size)
    order = np.lexsort((key, u))
    u, i, rating = u[order], i[order], rating[order]
    start_us = end.value // 1000 - int(p.days * US_PER_DAY)
    end_us = end.value // 1000
    pos = np.arange(u.size) - np.searchsorted(u, u, side="left")  # rank within the user
    n_sess = 1 + rng.poisson(p.sessions_mean, size=n_u_total)
    max_s = int(n_sess.max())
    gaps = rng.exponential(p.session_gap_days * US_PER_DAY, size=(n_u_total, max_s))
    gaps[:, 0] = 0.0
    sess_off = np.cumsum(gaps, axis=1)  # µs after the user's first session
    # A user's share of ratings per session (Dirichlet), as cumulative rating counts.
    share = rng.gamma(1.0, size=(n_u_total, max_s)) * (np.arange(max_s)[None, :] < n_sess[:, None])
    share /= share.sum(axis=1, keepdims=True)
    bounds = np.round(np.cumsum(share, axis=1) * n_rated[:, None]).astype(np.int64)
    sess = np.minimum((pos[:, None] >= bounds[u]).sum(axis=1), n_sess[u] - 1)
    within = rng.exponential(p.rating_gap_s * 1e6, size=u.size)
    # Seconds since the session started: cumulative gaps of that user's session.
    grp = u * max_s + sess
    csum = np.cumsum(within)
    first = np.searchsorted(grp, grp, side="left")
    in_sess = csum - csum[first] + within[first]
    span = sess_off[u, sess] + in_sess
    user_span = pd.Series(span).groupby(u).max().to_numpy()
    # A user whose sessions would outlast the window has them compressed into 90 % of it.
    window = float(end_us - start_us)
    squeeze = np.minimum(1.0, 0.9 * window / np.maximum(user_span, 1.0))
    span = span * squeeze[u]
    user_span = user_span * squeeze
    # The first session starts uniformly where the user's whole span still fits.
    room = np.maximum((end_us - start_us) - user_span - 1, 0)
    first_us = start_us + (rng.random(n_u_total) * room).astype(np.int64)
    # Whole seconds, as public rating data has (unix seconds survive a CSV exactly).
    ts = (first_us[u] + span.astype(np.int64)) // 1_000_000 * 1_000_000
    order = np.lexsort((i, u, ts))
    u, i, rating, ts = u[order], i[order], rating[order], ts[order]
    rated = np.unique(i)
    ratings = pd.DataFrame(
        {
            "user_id": u.astype(np.int64),
            "item_id": i.astype(np.int64),
            "rating": rating,
            "timestamp": pd.to_datetime(ts, unit="us", utc=True),
        }
    )
    items = pd.DataFrame({"item_id": rated.astype(np.int64), "category": genre[rated] + 1})
    users = pd.DataFrame({"user_id": np.arange(n_u_total, dtype=np.int64), "age_bucket": age})
    return RatingsTables(ratings=ratings, items=items, users=users)


def write_ratings_csv(world: RatingsTables, folder: Path) -> dict[str, Path]:
    """Write ``world`` as the CSV files ``recstack data import`` reads: ``ratings.csv``
    (``user_id,item_id,rating,timestamp`` with unix seconds), ``items.csv``
    (``item_id,category``) and ``users.csv`` (``user_id,age_bucket``). Returns the paths
    by table name (``interactions``, ``items``, ``users``)."""
    folder.mkdir(parents=True, exist_ok=True)
    r = world.ratings
    out = {
        "interactions": folder / "ratings.csv",
        "items": folder / "items.csv",
        "users": folder / "users.csv",
    }
    secs = r["timestamp"].astype("int64") // (10**9 if r["timestamp"].dt.unit == "ns" else 10**6)
    pd.DataFrame(
        {
            "user_id": r["user_id"],
            "item_id": r["item_id"],
            "rating": r["rating"],
            "timestamp": secs,
        }
    ).to_csv(out["interactions"], index=False)
    world.items.to_csv(out["items"], index=False)
    world.users.to_csv(out["users"], index=False)
    return out


def ratings_to_raw(world: RatingsTables) -> RawTables:
    """The canonical tables ``recstack data import`` would write for ``world``: ratings
    mapped to events by the importer's ``rating_cut``; brand 0, price 0.0, country 0
    (the importer's defaults); created/signup at the first rating."""
    r = world.ratings
    rating = r["rating"].to_numpy()
    codes = rating_cut(rating).events(rating)
    first_item = r.groupby("item_id")["timestamp"].min()
    first_user = r.groupby("user_id")["timestamp"].min()
    order = np.lexsort((codes, r["item_id"], r["user_id"], r["timestamp"]))
    inter = pd.DataFrame(
        {
            "user_id": r["user_id"].to_numpy()[order],
            "item_id": r["item_id"].to_numpy()[order],
            "timestamp": r["timestamp"].to_numpy()[order],
            "event": pd.Categorical.from_codes(codes[order], categories=list(EVENTS)),
            **{c: "" for c in CONTEXT_COLUMNS},  # ratings carry no request context
        }
    )
    inter["timestamp"] = pd.to_datetime(inter["timestamp"], utc=True)
    items = world.items.sort_values("item_id").reset_index(drop=True)
    users = world.users.sort_values("user_id").reset_index(drop=True)
    return RawTables(
        interactions=inter,
        items=pd.DataFrame(
            {
                "item_id": items["item_id"],
                "category": items["category"].astype(np.int64),
                "brand": np.zeros(len(items), np.int64),
                "price": np.zeros(len(items)),
                "created_at": first_item.reindex(items["item_id"]).to_numpy(),
            }
        ),
        users=pd.DataFrame(
            {
                "user_id": users["user_id"],
                "age_bucket": users["age_bucket"].astype(np.int64),
                "country": np.zeros(len(users), np.int64),
                "signup_at": first_user.reindex(users["user_id"]).to_numpy(),
            }
        ),
    )


SURFACES: tuple[str, ...] = ("home", "search", "cart")
DEVICES: tuple[str, ...] = ("ios", "android", "web")


def _with_context(
    rng: np.random.Generator, inter: pd.DataFrame, item_cat: np.ndarray
) -> pd.DataFrame:
    """The request context of each event: a device per user (ios 40 %, android 35 %, web
    25 %) and a surface per event whose odds depend on the item's category — categories
    ``c`` with ``c % 3 == s`` are 3× as likely on surface ``s`` — so each surface's popular
    items differ (what the cold-start context segments can learn)."""
    n_users = int(inter["user_id"].max()) + 1 if len(inter) else 0
    device = rng.choice(len(DEVICES), size=n_users, p=[0.4, 0.35, 0.25])
    base = np.array([0.5, 0.3, 0.2])
    n_cat = int(item_cat.max()) + 1 if len(item_cat) else 1
    odds = np.tile(base, (n_cat, 1))
    odds[np.arange(n_cat), np.arange(n_cat) % len(SURFACES)] *= 3.0
    cum = np.cumsum(odds / odds.sum(axis=1, keepdims=True), axis=1)
    cat = item_cat[inter["item_id"].to_numpy()]
    surface = (rng.random(len(inter))[:, None] > cum[cat]).sum(axis=1)
    return inter.assign(
        surface=pd.Categorical.from_codes(surface, categories=list(SURFACES)),
        device=pd.Categorical.from_codes(
            device[inter["user_id"].to_numpy()], categories=list(DEVICES)
        ),
    )


def build(
    preset: Preset | RatingsPreset, seed: int
) -> tuple[RawTables, pd.Timestamp, pd.Timestamp]:
    """The three tables of one synthetic world (in memory) and its time window."""
    if isinstance(preset, RatingsPreset):
        start = SPARSE_END - pd.Timedelta(days=preset.days)
        return ratings_to_raw(build_ratings(preset, seed)), start, SPARSE_END
    rng = np.random.default_rng(seed)
    end_us = END.value // 1000
    start_us = end_us - int(preset.days * US_PER_DAY)
    centres = _unit(rng.normal(size=(preset.n_categories, preset.dim)))
    items, il = _items(preset, rng, centres, start_us, end_us)
    users, ul = _users(preset, rng, centres, il["cat_pop"], start_us, end_us)
    world = _World(
        item_cat=il["cat"],
        item_vec=il["vec"],
        item_pop=il["pop"],
        item_created=il["created"],
        item_price_z=il["price_z"],
        cat_pop=il["cat_pop"],
        user_vec=ul["vec"],
        user_tastes=ul["tastes"],
        user_taste_cum=ul["taste_cum"],
        user_signup=ul["signup"],
        user_activity=ul["activity"],
        user_click_bias=ul["click_bias"],
    )
    u, i, t = _impressions(preset, rng, world, start_us, end_us)
    interactions = _funnel(rng, world, u, i, t, end_us)
    # Its own random stream: the rest of the world is the same with or without context.
    interactions = _with_context(np.random.default_rng([seed, 0xC0]), interactions, il["cat"])
    start = pd.Timestamp(start_us * 1000, tz="UTC")
    return RawTables(interactions=interactions, items=items, users=users), start, END


# The string ids of ``--string-ids`` (docs/data.md "Ids"): users become UUIDs, items SKUs.
_USER_NAMESPACE = uuid.UUID("6ba7b811-9dad-11d1-80b4-00c04fd430c8")


def user_key(user: int) -> str:
    """A generated user's string id: a UUID (v5 of its integer id)."""
    return str(uuid.uuid5(_USER_NAMESPACE, str(user)))


def item_key(item: int) -> str:
    """A generated item's string id: a SKU."""
    return f"SKU-{item:06d}.A"


def write_keyed_csv(tables: RawTables, folder: Path) -> dict[str, Path]:
    """The tables as the CSV files a client with string ids would import: UUID users, SKU
    items, ISO-8601 UTC times to the microsecond. Returns ``{"interactions"|"items"|"users":
    path}``.

    Full precision, not unix seconds: whole seconds put a session's view and click in the
    same second, and the world differed from the integer-id one by more than its ids (the
    string-id demo's gate margin was 1.03-1.04x against 1.10x; with these times the two
    imports hold the same events)."""

    def secs(ts: pd.Series) -> pd.Series:
        return ts.dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    inter, items, users = tables.interactions, tables.items, tables.users
    frames = {
        "interactions": pd.DataFrame(
            {
                "user_id": inter["user_id"].map(user_key),
                "item_id": inter["item_id"].map(item_key),
                "timestamp": secs(inter["timestamp"]),
                "event": inter["event"].astype(str),
                **{c: inter[c].astype(str) for c in CONTEXT_COLUMNS if c in inter.columns},
            }
        ),
        "items": items.assign(
            item_id=items["item_id"].map(item_key), created_at=secs(items["created_at"])
        ),
        "users": users.assign(
            user_id=users["user_id"].map(user_key), signup_at=secs(users["signup_at"])
        ),
    }
    paths = {}
    for name, df in frames.items():
        paths[name] = folder / f"{name}.csv"
        df.to_csv(paths[name], index=False)
    return paths


def generate(
    settings: Settings, preset: str = "demo", seed: int | None = None, string_ids: bool = False
) -> Path:
    """Generate the ``preset`` world with ``seed`` (default ``settings.seed``) and write it
    atomically to ``settings.raw_dir``. Same seed and preset → identical tables.
    ``string_ids``: name users by UUIDs and items by SKUs, through the importer (the path a
    client with string ids takes; marketplace presets only)."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if string_ids and isinstance(PRESETS[preset], RatingsPreset):
        # Its ratings are already events here; imported as such, every rating would no
        # longer count as seen (docs/data.md "Seen items").
        raise UserError(f"--string-ids: {preset!r} is a ratings preset; use small, demo or large")
    seed = settings.seed if seed is None else seed
    t0 = time.perf_counter()
    tables, start, end = build(PRESETS[preset], seed)
    log.info("generated preset %s (seed %d) in %.1f s", preset, seed, time.perf_counter() - t0)
    if string_ids:
        return _import_keyed(settings, tables)
    # A ratings world is what `recstack data import` makes of ratings: every rating is a
    # consumption, and item "creation" is only the first rating (exporters/seen.py,
    # orchestrator/postprocess.py).
    ratings = isinstance(PRESETS[preset], RatingsPreset)
    extra: dict[str, object] = (
        {"seen_events": list(EVENTS), "item_created_at": "first interaction"}
        if ratings
        else {"item_created_at": "given"}
    )
    return write_raw(
        settings,
        tables,
        source=f"synthetic:preset={preset},seed={seed}",
        start=start,
        end=end,
        extra_meta=extra,
    )


def _import_keyed(settings: Settings, tables: RawTables) -> Path:
    from exporters.data_import import import_data

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".keyed-", dir=settings.data_dir))
    try:
        paths = write_keyed_csv(tables, folder)
        return import_data(settings, paths["interactions"], paths["items"], paths["users"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def cli(args: argparse.Namespace) -> int:
    """``recstack data generate [--preset P] [--seed S] [--string-ids]``."""
    settings = get_settings()
    t0 = time.perf_counter()
    raw = generate(
        settings, preset=args.preset, seed=args.seed, string_ids=getattr(args, "string_ids", False)
    )
    meta = read_meta(raw)
    events = meta["events"]
    print(
        f"{meta['source']}: {meta['n_interactions']:,} events "
        f"({', '.join(f'{k} {v:,}' for k, v in events.items())}), "  # type: ignore[attr-defined]
        f"{meta['n_users']:,} users, {meta['n_items']:,} items, "
        f"{meta['n_categories']} categories, {meta['start']} .. {meta['end']}; "
        f"snapshot {meta['snapshot']}; {time.perf_counter() - t0:.1f} s -> {raw}"
    )
    return 0
