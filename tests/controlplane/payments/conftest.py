from __future__ import annotations

from collections.abc import Iterator

import pytest

from controlplane.payments import access
from tests.support.localstripe import localstripe, stripe_settings  # noqa: F401


@pytest.fixture(autouse=True)
def _fresh_standing_cache() -> Iterator[None]:
    # The billing-standing cache is per process: no test sees another's verdicts.
    access.standing_cache_clear()
    yield
    access.standing_cache_clear()
