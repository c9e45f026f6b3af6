"""Fixtures the sidecar tests share: a recording upstream and the sidecars a test starts."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings
from test_sidecar_support import ServedUpstream, Sidecar, serve_upstream

# Under CI the property and fuzz tests replay the same inputs every run (a finding is made on a
# developer's machine, where it can be looked at); elsewhere they explore new ones each time.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")


@pytest.fixture
def upstream(request: pytest.FixtureRequest) -> Iterator[ServedUpstream]:
    """A recording upstream that counts only this test's calls."""
    served = serve_upstream()
    served.servicer.reset(tag=request.node.name)
    yield served
    served.stop()


@pytest.fixture
def started() -> Iterator[list[Sidecar]]:
    """Sidecars a test starts; all killed at teardown."""
    processes: list[Sidecar] = []
    yield processes
    for process in processes:
        process.kill()
