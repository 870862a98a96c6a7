"""recstack_thread_cpu_seconds_total: CPU by thread group (orchestrator/metrics.py)."""

from __future__ import annotations

import os
import shutil
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


def _stat(tid: int, ticks: int, start: int = 1000) -> str:
    # /proc/<pid>/task/<tid>/stat: utime and stime are fields 14-15, starttime field 22.
    fields = ["S"] + ["0"] * 10 + [str(ticks), "0"] + ["0"] * 6 + [str(start)]
    return f"{tid} (python3.11) " + " ".join(fields) + "\n"


def test_a_joined_thread_whose_task_lingers_keeps_its_group(tmp_path) -> None:
    # join() returns before the kernel task leaves /proc/self/task; CI once read the
    # lingering task under its kernel name and the group's counter fell to 0.
    tick = os.sysconf("SC_CLK_TCK")
    release = threading.Event()
    worker = threading.Thread(target=release.wait, name="recommend_0")
    worker.start()
    task = tmp_path / str(worker.native_id)
    task.mkdir()
    (task / "stat").write_text(_stat(worker.native_id, 3 * tick))
    collector = ThreadCpuCollector(tmp_path)
    assert _value(collector, "recommend") == 3
    release.set()
    worker.join()
    assert _value(collector, "recommend") == 3  # lingering task, no Python name any more
    (task / "stat").write_text(_stat(worker.native_id, 4 * tick, start=2000))
    assert _value(collector, "recommend") == 3  # tid reused by a thread that is not ours
    assert _value(collector, "native:python3.11") == 4
    shutil.rmtree(task)
    assert _value(collector, "recommend") == 3  # ended: kept
