"""The event log: what was served and what users did, appended to rotating JSON-lines files.

Two kinds of records (one JSON object per line; docs/events.md has the full format):

- ``served``: ``{"kind": "served", "at_us", "request_id", "user_id", "release", "surface",
  "items": [[item_id, rank, source, sources, ranked], ...], "degraded": [...],
  "cold_start", "fallback_segment"}``
- ``event``: ``{"kind": "event", "at_us", "ts_us", "user_id", "item_id", "event",
  "request_id"}`` (``request_id`` "" when the client sent none)

``at_us`` is the server's wall clock when the record was made, ``ts_us`` the event's own
timestamp (the client's, or the server's when none was sent); both integer microseconds,
the raw tables' precision, so an imported event is bit-for-bit the logged one.

Why JSON lines, not parquet: a record is appended the moment it is written, a crash leaves
at most one partial last line (readers drop it), and the open segment can be read while it
grows; a parquet file is unreadable until its footer is written and small row groups make
poor columns. Volume is modest (a served list of 10 items is ~400 bytes).

Durability and cost (DESIGN.md: the request path must not wait for a disk):
- :meth:`EventLog.served` / :meth:`EventLog.event` append a tuple to a bounded queue and
  return (about a microsecond); a full queue drops the record and counts it
  (``recstack_event_log_dropped_total{reason="queue_full"}``), never blocks.
- One writer thread serialises and appends, and flushes + fsyncs every ``flush_ms`` or
  ``flush_records`` records, whichever comes first. The writer sleeps between flushes:
  a record does not wake it (only a batch of ``flush_records``, a ``flush()`` or
  ``close()`` does). Woken per record, as with ``queue.Queue.get``, it cost ~3 context
  switches and ~0.1 ms of CPU per answer at 100/s, on the same two cores as the workers.
  A process or machine crash loses at most the records queued or written in the last
  ``flush_ms`` (200 ms by default).
- Files: ``seg-<UTC start>-<pid>.jsonl.open`` while written; past ``segment_bytes`` (and at
  shutdown) it is fsynced and renamed to ``.jsonl`` (closed, never written again). At
  start-up an ``.open`` segment left by a dead process is cut after its last complete line
  and closed. Closed segments beyond ``max_bytes`` in total are deleted oldest first
  (``recstack_event_log_segments_deleted_total``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge

from recstack.atomic_files import fsync_dir

if TYPE_CHECKING:
    from orchestrator.request import EventQuery, RecommendQuery
    from orchestrator.service import RecommendResult
    from recstack.settings import Settings

log = logging.getLogger(__name__)

OPEN_SUFFIX = ".jsonl.open"
CLOSED_SUFFIX = ".jsonl"
PREFIX = "seg-"
KINDS = ("served", "event")
_OPEN_HERE: set[Path] = set()  # segments this process is writing (never "recovered")

RECORDS = Counter("recstack_event_log_records_total", "Records written to the event log", ["kind"])
DROPPED = Counter(
    "recstack_event_log_dropped_total",
    "Event log records lost before reaching a file",
    ["reason"],  # queue_full (the writer falls behind), write_error (disk full, I/O error)
)
SEGMENTS_DELETED = Counter(
    "recstack_event_log_segments_deleted_total",
    "Closed event log segments deleted to keep the folder under RECSTACK_EVENT_LOG_MAX_BYTES",
)
QUEUE_DEPTH = Gauge("recstack_event_log_queue_depth", "Records waiting for the writer thread")


@dataclass(frozen=True)
class LogConfig:
    """Where and how the log is written (settings ``event_log_*``, ``events_dir``)."""

    folder: Path
    flush_ms: float = 200.0
    flush_records: int = 1_000
    queue_size: int = 100_000
    segment_bytes: int = 64 << 20
    max_bytes: int = 2 << 30

    def __post_init__(self) -> None:
        if self.max_bytes < 2 * self.segment_bytes:
            raise ValueError(
                f"event log: max_bytes ({self.max_bytes}) must be at least twice "
                f"segment_bytes ({self.segment_bytes}): the newest closed segment is kept"
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> LogConfig:
        return cls(
            folder=settings.events_dir,
            flush_ms=settings.event_log_flush_ms,
            flush_records=settings.event_log_flush_records,
            queue_size=settings.event_log_queue,
            segment_bytes=settings.event_log_segment_bytes,
            max_bytes=settings.event_log_max_bytes,
        )


def now_us() -> int:
    return time.time_ns() // 1000


# Request ids: 64 random bits per process + a counter, 32 hex digits. uuid4 reads
# os.urandom on every call (~15 µs measured under load here, vs ~1 µs for this).
_id_state: list[Any] = []


def _reset_ids() -> None:
    _id_state[:] = [os.urandom(8).hex(), itertools.count()]


_reset_ids()
os.register_at_fork(after_in_child=_reset_ids)  # a forked child must not repeat ids


def new_request_id() -> str:
    """A new id for an answer: unique across processes (random prefix) and within one."""
    prefix, counter = _id_state
    return f"{prefix}{next(counter):016x}"


def _us(when: datetime) -> int:
    """Integer µs since the epoch, exactly (float seconds would round some values)."""
    delta = when.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


# A served record's item: these fields of the answered item (RecItem.served), by position
# to keep records small (readers index them: exporters/ab_report.py takes [0]).
LOGGED_ITEM_FIELDS = ("item_id", "rank", "source", "sources", "ranked")


def served_record(at_us: int, q: RecommendQuery, result: RecommendResult) -> dict[str, Any]:
    return {
        "kind": "served",
        "at_us": at_us,
        "request_id": result.request_id,
        "user_id": q.user_id,
        "release": result.release,
        "surface": q.surface,
        "device": q.device,
        "items": [[s[f] for f in LOGGED_ITEM_FIELDS] for s in (i.served() for i in result.items)],
        "degraded": list(result.degraded),
        "cold_start": result.cold_start,
        "fallback_segment": result.fallback_segment,
    }


def event_record(at_us: int, e: EventQuery) -> dict[str, Any]:
    return {
        "kind": "event",
        "at_us": at_us,
        "ts_us": _us(e.timestamp),
        "user_id": e.user_id,
        "item_id": e.item_id,
        "event": e.event,
        "request_id": e.request_id,
    }


class EventLog:
    """The writer: cheap, never-blocking ``served``/``event`` calls on the request path,
    one background thread doing the I/O. A disabled log (``EventLog(None)``) ignores
    everything."""

    def __init__(self, cfg: LogConfig | None) -> None:
        self.cfg = cfg
        # deque appends and pops are atomic: producers never take a lock; the bound is
        # checked before the append, so concurrent producers may pass it by a few records.
        self._queue: deque[tuple[str, int, Any, Any]] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # a full batch, a flush() or close(): write now
        self._file: Any = None
        self._path: Path | None = None
        self._size = 0
        if cfg is None:
            return
        cfg.folder.mkdir(parents=True, exist_ok=True)
        recover_open_segments(cfg.folder)
        enforce_retention(cfg.folder, cfg.max_bytes)  # the limit may have been lowered
        self._queue = deque()
        QUEUE_DEPTH.set_function(self._queue.__len__)
        self._thread = threading.Thread(target=self._run, name="event-log", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(cls, settings: Settings) -> EventLog:
        """The log the settings ask for (disabled when ``event_log`` is off)."""
        return cls(LogConfig.from_settings(settings) if settings.event_log else None)

    @property
    def enabled(self) -> bool:
        return self._queue is not None

    # ------------------------------------------------------------------ request path
    def served(self, q: RecommendQuery, result: RecommendResult) -> None:
        """Log an answer (after it is final). Never raises, never blocks."""
        self._put(("served", now_us(), q, result))

    def event(self, e: EventQuery) -> None:
        """Log an event the store accepted. Never raises, never blocks."""
        self._put(("event", now_us(), e, None))

    def _put(self, item: tuple[str, int, Any, Any]) -> None:
        q = self._queue
        if q is None or self.cfg is None or self._stop.is_set():
            return
        depth = len(q)
        if depth >= self.cfg.queue_size:
            DROPPED.labels("queue_full").inc()
            return
        q.append(item)
        if depth + 1 >= self.cfg.flush_records:
            self._wake.set()

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        assert self._queue is not None and self.cfg is not None
        flush_s = self.cfg.flush_ms / 1000
        q = self._queue
        while True:
            self._wake.wait(flush_s)
            self._wake.clear()
            stopping = self._stop.is_set()  # before the drain: close() wants what came first
            batch: list[tuple[str, int, Any, Any]] = []
            waiters: list[threading.Event] = []
            with contextlib.suppress(IndexError):
                while True:
                    item = q.popleft()
                    if item[0] == "flush":
                        waiters.append(item[2])
                    else:
                        batch.append(item)
            if batch:
                self._write(batch)
            for w in waiters:
                w.set()
            if stopping:
                self._close_segment()
                return

    def _write(self, batch: list[tuple[str, int, Any, Any]]) -> None:
        """Append the batch, rotating whenever the segment passes ``segment_bytes``, then
        flush and fsync. Records count as written once fsynced; on an I/O error the rest
        of the batch is dropped and counted."""
        assert self.cfg is not None
        durable = 0  # records of this batch already fsynced (in a closed segment)
        pending: list[str] = []  # kinds written since
        try:
            for kind, at_us, a, b in batch:
                rec = served_record(at_us, a, b) if kind == "served" else event_record(at_us, a)
                line = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
                if self._file is None:
                    self._open_segment()
                self._file.write(line)
                self._size += len(line)
                pending.append(kind)
                if self._size >= self.cfg.segment_bytes:
                    self._close_segment(strict=True)
                    durable += len(pending)
                    self._count(pending)
                    enforce_retention(self.cfg.folder, self.cfg.max_bytes)
            if self._file is not None:
                self._file.flush()
                os.fsync(self._file.fileno())
            self._count(pending)
        except OSError as e:  # disk full, folder removed ...: count, keep serving
            lost = len(batch) - durable
            DROPPED.labels("write_error").inc(lost)
            log.warning("event log: %d records not written: %s", lost, e)
            self._abandon_segment()

    @staticmethod
    def _count(kinds: list[str]) -> None:
        for kind in kinds:
            RECORDS.labels(kind).inc()
        kinds.clear()

    def _open_segment(self) -> None:
        assert self.cfg is not None
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        self._path = self.cfg.folder / f"{PREFIX}{stamp}-{os.getpid()}{OPEN_SUFFIX}"
        self._file = open(self._path, "ab")  # noqa: SIM115 - lives across batches
        _OPEN_HERE.add(self._path)
        self._size = 0

    def _close_segment(self, strict: bool = False) -> None:
        """fsync and rename the open segment to its closed name (readers may rely on it);
        ``strict``: an I/O error propagates (the caller counts the loss), else it is
        logged."""
        if self._file is None or self._path is None:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.rename(self._path, closed_name(self._path))
            _fsync_dir(self._path.parent)
        except OSError as e:
            if strict:
                raise
            log.warning("event log: cannot close segment %s: %s", self._path, e)
        _OPEN_HERE.discard(self._path)
        self._file = self._path = None
        self._size = 0

    def _abandon_segment(self) -> None:
        with contextlib.suppress(OSError):
            if self._file is not None:
                self._file.close()
        if self._path is not None:
            with contextlib.suppress(OSError):
                close_segment_file(self._path)
            _OPEN_HERE.discard(self._path)
        self._file = self._path = None

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything logged before this call is written and fsynced (tests,
        tools); True when it was within ``timeout_s``."""
        if self._queue is None or self._thread is None:
            return True
        done = threading.Event()
        self._queue.append(("flush", 0, done, None))  # past the bound: it holds no record
        self._wake.set()
        return done.wait(timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued, close the segment (renamed to ``.jsonl``), stop."""
        if self._thread is None:
            return
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)
        self._thread = None


def closed_name(path: Path) -> Path:
    return path.with_name(path.name[: -len(OPEN_SUFFIX)] + CLOSED_SUFFIX)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (the directory entry), where the OS allows it."""
    with contextlib.suppress(OSError):
        fsync_dir(folder)


def _owner_alive(path: Path) -> bool:
    """Whether the process that writes ``path`` (pid in its name) is running."""
    try:
        pid = int(path.name[: -len(OPEN_SUFFIX)].rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        # Ours, or a previous life of this pid (a container restarts as pid 1).
        return path in _OPEN_HERE
    from orchestrator.processes import pid_alive

    return pid_alive(pid)


def close_segment_file(path: Path) -> Path:
    """Cut ``path`` after its last complete line and rename it closed."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    target = closed_name(path)
    os.rename(path, target)
    _fsync_dir(path.parent)
    return target


def recover_open_segments(folder: Path) -> list[Path]:
    """Close the ``.open`` segments of processes that are gone (a crash, SIGKILL)."""
    recovered = []
    for path in sorted(folder.glob(PREFIX + "*" + OPEN_SUFFIX)):
        if not _owner_alive(path):
            recovered.append(close_segment_file(path))
            log.info("event log: recovered %s", recovered[-1].name)
    return recovered


def closed_segments(folder: Path) -> list[Path]:
    """Closed segments, oldest first (names start with their UTC creation time)."""
    return sorted(folder.glob(PREFIX + "*" + CLOSED_SUFFIX))


def enforce_retention(folder: Path, max_bytes: int) -> int:
    """Delete the oldest closed segments (never the newest) while all closed ones exceed
    ``max_bytes``; returns how many were deleted (each counted and logged)."""
    segs = [(p, p.stat().st_size) for p in closed_segments(folder)]
    total = sum(s for _, s in segs)
    deleted = 0
    for path, size in segs[:-1]:  # never the newest: it holds the latest records
        if total <= max_bytes:
            break
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        total -= size
        deleted += 1
        SEGMENTS_DELETED.inc()
        log.warning("event log: deleted %s (%d bytes) to stay under %d", path.name, size, max_bytes)
    return deleted


# ---------------------------------------------------------------------------------- reading
def _lines(path: Path, complete_only: bool) -> Iterator[bytes]:
    data = path.read_bytes()
    if complete_only:  # the writer may be half-way through the last line
        data = data[: data.rfind(b"\n") + 1]
    yield from data.splitlines()


def read_records(
    folder: Path,
    since_us: int | None = None,
    kinds: Iterable[str] = KINDS,
    include_open: bool = True,
) -> Iterator[dict[str, Any]]:
    """Records of the log in ``folder`` (closed segments, then the open ones up to their
    last complete line), optionally only those made at or after ``since_us``. A line
    that is not a JSON object of a known kind is skipped with one warning per file."""
    wanted = set(kinds)
    if not folder.is_dir():
        return
    files = [(p, False) for p in closed_segments(folder)]
    if include_open:
        files += [(p, True) for p in sorted(folder.glob(PREFIX + "*" + OPEN_SUFFIX))]
    for path, is_open in files:
        bad = 0
        try:
            lines = list(_lines(path, is_open))
        except FileNotFoundError:  # closed or deleted since listed
            if is_open and closed_name(path).exists():
                lines = list(_lines(closed_name(path), False))
            else:
                continue
        for line in lines:
            try:
                rec = json.loads(line)
                kind = rec["kind"]
                at = int(rec["at_us"])
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            if kind in wanted and (since_us is None or at >= since_us):
                yield rec
        if bad:
            log.warning("event log: %s: skipped %d unreadable lines", path.name, bad)
