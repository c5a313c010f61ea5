"""The cache helper every per-request look-up shares (`core/ttlcache.py`)."""

from __future__ import annotations

import types

import pytest

from controlplane.core import ttlcache
from controlplane.core.ttlcache import TTLCache


@pytest.mark.parametrize("drop", ["pop", "drop_where", "clear"])
def test_a_read_that_raced_with_a_drop_is_not_kept(drop: str) -> None:
    cache: TTLCache[str, str] = TTLCache(lambda: 60)
    token = cache.token()  # taken before the read
    if drop == "pop":
        cache.pop("other")
    elif drop == "drop_where":
        cache.drop_where(lambda key, _: key == "other")
    else:
        cache.clear()

    cache.put("key", "read before the drop", token)

    assert cache.get("key") is None
    cache.put("key", "read after it", cache.token())
    assert cache.get("key") == "read after it"


def test_an_entry_lives_its_ttl_from_the_read_not_from_the_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(ttlcache, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    cache: TTLCache[str, str] = TTLCache(lambda: 60)
    token = cache.token()  # the read, at t=1000
    now[0] = 1050.0
    cache.put("key", "value", token)  # stored (again) at t=1050

    now[0] = 1059.0
    assert cache.get("key") == "value"
    now[0] = 1060.5
    assert cache.get("key") is None
    cache.put("key", "value", token)  # too old to store at all
    assert cache.get("key") is None


def test_drop_where_drops_only_what_it_matches() -> None:
    cache: TTLCache[tuple[str, str], int] = TTLCache(lambda: 60)
    for org in ("acme", "globex"):
        cache.put((org, "model"), 1)

    cache.drop_where(lambda key, _: key[0] == "acme")

    assert cache.get(("acme", "model")) is None
    assert cache.get(("globex", "model")) == 1
