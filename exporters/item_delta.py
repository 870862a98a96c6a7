"""Items that arrive after a release (item cold start): ``recstack items add/remove`` and
the orchestrator's ``POST /admin/items`` (docs/data.md, "New items").

An item file (CSV or parquet, the importer's item columns) is checked exactly like
``recstack data import`` checks one (exporters/data_import.py: a bad value is refused
naming the file, the line/row and the column; nothing is written). Each served release's
own ``item_tower`` on Triton (the version the release pins) embeds the items in batches,
and the result is written as a *delta segment* beside the release's index:
``<releases_dir>/<id>/new_items/<time_ns>-<pid>-<kind>.npz``. A segment is written to a
dot-named temporary file, read back and checked, then renamed: a reader (an orchestrator
replica polling the folder) sees a whole segment or none. Marks (``unavailable`` /
``available``: out of stock and back) are segments too, so a restart replays everything in
order.

Segments are the one source of truth for what was added; the orchestrator applies them
(orchestrator/new_items.py) and ``recstack items fold`` writes the added items into the
raw item table so the next ``recstack train`` makes them part of the catalog.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from exporters import data_import as di
from exporters.tower_inputs import item_inputs, take
from recstack.atomic_files import fsync_dir
from recstack.errors import UserError
from recstack.ids import ID_LIMIT, InvalidId, internal_id
from recstack.settings import Settings, get_settings

log = logging.getLogger(__name__)

DELTA_DIR = "new_items"
KINDS = ("add", "unavailable", "available")
_NAME = re.compile(r"^(\d{20})-(\d+)-(add|unavailable|available)\.npz$")
# One JSON body of POST /admin/items at most (the admin app's body limit follows it).
MAX_ITEMS_PER_CALL = 100_000


@dataclass
class NewItems:
    """Validated attributes of items to add, in file order; ``where(i)`` names row i of
    the source in messages (``line N`` of a CSV file, ``row N`` otherwise)."""

    source: str
    item_ids: np.ndarray  # int64
    category: np.ndarray  # int64
    brand: np.ndarray  # int64
    price: np.ndarray  # float64
    created_at: np.ndarray  # float64 unix seconds
    where: Callable[[int], str]
    # The client's id of each row when it was a key (UUID, SKU; recstack/ids.py), else "".
    item_keys: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.str_))

    def __len__(self) -> int:
        return len(self.item_ids)

    def frame(self) -> pd.DataFrame:
        """The rows as the raw item table holds them (exporters/raw_tables.py columns)."""
        return pd.DataFrame(
            {
                "item_id": self.item_ids,
                "category": self.category,
                "brand": self.brand,
                "price": self.price,
                "created_at": pd.to_datetime(self.created_at, unit="s", utc=True),
            }
        )

    def fail(self, row: int, column: str, problem: str) -> UserError:
        return UserError(f"{self.source}: {self.where(row)}, column {column!r}: {problem}")

    def name(self, row: int) -> str:
        """Row ``row``'s id as the client wrote it."""
        key = str(self.item_keys[row]) if len(self.item_keys) else ""
        return repr(key) if key else str(int(self.item_ids[row]))


def _no_labels(src: Any, col: str) -> None:
    """Codes must be numbers here: the importer maps text labels to 1, 2, ... in sorted
    order of *its* file, which a file of new items cannot reproduce."""
    if not src.has(col):
        return
    arr = src.col(col)
    if not di._is_text(arr):
        return
    null = di._nulls(arr)
    bad = ~null & ~di._matches(arr, di._NUM_RE)
    if bad.any():
        pos = di._first(bad)
        raise src.fail(
            pos,
            col,
            f"{src.value(col, pos)!r} is a label; new items need the catalog's numeric code "
            "(the import mapped labels to codes, see docs/data.md)",
        )


def _validate(src: Any, now: float | None = None) -> NewItems:
    """The importer's item checks on one source (di._Source)."""
    di.apply_column_map(src, "items", {})  # logs the columns it ignores
    src.need("item_id")
    keys = di._Keys()
    ids = di._ids(src, "item_id", what="item id", keys=keys)
    di._unique(src, "item_id", ids)
    for col in ("category", "brand"):
        _no_labels(src, col)
    category, brand = di._codes(src, "category"), di._codes(src, "brand")
    price = di._price(src)
    created_us = (
        di._timestamps(src, "created_at", allow_null=True)
        if src.has("created_at")
        else np.full(len(ids), di._NAT)
    )
    now = time.time() if now is None else now
    # An item without a creation time is created now: it exists from its ingestion on.
    created = np.where(created_us == di._NAT, now, created_us / 1e6)
    return NewItems(
        str(src.path),
        ids,
        category,
        brand,
        price,
        created.astype(np.float64),
        src.where,
        item_keys=key_column(ids, keys.keys),
    )


def key_column(item_ids: np.ndarray, keys: Mapping[int, str]) -> np.ndarray:
    """Each id's key ("" for an integer id), aligned with ``item_ids``."""
    return np.array(
        [keys.get(int(i), "") for i in item_ids] if keys else [""] * len(item_ids), dtype=np.str_
    )


def read_items(path: Path) -> NewItems:
    """Check a CSV/parquet item file like ``recstack data import --items`` does."""
    return _validate(di.read_source(Path(path), "items"))


def items_from_json(rows: object, source: str = "request body") -> NewItems:
    """The same checks on a JSON list of item objects (``POST /admin/items``); values are
    read as text, as from a CSV file, so one rule judges both. ``row N`` is 1-based."""
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{source}: 'items' must be a non-empty list of objects")
    if len(rows) > MAX_ITEMS_PER_CALL:
        raise UserError(f"{source}: {len(rows)} items, at most {MAX_ITEMS_PER_CALL} per call")
    columns: dict[str, list[str | None]] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{source}: row {i + 1} is not an object")
        for key in row:
            columns.setdefault(str(key).strip().lower(), [None] * len(rows))
    for i, row in enumerate(rows):
        for key, value in row.items():
            text = None if value is None else str(value)
            if isinstance(value, bool | dict | list):
                # Never a number nor a key ("<" is outside the key charset): refused by
                # the column's check, whatever the column.
                text = f"<{type(value).__name__} {value!r}>"
            columns[str(key).strip().lower()][i] = text
    table = pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()})
    return _validate(di._Source(Path(source), table, is_csv=False))


def refuse_known(
    items: NewItems, known: np.ndarray | Callable[[np.ndarray], np.ndarray], release_id: int
) -> None:
    """Refuse the first item already in the release's catalog (index or earlier adds);
    ``known`` is the catalog's ids or a function giving the mask of ids it holds."""
    dup = known(items.item_ids) if callable(known) else np.isin(items.item_ids, known)
    if dup.any():
        pos = di._first(dup)
        raise items.fail(
            pos,
            "item_id",
            f"item {items.name(pos)} is already in release {release_id}'s catalog "
            "(only new items can be added; mark it unavailable/available instead)",
        )


# ----------------------------------------------------------------------------- segments
@dataclass(frozen=True)
class Segment:
    """One delta segment: added items with their vectors, or a mark on existing items."""

    name: str
    kind: str
    item_ids: np.ndarray  # int64
    category: np.ndarray  # int64 (add only; else empty)
    brand: np.ndarray
    price: np.ndarray
    created_at: np.ndarray  # float64 unix s
    embeddings: np.ndarray  # float32 [n, dim] (add only)
    written_at: float  # unix s, when the segment became visible (latency measurements)
    # Added items' keys ("" for integer ids; add only). Absent from segments written
    # before string ids: read as all "".
    item_keys: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.str_))


def delta_dir(settings: Settings, release_id: int) -> Path:
    from exporters.release import release_dir

    return release_dir(settings, release_id) / DELTA_DIR


def segment_names(folder: Path) -> list[str]:
    """Finished segments in write order (temporary files start with a dot)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if _NAME.match(n))


def _check(seg: Segment, dim: int | None) -> None:
    n = len(seg.item_ids)
    if seg.kind not in KINDS:
        raise ValueError(f"segment {seg.name}: unknown kind {seg.kind!r}")
    if len(np.unique(seg.item_ids)) != n or (seg.item_ids < 0).any():
        raise ValueError(f"segment {seg.name}: item ids are not unique non-negative integers")
    if seg.kind != "add":
        return
    for col in ("category", "brand", "price", "created_at", "item_keys"):
        if len(getattr(seg, col)) != n:
            raise ValueError(
                f"segment {seg.name}: {col} has {len(getattr(seg, col))} rows, not {n}"
            )
    e = seg.embeddings
    if e.ndim != 2 or len(e) != n or (dim is not None and e.shape[1] != dim):
        raise ValueError(f"segment {seg.name}: embeddings {e.shape}, expected [{n}, {dim}]")
    if not np.isfinite(e).all() or not np.isfinite(seg.price).all():
        raise ValueError(f"segment {seg.name}: non-finite embeddings or prices")


def read_segment(path: Path, dim: int | None = None) -> Segment:
    """Load and check one segment (ValueError naming it when it is not a whole one)."""
    name = path.name.lstrip(".").removesuffix(".tmp")
    with np.load(path, allow_pickle=False) as z:
        seg = Segment(
            name=name,
            kind=str(z["kind"]),
            item_ids=z["item_ids"].astype(np.int64),
            category=z["category"].astype(np.int64),
            brand=z["brand"].astype(np.int64),
            price=z["price"].astype(np.float64),
            created_at=z["created_at"].astype(np.float64),
            embeddings=z["embeddings"].astype(np.float32),
            written_at=float(z["written_at"]),
            item_keys=(
                z["item_keys"].astype(np.str_)
                if "item_keys" in z.files
                else np.full(len(z["item_ids"]) if str(z["kind"]) == "add" else 0, "", np.str_)
            ),
        )
    _check(seg, dim)
    return seg


def write_segment(
    folder: Path,
    kind: str,
    item_ids: np.ndarray,
    items: NewItems | None = None,
    embeddings: np.ndarray | None = None,
) -> Path:
    """Write a segment atomically (temporary file, fsync, read back and check, rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{time.time_ns():020d}-{os.getpid()}-{kind}.npz"
    tmp, final = folder / f".{name}.tmp", folder / name
    empty_i, empty_f = np.zeros(0, np.int64), np.zeros(0, np.float64)
    arrays = {
        "kind": np.array(kind),
        "item_ids": np.asarray(item_ids, dtype=np.int64),
        "category": items.category if items is not None else empty_i,
        "brand": items.brand if items is not None else empty_i,
        "price": items.price if items is not None else empty_f,
        "created_at": items.created_at if items is not None else empty_f,
        "embeddings": np.zeros((0, 0), np.float32)
        if embeddings is None
        else np.ascontiguousarray(embeddings, dtype=np.float32),
        "item_keys": _keys_of(items) if items is not None else np.zeros(0, np.str_),
    }
    try:
        with open(tmp, "wb") as f:
            np.savez(f, written_at=np.array(time.time()), **arrays)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        dim = arrays["embeddings"].shape[1] if kind == "add" else None
        read_segment(tmp, dim)  # what a reader will load, checked before anyone can
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)  # the rename survives a power cut
    return final


def _keys_of(items: NewItems) -> np.ndarray:
    if len(items.item_keys) == len(items):
        return items.item_keys.astype(np.str_)
    return np.full(len(items), "", np.str_)


def added_ids(settings: Settings, release_id: int) -> np.ndarray:
    """Every item id the release's add segments hold."""
    folder = delta_dir(settings, release_id)
    ids = [
        read_segment(folder / n).item_ids for n in segment_names(folder) if n.endswith("add.npz")
    ]
    return np.concatenate(ids) if ids else np.zeros(0, np.int64)


# ----------------------------------------------------------------------------- ingestion
def embedding_time(manifest: Mapping[str, Any]) -> pd.Timestamp:
    """When the release measured item ages for its index (exporters/index_build.py): new
    items are embedded with ages at the same instant (clipped at 0), like the catalog."""
    at = manifest["index"].get("item_embeddings_at") or manifest["data_snapshot"]["end"]
    t = pd.Timestamp(str(at))
    return t.tz_localize("UTC") if t.tzinfo is None else t


def embed(
    infer: Callable[[dict[str, np.ndarray]], np.ndarray],
    items: NewItems,
    at: pd.Timestamp,
    batch: int,
) -> np.ndarray:
    """Item-tower vectors of ``items`` (inputs as exporters/tower_inputs.py builds them for
    the index), ``batch`` rows per call."""
    inputs = item_inputs(items.frame(), items.item_ids, at)
    parts = [infer(take(inputs, slice(i, i + batch))) for i in range(0, len(items), batch)]
    out = np.concatenate(parts).astype(np.float32, copy=False)
    if out.shape[0] != len(items) or not np.isfinite(out).all():
        raise ValueError(f"item_tower answered {out.shape} for {len(items)} items, or non-finite")
    return out


def add_to_release(
    folder: Path,
    manifest: Mapping[str, Any],
    items: NewItems,
    known: np.ndarray | Callable[[np.ndarray], np.ndarray],
    infer: Callable[[dict[str, np.ndarray]], np.ndarray],
    batch: int,
) -> Path:
    """Check ``items`` against the release's ``known`` ids, embed them with its item tower
    (``infer``) and write the add segment into ``folder`` (its ``new_items/``)."""
    refuse_known(items, known, int(manifest["release_id"]))
    emb = embed(infer, items, embedding_time(manifest), batch)
    return write_segment(folder, "add", items.item_ids, items, emb)


Known = np.ndarray | Callable[[np.ndarray], np.ndarray]


def refuse_unknown(
    item_ids: np.ndarray, known: Mapping[int, Known], given: Sequence[object] | None = None
) -> None:
    """Refuse ids some release's catalog (``known`` by release id: its ids, or a mask
    function) does not hold, naming the first as the client wrote it (``given``: the raw
    values ``item_ids`` were parsed from). Every release is checked before any is marked."""
    for rid, k in known.items():
        held = k(item_ids) if callable(k) else np.isin(item_ids, k)
        if not held.all():
            pos = int(np.flatnonzero(~held)[0])
            name = given[pos] if given is not None else int(item_ids[pos])
            raise UserError(
                f"item {name} is not in release {rid}'s catalog ({int((~held).sum())} unknown "
                "ids); nothing was marked"
            )


def mark(folder: Path, release_id: int, item_ids: np.ndarray, kind: str, known: Known) -> Path:
    """Write an ``unavailable``/``available`` segment; ids must be in the catalog."""
    if kind not in ("unavailable", "available"):
        raise ValueError(f"kind must be unavailable or available, got {kind!r}")
    ids = np.unique(np.asarray(item_ids, dtype=np.int64))
    refuse_unknown(ids, {release_id: known})
    return write_segment(folder, kind, ids)


def parse_ids(values: Sequence[object], source: str = "item_ids") -> np.ndarray:
    """Item ids from the command line or a JSON list: non-negative integers (JSON numbers
    or digits) or the catalog's keys (SKUs; recstack/ids.py's rule, hashed as on import)."""
    if not isinstance(values, list | tuple) or not values:
        raise UserError(f"{source}: expected a non-empty list of item ids")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int | str):
            raise UserError(f"{source}[{i}]: {v!r} is not an item id (an integer or a key)")
        try:
            out.append(v if isinstance(v, int) and v >= 0 else internal_id(str(v).strip()))
        except InvalidId as e:
            raise UserError(f"{source}[{i}]: {v!r}: {e}") from None
        if out[-1] >= ID_LIMIT:
            raise UserError(f"{source}[{i}]: {v!r} is out of range (below 2**63)")
    return np.asarray(out, dtype=np.int64)


# ----------------------------------------------------------------------------- carrying
@dataclass
class Replayed:
    """A release's segments replayed in order: its added items (first add of an id wins,
    as the orchestrator applies them) and the ids out of stock at the end."""

    added: NewItems
    unavailable: set[int]


def replay(folder: Path, source: str) -> Replayed:
    segs = [read_segment(folder / n) for n in segment_names(folder)]
    adds = [s for s in segs if s.kind == "add"]
    cols = {
        c: np.concatenate([getattr(s, c) for s in adds]) if adds else np.zeros(0)
        for c in ("item_ids", "category", "brand", "price", "created_at", "item_keys")
    }
    _, first = np.unique(cols["item_ids"], return_index=True)
    keep = np.sort(first)
    unavailable: set[int] = set()
    for seg in segs:
        if seg.kind == "unavailable":
            unavailable.update(seg.item_ids.tolist())
        elif seg.kind == "available":
            unavailable.difference_update(seg.item_ids.tolist())
    added = NewItems(
        source,
        cols["item_ids"][keep].astype(np.int64),
        cols["category"][keep].astype(np.int64),
        cols["brand"][keep].astype(np.int64),
        cols["price"][keep].astype(np.float64),
        cols["created_at"][keep].astype(np.float64),
        lambda i: f"added item {i + 1}",
        item_keys=cols["item_keys"][keep].astype(np.str_),
    )
    return Replayed(added, unavailable)


def _take(items: NewItems, mask: np.ndarray) -> NewItems:
    return dataclasses.replace(
        items,
        item_ids=items.item_ids[mask],
        category=items.category[mask],
        brand=items.brand[mask],
        price=items.price[mask],
        created_at=items.created_at[mask],
        item_keys=items.item_keys[mask],
    )


def carry(
    settings: Settings,
    sources: Sequence[int],
    target: int,
    infer: Callable[[dict[str, np.ndarray]], np.ndarray] | None,
    batch: int = 256,
) -> tuple[int, int]:
    """Give release ``target`` what was added to the catalog since it was built: the items
    added to the ``sources`` (the releases that served before a change, live first) that
    its catalog lacks, embedded by *its* item tower (``infer``), and the live source's
    out-of-stock state for the items both hold. Without it a promotion or a rollback would
    drop every item added since the target was trained (``recstack train`` folds them in
    only for the releases it builds). Idempotent; returns ``(items added, ids re-marked)``.
    ``infer`` None: count only (Triton is down; nothing is written)."""
    from exporters.release import load_manifest

    sources = [r for r in sources if r != target]
    if not sources:
        return 0, 0
    folder = delta_dir(settings, target)
    base = _known(settings, target)
    replayed = {
        rid: replay(delta_dir(settings, rid), f"release {rid}'s new items") for rid in sources
    }
    pending: list[NewItems] = []
    seen = np.zeros(0, np.int64)
    for rid in sources:
        added = replayed[rid].added
        fresh = ~np.isin(added.item_ids, base) & ~np.isin(added.item_ids, seen)
        if fresh.any():
            pending.append(_take(added, fresh))
            seen = np.concatenate([seen, added.item_ids[fresh]])
    n_new = int(sum(len(p) for p in pending))
    if infer is None:
        return n_new, 0
    manifest = load_manifest(settings, target)
    for items in pending:
        add_to_release(folder, manifest, items, base, infer, batch)
        base = np.concatenate([base, items.item_ids])
    # The live source's stock state wins for the items both catalogs hold.
    live = sources[0]
    live_known = _known(settings, live)
    want = replayed[live].unavailable
    have = replay(folder, "").unavailable
    shared = set(np.intersect1d(base, live_known).tolist())
    off = np.array(sorted((want - have) & shared), np.int64)
    on = np.array(sorted((have - want) & shared), np.int64)
    if len(off):
        write_segment(folder, "unavailable", off)
    if len(on):
        write_segment(folder, "available", on)
    return n_new, len(off) + len(on)


def carry_all(settings: Settings, sources: Sequence[int], targets: Sequence[int]) -> list[str]:
    """:func:`carry` into each of ``targets`` through its pinned item tower on Triton;
    lines to print. Triton down: say what waits for `recstack items carry`."""
    from exporters.release import model_versions
    from orchestrator.triton_client import TritonClient
    from orchestrator.triton_server import server_ready

    lines = []
    up = server_ready(settings)
    for rid in targets:
        if not up:
            n, _ = carry(settings, sources, rid, None)
            if n:
                lines.append(
                    f"release {rid}: {n:,} items added to releases {list(sources)} are not in "
                    f"its catalog and Triton is not running: run `recstack items carry "
                    f"--from {sources[0]}` once it is"
                )
            continue
        with TritonClient.from_settings(
            settings, versions=model_versions(settings, rid), timeout_s=60.0
        ) as triton:
            n, m = carry(settings, sources, rid, triton.item_embedding, triton.item_batch())
        if n or m:
            lines.append(
                f"release {rid}: carried {n:,} added items and {m:,} stock marks from "
                f"releases {[r for r in sources if r != rid]}"
            )
    return lines


# ----------------------------------------------------------------------------- commands
def _served(settings: Settings) -> list[int]:
    from exporters.release_state import load_state

    served = load_state(settings).serving
    if not served:
        raise UserError("no release is published: run `recstack train` first")
    return list(served)


def _known(settings: Settings, release_id: int) -> np.ndarray:
    from exporters.release import load_manifest, release_dir

    manifest = load_manifest(settings, release_id)
    base = np.load(release_dir(settings, release_id) / manifest["index"]["item_ids"])
    return np.concatenate([base.astype(np.int64), added_ids(settings, release_id)])


def _reload_orchestrators(settings: Settings) -> str:
    """Ask every orchestrator to apply the new segments now (each also polls the folder)."""
    from exporters.release_ops import _admin_all

    docs = _admin_all(settings, "POST", "/admin/items/reload", 60.0)
    answered = [n for n, d in docs.items() if d is not None]
    if not answered:
        return "no orchestrator answers: it applies the segments when it starts"
    return f"applied by {', '.join(sorted(answered))}"


def cli_add(args: argparse.Namespace) -> int:
    """``recstack items add FILE``: check, embed on Triton per served release, persist."""
    from orchestrator.triton_client import TritonClient
    from orchestrator.triton_server import server_ready

    settings = get_settings()
    items = read_items(Path(args.file))
    releases = _served(settings)
    known = {rid: _known(settings, rid) for rid in releases}
    for rid in releases:  # every check before the first write: a refusal changes nothing
        refuse_known(items, known[rid], rid)
    if not server_ready(settings):
        raise UserError(
            "Triton is not running: new items are embedded by the release's item_tower on "
            "Triton (`recstack serve triton --detach`); nothing was added"
        )
    from exporters.release import load_manifest, model_versions

    t0 = time.perf_counter()
    for rid in releases:
        with TritonClient.from_settings(
            settings, versions=model_versions(settings, rid), timeout_s=60.0
        ) as triton:
            path = add_to_release(
                delta_dir(settings, rid),
                load_manifest(settings, rid),
                items,
                known[rid],
                triton.item_embedding,
                triton.item_batch(),
            )
        print(f"release {rid}: {len(items):,} items -> {path}")
    took = time.perf_counter() - t0
    print(f"embedded and written in {took:.2f} s; {_reload_orchestrators(settings)}")
    return 0


def cli_remove(args: argparse.Namespace) -> int:
    """``recstack items remove ID ...`` (``--available``: back in stock)."""
    settings = get_settings()
    ids = parse_ids(list(args.item_ids), "item ids")
    kind = "available" if args.available else "unavailable"
    releases = _served(settings)
    known = {rid: _known(settings, rid) for rid in releases}
    refuse_unknown(ids, known, list(args.item_ids))
    for rid in releases:
        path = mark(delta_dir(settings, rid), rid, ids, kind, known[rid])
        print(f"release {rid}: {len(ids)} items {kind} -> {path}")
    print(_reload_orchestrators(settings))
    return 0


def fold(settings: Settings, release_id: int | None = None) -> int:
    """Append the live release's added items to the raw item table (the next ``recstack
    train`` embeds and indexes them like any other item); returns how many were new."""
    from exporters.raw_tables import read_keys, read_meta, read_raw, write_raw
    from exporters.release_state import load_state

    rid = release_id if release_id is not None else load_state(settings).live
    if rid is None:
        raise UserError("no release is live: run `recstack train` first")
    added = replay(delta_dir(settings, rid), f"release {rid}'s new items").added
    if not len(added):
        return 0
    frame = added.frame().assign(item_key=added.item_keys)
    tables = read_raw(settings)
    frame = frame[~frame["item_id"].isin(tables.items["item_id"])]
    if frame.empty:
        return 0
    keys = read_keys(settings)  # the imported data's string ids stay named
    keyed = frame.loc[frame["item_key"] != "", ["item_id", "item_key"]]
    if len(keyed):
        keys["items"] = pd.concat([keys.get("items"), keyed], ignore_index=True)
    frame = frame.drop(columns="item_key")
    old = tables.items
    frame = frame.astype({c: old[c].dtype for c in frame.columns if c in old.columns})
    items = pd.concat([old, frame], ignore_index=True)
    tables = dataclasses.replace(
        tables, items=items.sort_values("item_id", kind="stable", ignore_index=True)
    )
    meta = read_meta(settings.raw_dir)
    extra = {
        k: v
        for k, v in meta.items()
        if k in ("import_columns", "item_created_at", "seen_events", "id_keys")
    }
    write_raw(
        settings,
        tables,
        source=f"{meta.get('source', 'raw')}+new_items(r{rid})",
        extra_meta=extra,
        keys=keys,
    )
    return len(frame)


def cli_carry(args: argparse.Namespace) -> int:
    """``recstack items carry --from R``: release R's added items (and stock marks) into
    every served release that lacks them (promotions do this themselves when Triton runs)."""
    settings = get_settings()
    if args.source not in _release_ids(settings):
        raise UserError(f"release {args.source} does not exist")
    lines = carry_all(settings, [args.source], _served(settings))
    print("\n".join(lines) or "nothing to carry: every served release has them")
    if lines:
        print(_reload_orchestrators(settings))
    return 0


def _release_ids(settings: Settings) -> list[int]:
    from exporters.release import release_ids

    return list(release_ids(settings))


def cli_fold(args: argparse.Namespace) -> int:
    """``recstack items fold``: added items into the raw item table, before a train."""
    settings = get_settings()
    n = fold(settings, args.release)
    print(f"{n:,} added items written to the raw item table ({settings.raw_dir})")
    return 0
