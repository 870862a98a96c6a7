"""recstack/atomic_files.py: whole-file replacement, nothing half-written left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from recstack.atomic_files import write_json_atomic, write_text_atomic


@pytest.mark.parametrize("fsync", [False, True])
def test_writes_and_replaces(tmp_path: Path, fsync: bool) -> None:
    path = tmp_path / "new" / "state.json"  # the folder is made
    write_json_atomic(path, {"a": 1}, fsync=fsync)
    write_json_atomic(path, {"a": 2}, fsync=fsync)
    assert json.loads(path.read_text()) == {"a": 2}
    assert path.read_text().endswith("\n")
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_a_failed_write_keeps_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "report.md"
    write_text_atomic(path, "old")

    def fail(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]
