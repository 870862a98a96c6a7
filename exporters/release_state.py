"""The stack's release state: which release is live, the A/B arms and their split, and the
history of every change (who, when, why). One JSON file, ``<releases_dir>/state.json``,
is the single source of truth: the orchestrator serves what it says (it watches the file),
``recstack serve triton`` loads what it names, and ``recstack release promote/rollback/ab``
change it.

Writes are atomic (temporary file, fsync, rename, fsync of the folder) and serialised by
an exclusive ``flock`` on ``state.lock``, so a reader never sees half a file and two CLIs
cannot interleave. Without a state file the newest release is live (a fresh clone's first
``recstack train`` needs no extra step); the first change writes the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recstack.atomic_files import write_json_atomic
from recstack.errors import UserError
from recstack.settings import Settings

STATE_FILE = "state.json"
LOCK_FILE = "state.lock"
# Salt of the arm hash: a new A/B test gets a fresh one unless told otherwise, so users
# are not always in the "B" side of every experiment.
_HASH_BYTES = 8


@dataclass(frozen=True)
class Arm:
    release: int
    share: float  # 0 < share <= 1; the arms' shares sum to 1


@dataclass
class ReleaseState:
    """What the stack serves. ``live`` answers every request unless an A/B test is on, in
    which case ``arms`` (with ``salt``) split users by a stable hash of their id."""

    live: int | None = None
    previous: list[int] = field(default_factory=list)  # earlier live releases, newest last
    arms: list[Arm] = field(default_factory=list)
    salt: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    revision: int = 0  # +1 per change: the orchestrator compares it to what it serves

    # ---------------------------------------------------------------- reading
    @property
    def routing(self) -> list[Arm]:
        """The arms requests are split over (the live release alone when no A/B test)."""
        if self.arms:
            return list(self.arms)
        return [Arm(self.live, 1.0)] if self.live is not None else []

    @property
    def serving(self) -> list[int]:
        """Releases that must be loaded (in Triton and the orchestrator), live first."""
        out = [a.release for a in self.routing]
        if self.live is not None and self.live not in out:
            out.insert(0, self.live)
        return out

    def status(self, release_id: int) -> str:
        """live, "A/B arm 10%", retired (was live once) or candidate."""
        for arm in self.arms:
            if arm.release == release_id:
                tag = "live, " if release_id == self.live else ""
                return f"{tag}A/B arm {arm.share:.0%}"
        if release_id == self.live:
            return "live"
        if release_id in self.previous or any(
            h.get("release") == release_id and h.get("action") in ("promote", "bootstrap")
            for h in self.history
        ):
            return "retired"
        return "candidate"

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["arms"] = [asdict(a) for a in self.arms]
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ReleaseState:
        arms = [Arm(int(a["release"]), float(a["share"])) for a in doc.get("arms") or []]
        live = doc.get("live")
        return cls(
            live=None if live is None else int(live),
            previous=[int(r) for r in doc.get("previous") or []],
            arms=arms,
            salt=str(doc.get("salt") or ""),
            history=list(doc.get("history") or []),
            revision=int(doc.get("revision") or 0),
        )

    # ---------------------------------------------------------------- changing
    def record(self, action: str, reason: str | None = None, **details: Any) -> None:
        self.revision += 1
        self.history.append(
            {
                "revision": self.revision,
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
                "who": _who(),
                "action": action,
                **details,
                **({"reason": reason} if reason else {}),
            }
        )


def pick_arm(arms: list[Arm], salt: str, user_key: str) -> int:
    """The release of ``user_key``'s arm: a stable hash of (salt, user) mapped to [0, 1)
    and cut by the arms' cumulative shares. Same user, same arm, for the whole test."""
    if len(arms) == 1:
        return arms[0].release
    digest = hashlib.blake2b(f"{salt}:{user_key}".encode(), digest_size=_HASH_BYTES).digest()
    u = int.from_bytes(digest, "big") / float(1 << (8 * _HASH_BYTES))
    acc = 0.0
    for arm in arms:
        acc += arm.share
        if u < acc:
            return arm.release
    return arms[-1].release  # rounding: the shares sum to 1 within float error


def parse_split(text: str, n_arms: int) -> list[float]:
    """``"90/10"`` -> [0.9, 0.1]: positive integers (percent) summing to 100."""
    parts = text.split("/")
    if len(parts) != n_arms or not all(p.strip().isdigit() for p in parts):
        raise UserError(f"--split {text!r}: give {n_arms} whole percentages like 90/10")
    values = [int(p) for p in parts]
    if sum(values) != 100 or min(values) <= 0:
        raise UserError(f"--split {text!r}: each share > 0 and together 100")
    return [v / 100 for v in values]


def _who() -> str:
    with contextlib.suppress(Exception):
        return os.environ.get("RECSTACK_ACTOR") or getpass.getuser()
    return "unknown"


def state_path(settings: Settings) -> Path:
    return settings.releases_dir / STATE_FILE


def load_state(settings: Settings) -> ReleaseState:
    """The recorded state; without a file, the newest release is live (nothing written)."""
    path = state_path(settings)
    if path.exists():
        try:
            return ReleaseState.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path} is not a valid release state: {e}") from e
    from exporters.release import release_ids

    ids = release_ids(settings)
    return ReleaseState(live=ids[-1] if ids else None)


def save_state(settings: Settings, state: ReleaseState) -> None:
    """Write ``state`` atomically and durably: readers see the old file or the new one,
    never a part, also after a power cut."""
    write_json_atomic(state_path(settings), state.to_json(), fsync=True)


@contextlib.contextmanager
def locked_state(settings: Settings, wait: bool = False) -> Iterator[ReleaseState]:
    """Hold the state lock while changing the state; the caller saves it explicitly (the
    commit point), so an exception before ``save_state`` changes nothing. Without
    ``wait`` a held lock is an error (two release changes at once are a mistake)."""
    settings.releases_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.releases_dir / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise UserError(
                "another release change is in progress (state.lock is held); wait for it"
            ) from None
        try:
            yield load_state(settings)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_state(settings: Settings) -> ReleaseState:
    """The state, written once (as a "bootstrap" of the newest release) when there is no
    file yet, so that a later ``recstack train`` publishes a candidate instead of silently
    changing what a restarted process serves."""
    if state_path(settings).exists():
        return load_state(settings)
    with locked_state(settings, wait=True) as state:
        if state.live is not None and not state_path(settings).exists():
            state.record("bootstrap", release=state.live)
            save_state(settings, state)
        return state


def state_mtime(settings: Settings) -> float:
    """Modification time of the state file (0 when absent): the orchestrator's cheap poll."""
    try:
        return state_path(settings).stat().st_mtime_ns / 1e9
    except FileNotFoundError:
        return 0.0
