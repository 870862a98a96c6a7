"""The reference's command line (loadtest/reference.py) without servers: its ports, its
own event log folder, and the release it picks."""

from __future__ import annotations

import pytest

from loadtest.reference import reference_release_id, reference_settings
from recstack.errors import UserError
from recstack.settings import Settings


def test_ports_default_after_the_grpc_port_and_events_go_apart(settings: Settings) -> None:
    ref = reference_settings(settings, 35052)
    assert (
        ref.orchestrator_grpc_port,
        ref.orchestrator_http_port,
        ref.orchestrator_metrics_port,
        ref.orchestrator_admin_port,
    ) == (35052, 35053, 35054, 35055)
    # Its served answers must not reach the log that `data import-events` trains on.
    assert ref.events_dir == settings.events_dir / "reference"
    assert ref.model_repository == settings.model_repository
    given = reference_settings(settings, 35052, 35082, 35102, 35103)
    assert given.orchestrator_metrics_port == 35102 and given.orchestrator_admin_port == 35103


@pytest.mark.parametrize(
    ("ports", "needle"),
    [((0,), "is not a TCP port"), ((70000,), "is not a TCP port"), ((35052, 35052), "differ")],
)
def test_bad_ports_are_refused(settings: Settings, ports: tuple[int, ...], needle: str) -> None:
    with pytest.raises(UserError, match=needle):
        reference_settings(settings, *ports)


def test_release_defaults_to_the_live_one_and_refuses_an_empty_workspace(
    settings: Settings,
) -> None:
    assert reference_release_id(settings, 7) == 7
    with pytest.raises(UserError, match="no release to serve"):
        reference_release_id(settings, None)
