"""Which release serves a request, and changing that on a running orchestrator.

The router follows the release state (``exporters/release_state.py``): it holds every
release the state serves (the live one, the A/B arms) loaded side by side, and a routing
table — the arms, their split and the hash salt — that is replaced whole, so a request
reads it once and is served by exactly one release end to end (user tower, index,
candidates, ranker, catalog).

A change (:meth:`ReleaseRouter.sync`): Triton gets the new release's models next to the
old (``load_releases``); the orchestrator loads the new index and catalog beside the old,
warms them up, swaps the table; an old release is closed only when no request in flight
still uses it; then Triton unloads what no served release needs. A change that does not
fit in memory, or whose release does not load, is refused: the old table keeps serving and
the health detail says why.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from exporters.release_state import Arm, ReleaseState, ensure_state, load_state, pick_arm
from orchestrator import metrics
from orchestrator.serving_release import ServingRelease
from recstack.errors import UserError
from recstack.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoutingTable:
    """An immutable view of what serves: replaced whole on a change."""

    arms: tuple[Arm, ...]
    salt: str
    revision: int
    releases: dict[int, ServingRelease]
    live: int

    def pick(self, user_key: str) -> ServingRelease:
        return self.releases[pick_arm(list(self.arms), self.salt, user_key)]


@dataclass
class Transition:
    """The last change the router tried, for health details and the admin API."""

    revision: int
    status: str  # "done", "refused", "failed", "in progress"
    detail: str = ""
    at: float = field(default_factory=time.time)
    seconds: float = 0.0


def rss_mb() -> float:
    """This process's resident set size (MB), from /proc/self/statm."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _estimate_text(settings: Settings, rid: int) -> str:
    from exporters.release_validate import release_memory_mb

    try:
        return f"estimated {release_memory_mb(settings, rid):.0f} MB"
    except Exception as e:  # an estimate must never fail a load
        return f"no estimate: {e}"


class ReleaseRouter:
    """Holds the served releases and the routing table; changed only by :meth:`sync`
    (one at a time, on the event loop's default executor for the heavy part)."""

    def __init__(
        self,
        settings: Settings | None,
        loader: Callable[[Settings, int], ServingRelease] | None = None,
        warm_rows: int = 300,
    ) -> None:
        self._settings = settings
        self._loader = loader or (lambda s, rid: ServingRelease.load(s, rid))
        self.warm_rows = warm_rows
        self.table: RoutingTable | None = None
        self._in_flight: dict[int, int] = {}
        self._retiring: dict[int, ServingRelease] = {}
        self._lock = asyncio.Lock()
        self.last: Transition | None = None
        self.triton_repins = 0
        # RSS growth measured while each release loaded (to check release_memory_mb).
        self.rss_growth_mb: dict[int, float] = {}

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            raise RuntimeError("a fixed router follows no release state")
        return self._settings

    @property
    def follows_state(self) -> bool:
        return self._settings is not None

    @classmethod
    def fixed(cls, release: ServingRelease) -> ReleaseRouter:
        """A router serving ``release`` alone, following no state (tests, benchmarks)."""
        router = cls(None)
        rid = release.release_id  # test doubles may use any hashable id
        router.table = RoutingTable((Arm(rid, 1.0),), "", 0, {rid: release}, rid)
        metrics.set_releases({str(rid): 1.0})
        return router

    # ---------------------------------------------------------------- per request
    def acquire(self, user_key: str) -> ServingRelease:
        """The release serving ``user_key`` now; pair with :meth:`done` (loop thread)."""
        table = self.table
        if table is None:
            raise RuntimeError("no release loaded")
        rel = table.pick(user_key)
        self._in_flight[rel.release_id] = self._in_flight.get(rel.release_id, 0) + 1
        return rel

    def done(self, rel: ServingRelease) -> None:
        self._in_flight[rel.release_id] -= 1

    @property
    def live(self) -> ServingRelease:
        if self.table is None:
            raise RuntimeError("no release loaded")
        return self.table.releases[self.table.live]

    def served(self) -> list[ServingRelease]:
        return list(self.table.releases.values()) if self.table is not None else []

    # ---------------------------------------------------------------- changes
    async def sync(self) -> bool:
        """Serve what the release state says if it changed since the table was built;
        True if the table was replaced. Never raises for a bad release: it is refused
        (logged, in health details), the old table keeps serving."""
        if self._settings is None:
            return False  # a fixed router
        async with self._lock:
            state = await asyncio.to_thread(self._read_state)
            if self.table is not None and state.revision == self.table.revision:
                return False
            if (
                self.last is not None
                and self.last.revision == state.revision
                and self.last.status in ("refused", "failed")
            ):
                return False  # already refused this revision; wait for the next change
            t0 = time.perf_counter()
            self.last = Transition(state.revision, "in progress")
            try:
                table = await self._build(state)
            except (UserError, MemoryError) as e:
                self._refuse(state, "refused", str(e), t0)
                return False
            except Exception as e:  # a release that does not load
                self._refuse(state, "failed", f"{type(e).__name__}: {e}", t0)
                return False
            old = self.table
            self.table = table  # the swap: one assignment, read once per request
            metrics.set_releases({str(a.release): a.share for a in table.arms})
            metrics.RELEASE_CHANGES.labels("done").inc()
            self.last = Transition(
                state.revision, "done", _describe(table), seconds=time.perf_counter() - t0
            )
            log.info(
                "serving revision %d: %s (%.1f s)",
                state.revision,
                _describe(table),
                self.last.seconds,
            )
            if old is not None:
                gone = [r for rid, r in old.releases.items() if rid not in table.releases]
                await self._retire(gone)
                if self.settings.orchestrator_prunes_triton:
                    await asyncio.to_thread(self._prune, sorted(table.releases))
            return True

    def _read_state(self) -> ReleaseState:
        return ensure_state(self.settings) if self.table is None else load_state(self.settings)

    async def _build(self, state: ReleaseState) -> RoutingTable:
        wanted = state.serving
        if not wanted:
            raise UserError(f"no release to serve in {self.settings.releases_dir}")
        current = self.table.releases if self.table is not None else {}
        new = [rid for rid in wanted if rid not in current]
        if new and current:
            from exporters.release_validate import check_fits

            check_fits(self.settings, new)
        releases = {rid: current[rid] for rid in wanted if rid in current}
        # Triton first: the new release's models next to the old ones (best effort: a
        # Triton that is down comes back with the state's releases via `serve triton`,
        # and the watchdog re-pins what is missing).
        await asyncio.to_thread(self._load_triton, wanted)
        loaded: list[ServingRelease] = []
        try:
            for rid in new:
                rss0 = rss_mb()
                rel = await asyncio.to_thread(self._loader, self.settings, rid)
                self.rss_growth_mb[rid] = round(rss_mb() - rss0, 1)
                log.info(
                    "release %d: orchestrator RSS +%.0f MB (%s)",
                    rid,
                    self.rss_growth_mb[rid],
                    _estimate_text(self.settings, rid),
                )
                loaded.append(rel)
                try:
                    await asyncio.to_thread(rel.warm_up, self.warm_rows)
                except Exception as e:  # Triton down or slow: serve degraded, as at start-up
                    log.warning("release %d warm-up failed: %s: %s", rid, type(e).__name__, e)
                releases[rid] = rel
        except BaseException:
            for rel in loaded:
                rel.close()
            raise
        live = state.live if state.live in releases else wanted[0]
        return RoutingTable(tuple(state.routing), state.salt, state.revision, releases, live)

    def _load_triton(self, wanted: list[int]) -> None:
        from orchestrator.triton_server import load_releases

        try:
            load_releases(self.settings, wanted, keep=True)
        except UserError:
            raise
        except Exception as e:
            log.warning("could not load releases %s into Triton: %s", wanted, e)

    def _prune(self, keep: list[int]) -> None:
        from orchestrator.triton_server import prune_releases

        try:
            prune_releases(self.settings, keep)
        except Exception as e:
            log.warning("could not unload unused models from Triton: %s", e)

    async def _retire(self, gone: list[ServingRelease], limit_s: float = 60.0) -> None:
        """Close releases once no request in flight uses them (or after ``limit_s``)."""
        deadline = time.monotonic() + limit_s
        for rel in gone:
            self._retiring[rel.release_id] = rel
        while any(self._in_flight.get(r.release_id, 0) for r in gone):
            if time.monotonic() > deadline:
                log.warning("closing releases with requests still in flight after %s s", limit_s)
                break
            await asyncio.sleep(0.02)
        for rel in gone:
            self._retiring.pop(rel.release_id, None)
            self._in_flight.pop(rel.release_id, None)
            rel.close()
            log.info("release %d retired", rel.release_id)

    def _refuse(self, state: ReleaseState, status: str, detail: str, t0: float) -> None:
        self.last = Transition(state.revision, status, detail, seconds=time.perf_counter() - t0)
        metrics.RELEASE_CHANGES.labels(status).inc()
        log.error("release state revision %d %s: %s", state.revision, status, detail)
        if self.table is None:
            raise UserError(f"cannot serve the release state: {detail}")

    # ---------------------------------------------------------------- watchdog
    def check_triton(self) -> list[str]:
        """Re-pin what a served release needs and Triton no longer has ready (someone
        unloaded it, or Triton restarted without it); returns what was missing."""
        missing = sorted({m for rel in self.served() for m in rel.missing_models()})
        if missing:
            from orchestrator.triton_server import load_releases, server_live

            # Live, not ready: with --strict-readiness a missing model makes Triton not
            # ready, and that is what this repairs.
            if not server_live(self.settings):
                return missing  # Triton down: nothing to re-pin yet
            log.warning("Triton lost pinned models %s: re-pinning", missing)
            try:
                load_releases(self.settings, [r.release_id for r in self.served()], keep=True)
                self.triton_repins += 1
                metrics.TRITON_REPINS.inc()
            except Exception as e:
                log.warning("re-pinning failed: %s", e)
        return missing

    def describe(self) -> dict[str, Any]:
        """For health details and ``GET /admin/releases``."""
        table = self.table
        doc: dict[str, Any] = {
            "revision": table.revision if table else None,
            "live": table.live if table else None,
            "arms": [{"release": a.release, "share": a.share} for a in table.arms] if table else [],
            "loaded": sorted(table.releases) if table else [],
            "in_flight": {str(k): v for k, v in self._in_flight.items() if v},
            "retiring": sorted(self._retiring),
            "triton_repins": self.triton_repins,
            "rss_growth_mb": {str(k): v for k, v in self.rss_growth_mb.items()},
        }
        if self.last is not None:
            doc["last_change"] = {
                "revision": self.last.revision,
                "status": self.last.status,
                "detail": self.last.detail,
                "seconds": round(self.last.seconds, 2),
            }
        return doc


def _describe(table: RoutingTable) -> str:
    if len(table.arms) == 1:
        return f"release {table.arms[0].release}"
    return "A/B " + " / ".join(f"{a.release}:{a.share:.0%}" for a in table.arms)
