from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.jobs import purge_broker


@pytest.fixture(autouse=True)
def _empty_job_queues() -> Iterator[None]:
    """Jobs are sent to the (real) broker: every test starts and ends with empty queues."""
    purge_broker()
    yield
    purge_broker()
