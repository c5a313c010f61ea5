from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from django.conf import settings
from django.core.cache import cache

from tests.support.people import Person, join, sign_up


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    # Throttle counters live in the (real) Redis cache: start every test clean.
    cache.clear()


@pytest.fixture(autouse=True)
def _clean_media() -> Iterator[None]:
    # Stored objects live on the local filesystem in tests: each test starts empty.
    shutil.rmtree(settings.MEDIA_ROOT, ignore_errors=True)
    yield
    shutil.rmtree(settings.MEDIA_ROOT, ignore_errors=True)


@pytest.fixture
def alice(db: None) -> Person:
    """Owner of Acme."""
    return sign_up("alice@acme.test", "Acme")


@pytest.fixture
def bob(alice: Person) -> Person:
    """Alice's teammate, a developer in Acme."""
    return join(alice.organization, "bob@acme.test", "developer")


@pytest.fixture
def charlie(db: None) -> Person:
    """An outsider: owner of another organization."""
    return sign_up("charlie@globex.test", "Globex")


@pytest.fixture(autouse=True)
def _close_the_database_thread() -> Iterator[None]:
    # Code run by `asyncio.run` (not `async_to_sync`) does its thread-sensitive database
    # look-ups on asgiref's one process-wide thread: close its connection after the test,
    # or the test database could not be dropped.
    yield
    from asgiref.sync import SyncToAsync
    from django.db import connections

    SyncToAsync.single_thread_executor.submit(connections.close_all).result()
