"""Inference requests through the real ASGI application, in-process (httpx's ASGI
transport): the serving router answers them, as under `atelier web`.

`serve` is blocking: it runs the request under `async_to_sync`, so the router's
thread-sensitive database look-ups (the key, the model) run on the test's thread, in
its transaction. Admission's look-ups (plan, standing, limits, prices, budgets) run in
other threads: a test whose admission must see its own rows is `transaction=True`.
It returns once the request is settled (the settlement runs after the response), and
closes the database connection those other threads opened (else the test database
could not be dropped at the end).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
from asgiref.sync import async_to_sync
from django.db import connections

T = TypeVar("T")


async def aserve(
    path: str,
    body: Any = None,
    *,
    key: str | None = None,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    return await isolated(_post(path, body, key=key, content=content, headers=headers))


async def isolated(work: Awaitable[T]) -> T:
    """`work`, then every settlement it began; the connection of its database thread
    closed after."""
    from controlplane.serving.call import settled

    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1)  # admission's look-ups: one thread, closed
    loop.set_default_executor(executor)
    try:
        result = await work
        await settled()
        return result
    finally:
        await loop.run_in_executor(None, connections.close_all)
        executor.shutdown()


async def _post(
    path: str, body: Any, *, key: str | None, content: bytes | None, headers: dict[str, str] | None
) -> httpx.Response:
    from controlplane.asgi import application

    sent = dict(headers or {})
    if key is not None:
        sent.setdefault("Authorization", f"Bearer {key}")
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        if content is not None:
            sent.setdefault("Content-Type", "application/json")
            response = await client.post(path, content=content, headers=sent, timeout=60)
        else:
            response = await client.post(path, json=body, headers=sent, timeout=60)
    return response


def serve(
    path: str,
    body: Any = None,
    *,
    key: str | None = None,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    return async_to_sync(aserve)(path, body, key=key, content=content, headers=headers)
