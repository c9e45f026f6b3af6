"""Fixtures the sidecar tests share: a recording upstream and the sidecars a test starts."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from test_sidecar_support import ServedUpstream, Sidecar, serve_upstream


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
