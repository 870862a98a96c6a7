"""Everything one release needs at request time, loaded once: the manifest's pinned model
versions (Triton client), the FAISS index and its item vectors, the Feast online features
with the item snapshot, and the catalog arrays built from them."""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd

from exporters.candidates import (
    CANDIDATE_FEATURES,
    SEGMENT_ATTRIBUTES,
    Quotas,
    SourceModel,
    gather,
)
from exporters.history import PAD
from exporters.item_delta import delta_dir, read_segment, segment_names
from exporters.model_config import input_names
from exporters.rank_layout import Layout
from exporters.release import load_manifest, release_dir
from orchestrator import metrics
from orchestrator.breaker import Breakers
from orchestrator.catalog import Catalog, Fallbacks
from orchestrator.embedding_cache import EmbeddingCache
from orchestrator.faiss_index import FaissIndex
from orchestrator.local_models import InProcessModels
from orchestrator.new_items import AddedItems, AddedVectors, merged_search
from orchestrator.online_features import ItemFeatures, ItemSnapshot, OnlineFeatures, UserFeatures
from orchestrator.postprocess import PostprocessConfig
from orchestrator.request import EventQuery
from orchestrator.store_watch import StoreWatch
from orchestrator.triton_client import TritonClient
from orchestrator.triton_server import ENSEMBLE, ENSEMBLE_VERSION, ensemble_name
from recstack.ids import external_id
from recstack.settings import Settings

log = logging.getLogger(__name__)

# Item features with a role in filters and fallbacks (names from feature_repo/definitions.py).
PRICE = "price"
POPULARITY_RANK = "item_popularity_rank"  # 1 = most events in the trailing 7 days
USER_TOWER = "user_tower"


@dataclass(frozen=True)
class UserView:
    """A user's online features shaped for the models of this release. The derived
    lists (recent and seen items, affinity) are computed once per view: a request reads
    them in several stages. Treat them as read-only."""

    features: UserFeatures
    tower_input_names: tuple[str, ...]
    layout: Layout  # the ranker's feature order, from the release manifest
    # A user of the release's data for whom the store has no row: the store lost them
    # (orchestrator/store_watch.py); served like a cold start, flagged features_missing.
    missing: bool = False

    @property
    def known(self) -> bool:
        return self.features.known

    @property
    def has_history(self) -> bool:
        """Any seen or recent item, or category affinity: something beyond the profile.
        A user without (a sign-up with no events yet) is served as a cold start."""
        return len(self.seen_items) > 0 or bool(self.affinity.any())

    @property
    def segment_attributes(self) -> dict[str, int]:
        """The profile attributes that pick a cold-start segment (negative: unknown;
        exporters/candidates.py SEGMENT_ATTRIBUTES names them)."""
        return {a: int(getattr(self.features, a)) for a in SEGMENT_ATTRIBUTES}

    @functools.cached_property
    def recent_items(self) -> list[int]:
        recent = np.asarray(self.features.recent_items, dtype=np.int64)
        return recent[recent != PAD].tolist()  # type: ignore[no-any-return]

    @functools.cached_property
    def seen_items(self) -> np.ndarray:
        """Everything never to recommend again: the seen items (newest first), then any
        recent item not among them (a push of either list may be the newer)."""
        seen = self.features.seen_items
        recent = np.asarray(self.recent_items, dtype=np.int64)
        extra = recent[~np.isin(recent, seen)] if len(recent) else recent
        return np.concatenate([extra, seen]) if len(extra) else seen

    @functools.cached_property
    def affinity(self) -> np.ndarray:
        """Category affinity with the release's width (zeros for users without events)."""
        aff = np.zeros(self.layout.n_categories, dtype=np.float32)
        raw = self.features.category_affinity[: self.layout.n_categories]
        aff[: len(raw)] = raw
        return aff

    def tower_inputs(self) -> dict[str, np.ndarray]:
        """user_tower inputs, named by its config.pbtxt: each is the Feast feature (or the
        entity key) of the same name, as a batch of one."""
        out = {}
        for name in self.tower_input_names:
            value = np.asarray(getattr(self.features, name), dtype=np.int64).reshape(1, -1)
            out[name] = value
        return out

    def rank_inputs(
        self,
        embedding: np.ndarray,
        items: ItemFeatures,
        item_embeddings: np.ndarray,
        now: float,
        source_features: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """The rank ensemble's inputs (model_repository/rank/config.pbtxt), feature
        columns in the order the release's ranker was trained with: the item's Feast
        features, then its candidate-source features when the release has them."""
        names = self.features.scalar_names
        user = self.features.scalars[[names.index(n) for n in self.layout.user_features]]
        per_item = items.columns(self.layout.item_features)
        if self.layout.candidate_features:
            if source_features is None or len(source_features) != len(per_item):
                raise ValueError("this release's ranker needs the candidates' source features")
            # The columns this release's ranker was trained with, by name (a release may
            # predate a source).
            cols = [CANDIDATE_FEATURES.index(n) for n in self.layout.candidate_features]
            per_item = np.concatenate([per_item, source_features[:, cols]], axis=1)
        return {
            "user_features": user.reshape(1, -1).astype(np.float32),
            "user_category_affinity": self.affinity.reshape(1, -1),
            "user_embedding": np.asarray(embedding, dtype=np.float32).reshape(1, -1),
            "item_features": np.ascontiguousarray(per_item, dtype=np.float32),
            "item_category": items.category.astype(np.int64),
            "item_created_at": items.created_at.astype(np.float64),
            "item_embedding": np.ascontiguousarray(item_embeddings, dtype=np.float32),
            "request_time": np.array([now], dtype=np.float64),
        }


class ReleaseFeatures:
    """The feature client as the service uses it (UserView out, events in); every user
    lookup is checked against the release's users (``watch``)."""

    def __init__(
        self,
        online: OnlineFeatures,
        tower_inputs: tuple[str, ...],
        layout: Layout,
        watch: StoreWatch | None = None,
    ) -> None:
        self.online = online
        self.tower_inputs = tower_inputs
        self.layout = layout
        self.watch = watch or StoreWatch(None)

    def user(self, user_id: int) -> UserView:
        features = self.online.user(user_id)
        missing = self.watch.record(user_id, features.known)
        return UserView(features, self.tower_inputs, self.layout, missing)

    def items(self, item_ids: np.ndarray) -> ItemFeatures:
        return self.online.items(item_ids)

    def push_event(self, e: EventQuery) -> None:
        self.online.push_event(e.user_id, e.item_id, e.event, e.timestamp)


def _release_users(folder: Path, manifest: dict[str, Any]) -> np.ndarray | None:
    """The release's user ids (exporters/release.py USERS_FILE), None for a release
    written before them (its users are then not checked against the store)."""
    entry = manifest.get("users")
    if entry is None:
        log.warning(
            "release %s has no user list: lost users are not flagged", manifest["release_id"]
        )
        return None
    users = np.load(folder / entry["file"])
    if len(users) != int(entry["n_users"]):
        raise ValueError(
            f"{folder / entry['file']} holds {len(users)} users, the manifest {entry['n_users']}"
        )
    return users


def _release_item_keys(folder: Path, manifest: dict[str, Any]) -> dict[int, str]:
    """The release's item key table (exporters/release.py ITEM_KEYS_FILE): internal id ->
    the client's key, for items imported by key; empty for integer-id data."""
    entry = manifest.get("item_keys")
    if entry is None:
        return {}
    table = pd.read_parquet(folder / entry["file"])
    keys = dict(zip(table["item_id"].tolist(), table["item_key"].tolist(), strict=True))
    if len(keys) != int(entry["n_keys"]):
        raise ValueError(
            f"{folder / entry['file']} holds {len(keys)} item keys, the manifest {entry['n_keys']}"
        )
    return keys


def _index_vectors(index: FaissIndex) -> np.ndarray:
    """The item vectors stored in the index, row-aligned with ``index.item_ids``.

    With a refine stage (``…,RFlat``) the exact vectors are the refine index's storage:
    returned as a read-only view (no second 256 MB copy at 1M items), kept alive by the
    index. Otherwise they are reconstructed (a copy; exact for Flat/IVF-Flat)."""
    cpu = faiss.index_gpu_to_cpu(index.index) if index.on_gpu else index.index
    if isinstance(cpu, faiss.IndexRefine) and not index.on_gpu:
        flat = faiss.downcast_index(cpu.refine_index)
        if isinstance(flat, faiss.IndexFlat):
            view = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d)
            view = view.reshape(flat.ntotal, flat.d)
            view.flags.writeable = False
            return view
    ivf = faiss.try_extract_index_ivf(cpu)
    if ivf is not None:
        ivf.make_direct_map()
    return np.asarray(cpu.reconstruct_n(0, cpu.ntotal), dtype=np.float32)


@dataclass(frozen=True)
class ItemState:
    """The item side of a release built from one item-feature snapshot: the snapshot (item
    features for the ranker), the catalog (category, price, popularity ...) and the
    popular/fresh fallback lists derived from it. Replaced as a whole on refresh, so a
    request that reads ``release.items`` once sees one snapshot throughout."""

    snapshot: ItemSnapshot
    catalog: Catalog
    fallbacks: Fallbacks
    loaded_at: float  # unix s, when this state was built
    # Answers without a user (overload, timeouts, store down) depend only on the filters,
    # k and the minute: computed once per key and snapshot, so a burst of shed requests
    # costs a dict lookup each instead of post-processing on the event loop.
    anonymous_answers: dict[Any, list[Any]] = field(default_factory=dict, compare=False, repr=False)
    # Items added since the release (orchestrator/new_items.py): searched beside the index.
    added: AddedVectors | None = None

    def remember_answer(self, key: Any, items: list[Any], limit: int = 1024) -> None:
        if len(self.anonymous_answers) >= limit:
            self.anonymous_answers.clear()  # many filter sets: start over, stay bounded
        self.anonymous_answers[key] = items

    @classmethod
    def build(
        cls, snapshot: ItemSnapshot, item_ids: np.ndarray, embeddings: np.ndarray
    ) -> ItemState:
        """Catalog rows follow ``item_ids`` (the index's rows) and ``embeddings``."""
        snap = snapshot.lookup(item_ids)
        if not snap.known.all():
            log.warning(
                "%d indexed items have no online features (defaults used)", (~snap.known).sum()
            )
        catalog = Catalog.build(
            item_ids=item_ids,
            category=snap.category,
            price=snap.columns([PRICE])[:, 0],
            created_at=snap.created_at,
            popularity=-snap.columns([POPULARITY_RANK])[:, 0].astype(np.float64),
            embeddings=embeddings,
        )
        return cls(snapshot, catalog, Fallbacks.build(catalog), time.time())

    def extended(self, added: AddedItems, metric: int = faiss.METRIC_INNER_PRODUCT) -> ItemState:
        """This state (built from the index's rows alone) plus the items ``added`` since
        the release: their rows appended to the catalog, their features overlaid on the
        snapshot, their vectors searchable, the unavailable ids blocked. Costs copies of
        the per-row arrays, no sort of the catalog (an apply at 1M items stays well
        under a second)."""
        if not len(added) and not len(added.unavailable):
            return self
        base = self.catalog
        snapshot = added.overlay(self.snapshot)
        feats = snapshot.lookup(added.item_ids)
        catalog = Catalog.build(
            item_ids=np.concatenate([base.item_ids, added.item_ids]),
            category=np.concatenate([base.category, feats.category]),
            price=np.concatenate([base.price, feats.columns([PRICE])[:, 0]]),
            created_at=np.concatenate([base.created_at, feats.created_at]),
            popularity=np.concatenate(
                [base.popularity, -feats.columns([POPULARITY_RANK])[:, 0].astype(np.float64)]
            ),
            embeddings=base.embeddings,
            added_embeddings=added.embeddings,
            unavailable=added.unavailable,
        )
        new_rows = np.arange(len(base), len(catalog), dtype=np.int64)
        # Out-of-stock added items leave the search (they would fill ANN slots that every
        # request filters away); the index's own ones stay (filtered only).
        offer = ~np.isin(added.item_ids, added.unavailable)
        vectors = None
        if added.embeddings is not None and offer.any():
            vectors = AddedVectors.build(added.item_ids[offer], added.embeddings[offer], metric)
        return ItemState(
            snapshot,
            catalog,
            self.fallbacks.extended(catalog, new_rows),
            time.time(),
            added=vectors,
        )

    @property
    def materialized_until(self) -> float:
        """Unix time of the newest materialisation end the snapshot reflects (0: none)."""
        ends = [end.timestamp() for end in self.snapshot.as_of.values() if end is not None]
        return max(ends, default=0.0)


@dataclass
class ServingRelease:
    release_id: int
    manifest: dict[str, Any]
    index: FaissIndex
    items: ItemState  # swapped whole by refresh_items(); read it once per request
    features: ReleaseFeatures
    triton: TritonClient
    user_embeddings: EmbeddingCache = field(default_factory=lambda: EmbeddingCache(0))
    # Item-to-item and popular sources over the catalog rows (None: a release made before
    # multi-source candidates, served from the ANN alone).
    sources: SourceModel | None = None
    quotas: Quotas = field(default_factory=Quotas)
    post: PostprocessConfig = field(default_factory=PostprocessConfig)
    # Where the release's data ends (unix s): the clock of time-relative features is
    # capped at data_end + max_clock_lead (settings), see RecommendService.
    data_end: float = float("inf")
    # The circuit breakers its Triton and online-store calls go through: one per
    # dependency, shared with every other release the service loads with the same board.
    breakers: Breakers = field(default_factory=Breakers)
    # The same models in process (settings.model_fallback == "in_process"): answers when
    # Triton cannot (orchestrator/local_models.py); None: degrade instead.
    local: InProcessModels | None = None
    # Items added since the release: its new_items/ folder and what was applied from it
    # (exporters/item_delta.py, orchestrator/new_items.py); None: not followed (tests).
    delta_dir: Path | None = None
    added: AddedItems = field(default_factory=AddedItems)
    # The item state of the index's rows alone (what ``items`` extends with ``added``);
    # None: ``items`` has no additions yet and is its own base.
    base_items: ItemState | None = None
    # Internal item id -> the client's key (items imported by key; others answer digits).
    item_keys: dict[int, str] = field(default_factory=dict)
    _refresh_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def item_key(self, item_id: int) -> str:
        """The id the client knows ``item_id`` by (docs/data.md "Ids")."""
        return external_id(item_id, self.item_keys)

    @property
    def catalog(self) -> Catalog:
        """The current catalog (a request that needs several parts reads ``items``)."""
        return self.items.catalog

    @property
    def fallbacks(self) -> Fallbacks:
        return self.items.fallbacks

    def refresh_items(self) -> bool:
        """Reload the item snapshot if Feast materialised since, then rebuild the catalog
        and fallbacks from it and swap all three at once; True if swapped. Index rows,
        item vectors and models do not change: they belong to the release."""
        with self._refresh_lock:
            online = self.features.online
            if not online.refresh():
                return False
            old = self.base_items or self.items
            base = ItemState.build(online.snapshot, old.catalog.item_ids, old.catalog.embeddings)
            self.base_items = base
            self.items = base.extended(self.added, self.index.index.metric_type)
            log.info(
                "item snapshot refreshed: %d items (as of %s)",
                len(self.items.snapshot.ids),
                self.items.snapshot.as_of,
            )
            return True

    def apply_new_items(self) -> int:
        """Apply the segments written to this release's ``new_items/`` folder since the
        last call (in write order) and swap the item state; returns how many. A segment
        that does not load is logged and skipped (segments are checked before their
        rename, so this is a damaged disk, not a writer in progress)."""
        if self.delta_dir is None:
            return 0
        with self._refresh_lock:
            names = [n for n in segment_names(self.delta_dir) if n not in self.added.applied]
            if not names:
                return 0
            segments = []
            for name in names:
                try:
                    segments.append(read_segment(self.delta_dir / name, self.index.dim))
                except (OSError, ValueError, KeyError) as e:
                    log.error("new-items segment %s skipped: %s", name, e)
            base = self.base_items or self.items
            added = self.added.with_segments(segments, base.catalog.contains)
            added = dataclasses.replace(added, applied=added.applied | set(names))
            t0 = time.perf_counter()
            self.items = base.extended(added, self.index.index.metric_type)
            # Only new entries: the table is read (never iterated) by requests in flight.
            self.item_keys.update(added.keys())
            self.base_items, self.added = base, added
            log.info(
                "release %d: %d new-item segments applied in %.3f s (%d added items, "
                "%d unavailable)",
                self.release_id,
                len(names),
                time.perf_counter() - t0,
                len(added),
                len(added.unavailable),
            )
            return len(names)

    def search(
        self, state: ItemState, queries: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The release's index and ``state``'s added items together (``(scores, ids)``)."""
        return merged_search(self.index, state.added, queries, k)

    def search_rows(self, state: ItemState, query: np.ndarray, k: int) -> np.ndarray:
        """The catalog rows of :meth:`search` for one query, best first, unfilled slots
        dropped. The index's rows are the catalog's first rows, so without added items
        FAISS's own labels are the answer: no round trip through item ids (two gathers
        over 1M-entry tables per request)."""
        if state.added is None or state.added.index.ntotal == 0:
            _, rows = self.index.search_rows(query, k)
            return rows[0][rows[0] >= 0]
        _, ids = self.search(state, query, k)
        rows, known = state.catalog.rows(ids[0][ids[0] >= 0])
        return rows[known]

    def user_embedding(self, user: UserView, timeout_s: float) -> np.ndarray:
        """The user tower's output for ``user``: from this release's cache, else Triton
        (at the pinned version), then cached. Raises TritonError like the client."""
        inputs = user.tower_inputs()
        key = EmbeddingCache.key(inputs)
        embedding = self.user_embeddings.get(key)
        if embedding is None:
            embedding = self.triton.user_embedding(inputs, timeout_s=timeout_s)
            self.user_embeddings.put(key, embedding)
        return embedding

    def user_embedding_in_process(self, user: UserView) -> np.ndarray:
        """The user tower's output from the in-process models (when Triton failed); the
        same model and version, so it is cached like Triton's answer."""
        if self.local is None:
            raise RuntimeError(f"release {self.release_id} has no in-process models")
        inputs = user.tower_inputs()
        embedding = self.local.user_embedding(inputs)
        self.user_embeddings.put(EmbeddingCache.key(inputs), embedding)
        return embedding

    @classmethod
    def load(
        cls, settings: Settings, release_id: int | None = None, breakers: Breakers | None = None
    ) -> ServingRelease:
        """Load a release (the newest when None) and check its parts fit together. Its
        Triton and online-store calls go through ``breakers`` (pass the service's board,
        so that every release shares one breaker per dependency; None: a board of its
        own)."""
        breakers = breakers if breakers is not None else Breakers()
        t0 = time.perf_counter()
        manifest = load_manifest(settings, release_id)
        rid = int(manifest["release_id"])
        folder = release_dir(settings, rid)
        index = FaissIndex.load(
            folder / manifest["index"]["file"],
            manifest["index"],
            folder / manifest["index"]["item_ids"],
            device=settings.device,
        )
        online = OnlineFeatures(settings, breakers=breakers).load()
        items = ItemState.build(online.snapshot, index.item_ids, _index_vectors(index))
        catalog = items.catalog
        sources = None
        quotas = Quotas()
        if "candidates" in manifest:
            sources = SourceModel.load(folder / manifest["candidates"]["file"])
            if not np.array_equal(sources.item_ids, index.item_ids):
                raise ValueError(f"release {rid}: candidate sources do not match the index rows")
            quotas = Quotas.from_json(manifest["candidates"].get("quotas"))
        data_end = pd.Timestamp(str(manifest["data_snapshot"]["end"])).timestamp()
        versions = {str(k): int(v) for k, v in manifest["models"].items()}
        # The release's own rank ensemble (steps pinned to its versions), never plain
        # `rank`: see orchestrator/triton_server.py.
        versions.pop(ENSEMBLE, None)
        versions[ensemble_name(rid)] = ENSEMBLE_VERSION
        triton = TritonClient.from_settings(
            settings, versions=versions, ensemble=ensemble_name(rid), breakers=breakers
        )
        # The merged candidates go to the rank ensemble in one request: they must fit the
        # rows its config allows (the client refuses more per request, TritonClient.infer).
        cap = triton.max_rows(triton.ensemble)
        if sources is not None and cap is not None and quotas.total > cap:
            raise ValueError(
                f"release {rid}: its candidate quotas add up to {quotas.total} rows, more "
                f"than the rank ensemble takes ({cap}, "
                f"{triton.spec(triton.ensemble).max_rows_from})"
            )
        tower_inputs = tuple(input_names(USER_TOWER, settings.model_repository))
        layout = Layout.from_json(manifest["ranker"]["layout"])
        watch = StoreWatch(_release_users(folder, manifest))
        metrics.ONLINE_STORE_MISSING.labels(str(rid)).set_function(watch.missing_ratio)
        missing = sorted(set(layout.user_features) - set(online.user_feature_names)) + sorted(
            set(layout.item_features) - set(online.item_feature_names)
        )
        if missing:
            raise ValueError(
                f"release {rid}'s ranker needs features Feast does not serve: {missing}"
            )
        log.info(
            "release %d loaded in %.1f s: %d items, index %s (%s), models %s",
            rid,
            time.perf_counter() - t0,
            len(catalog),
            index.factory,
            index.search_params or "-",
            versions,
        )
        rel = cls(
            rid,
            manifest,
            index,
            items,
            ReleaseFeatures(online, tower_inputs, layout, watch),
            triton,
            EmbeddingCache(settings.user_embedding_cache),
            sources,
            quotas,
            PostprocessConfig.from_json(manifest.get("postprocess")),
            data_end,
            breakers,
            InProcessModels.for_release(settings, rid)
            if settings.model_fallback == "in_process"
            else None,
            delta_dir(settings, rid),
        )
        rel.item_keys = _release_item_keys(folder, manifest)
        rel.apply_new_items()  # a restart (or another replica) sees what was added
        return rel

    def warm_up(self, n_items: int, rounds: int = 3, probe_users: int = 32) -> None:
        """Run each model once per round before taking traffic: the first calls pay for
        channel set-up, onnxruntime/tl2cgen initialisation and Feast's first lookups.
        Also looks up ``probe_users`` of the release's users, so a store that lost them
        shows in the health detail before the first request (orchestrator/store_watch.py)."""
        for user_id in self.features.watch.probe_ids(probe_users):
            self.features.user(int(user_id))
        user = self.features.user(0)
        rows = np.arange(min(n_items, len(self.catalog)))
        items = self.features.items(self.catalog.item_ids[rows])
        source_feats = None
        if self.sources is not None:
            # A heavy user's worth of history: warms the item-to-item path as well.
            rows, source_feats = gather(
                self.sources, self.quotas, rows, rows[:200], lambda r: np.ones(len(r), bool)
            )
            items = self.features.items(self.catalog.item_ids[rows])
        for _ in range(rounds):
            embedding = self.triton.user_embedding(user.tower_inputs(), timeout_s=30)
            self.index.search(np.asarray(embedding, dtype=np.float32), n_items)
            inputs = user.rank_inputs(
                embedding, items, self.catalog.vectors(rows), time.time(), source_feats
            )
            self.triton.rank(inputs, timeout_s=30)
            if self.local is not None:  # onnxruntime/tl2cgen initialise on first use too
                self.local.user_embedding(user.tower_inputs())
                self.local.rank(inputs)

    def missing_models(self) -> list[str]:
        """Pinned models Triton does not have ready ("user_tower v3"); [] when all are."""
        return [f"{m} v{v}" for m, v in self.triton.versions.items() if not self.triton.ready(m)]

    def close(self) -> None:
        self.triton.close()
        if self.local is not None:
            self.local.close()
