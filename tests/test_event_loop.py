"""The orchestrator (and the in-process reference) run on the event loop the settings name:
uvloop by default, Python's asyncio loop on request."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from orchestrator.server import run_loop
from recstack.settings import Settings


@pytest.mark.parametrize(("kind", "loop_type"), [("uvloop", uvloop.Loop), ("asyncio", None)])
def test_run_loop_uses_the_configured_loop(kind: str, loop_type: type | None) -> None:
    seen: list[asyncio.AbstractEventLoop] = []

    async def main() -> None:
        seen.append(asyncio.get_running_loop())
        # what the service relies on: a worker thread's result back on the loop
        assert await asyncio.get_running_loop().run_in_executor(None, sum, [1, 2]) == 3

    run_loop(main(), Settings(event_loop=kind))
    (loop,) = seen
    if loop_type is not None:
        assert isinstance(loop, loop_type)
    else:
        assert not isinstance(loop, uvloop.Loop)
    assert Settings().event_loop == "uvloop"


def test_an_unknown_loop_is_refused() -> None:
    with pytest.raises(ValueError, match="event_loop"):
        Settings(event_loop="trio")
