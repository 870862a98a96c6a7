"""recstack's own redis-server: start on loopback, refuse a second start, stop by pid."""

from __future__ import annotations

from pathlib import Path

import pytest
from _features_fixtures import free_port
from conftest import make_settings, require_redis_server

from orchestrator import redis_server
from orchestrator.processes import read_pid
from recstack.errors import UserError

pytestmark = [pytest.mark.integration, pytest.mark.redis]


def test_start_refuse_second_stop(tmp_path: Path) -> None:
    require_redis_server()
    s = make_settings(tmp_path, redis_port=free_port())
    proc = redis_server.start(s)
    try:
        assert redis_server.ping(s)
        assert read_pid(s, redis_server.process_name(s)) == proc.pid
        with pytest.raises(UserError, match="already runs"):
            redis_server.start(s)
        # Another checkout (its own run dir) on the same port: told whose server it is.
        other = make_settings(tmp_path / "other", redis_port=s.redis_port)
        with pytest.raises(UserError, match=f"{s.redis_port} \\(RECSTACK_REDIS_PORT\\)") as e:
            redis_server.start(other)
        assert f"pid {proc.pid} `" in str(e.value) and "recstack stop" in str(e.value)
    finally:
        assert redis_server.stop(s)
    assert not redis_server.ping(s)
    assert read_pid(s, redis_server.process_name(s)) is None
    assert not redis_server.stop(s)  # nothing left to stop


def test_missing_redis_server_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set-up installs redis-server, so under CI its absence is a failure, not a skip."""
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="must run, not skip"):
        require_redis_server()
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception):
        require_redis_server()
