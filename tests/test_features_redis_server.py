"""recstack's own redis-server: start on loopback, refuse a second start, stop by pid."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _features_fixtures import free_port
from conftest import make_settings

from orchestrator import redis_server
from orchestrator.processes import read_pid
from recstack.errors import UserError

pytestmark = [pytest.mark.integration, pytest.mark.redis]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_start_refuse_second_stop(tmp_path: Path) -> None:
    s = make_settings(tmp_path, redis_port=free_port())
    proc = redis_server.start(s)
    try:
        assert redis_server.ping(s)
        assert read_pid(s, redis_server.process_name(s)) == proc.pid
        with pytest.raises(UserError, match="already runs"):
            redis_server.start(s)
    finally:
        assert redis_server.stop(s)
    assert not redis_server.ping(s)
    assert read_pid(s, redis_server.process_name(s)) is None
    assert not redis_server.stop(s)  # nothing left to stop
