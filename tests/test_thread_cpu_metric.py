"""recstack_thread_cpu_seconds_total: CPU by thread group (orchestrator/metrics.py)."""

from __future__ import annotations

import sys
import threading
import time

import pytest
from prometheus_client import generate_latest

from orchestrator.metrics import ThreadCpuCollector, thread_group

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/task")


@pytest.mark.parametrize(
    "name, is_main, comm, group",
    [
        ("MainThread", True, "python3.11", "main"),
        ("recommend_3", False, "python3.11", "recommend"),
        ("event_0", False, "python3.11", "event"),
        ("event-log", False, "python3.11", "event-log"),
        ("Thread-1 (_poll_wrapper)", False, "python3.11", "poll_wrapper"),
        (None, False, "event_engine", "native:event_engine"),
    ],
)
def test_thread_groups(name: str | None, is_main: bool, comm: str, group: str) -> None:
    assert thread_group(name, is_main, comm) == group


def _value(collector: ThreadCpuCollector, group: str) -> float:
    (family,) = collector.collect()
    return sum(s.value for s in family.samples if s.labels["thread"] == group)


def test_cpu_is_counted_per_group_and_kept_when_the_thread_ends() -> None:
    collector = ThreadCpuCollector()
    release = threading.Event()

    def burn() -> None:
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass
        release.wait(10)

    worker = threading.Thread(target=burn, name="recommend_0")
    worker.start()
    deadline = time.monotonic() + 10
    while _value(collector, "recommend") < 0.25 and time.monotonic() < deadline:
        time.sleep(0.05)
    busy = _value(collector, "recommend")
    assert busy >= 0.25  # the worker's 0.3 s of CPU, in its group
    release.set()
    worker.join()
    assert _value(collector, "recommend") >= busy  # ended threads keep their time


def test_the_orchestrator_exposes_it() -> None:
    text = generate_latest().decode()
    assert 'recstack_thread_cpu_seconds_total{thread="main"}' in text
