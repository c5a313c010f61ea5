"""Browser tests: Playwright drives Debian's chromium (headless) against the real processes.

The stack is the one `deploy/Procfile` runs, as `atelier …` subprocesses on the test
PostgreSQL and Redis: `atelier web` (uvicorn, ASGI) and the control, GPU and inference
workers, with Stripe pointed at localstripe. The browser is `/usr/bin/chromium` from
Debian (`apt-get install chromium`); Playwright never downloads one. Every request the
browser makes outside 127.0.0.1 is aborted and recorded, and the tests assert there is
none. Screenshots (full-page PNG) go to tests/browser/artifacts/.

Run with `make browser-test` (kept out of the default `make test` for time).
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator

import pytest
from playwright.sync_api import Browser, Route, sync_playwright

from tests.browser.helpers import ARTIFACTS, CHROMIUM, Browse, Stack, loopback
from tests.support.jobs import purge_broker
from tests.support.localstripe import (  # noqa: F401
    API_KEY,
    WEBHOOK_SECRET,
    LocalStripe,
    localstripe,
    stripe_settings,
)
from tests.support.processes import asgi_server, worker

#: Short heartbeats, one thread each: the two-core CI machine runs all four processes.
ENV = {
    "INFERENCE_SILENCE_SECONDS": "3",
    "INFERENCE_HEARTBEAT_SECONDS": "1",
    "JOBS_HEARTBEAT_SECONDS": "1",
    "TORCH_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
}

# Playwright's sync API runs an asyncio loop on this thread, so Django would refuse the
# test's own ORM calls (set-up and checks) as async-unsafe. For the test process only:
# the server and the workers are started with the variable emptied (see `stack`).
os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Note a failed test, so its browser fixture leaves a screenshot of where it stopped."""
    report = yield
    if report.when == "call" and report.failed:
        item.stash[FAILED] = True
    return report


@pytest.fixture(scope="module")
def stack(
    django_db_setup: None,
    localstripe: LocalStripe,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """`atelier web` and the control, GPU and inference workers, as deploy/Procfile runs them."""
    purge_broker()
    tmp = tmp_path_factory.mktemp("browser-stack")
    env = {
        **ENV,
        "STRIPE_API_KEY": API_KEY,
        "STRIPE_API_BASE": localstripe.url,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "DJANGO_ALLOW_ASYNC_UNSAFE": "",
    }
    with (
        worker("control", tmp / "control", **env),
        worker("gpu", tmp / "gpu", **env),
        worker("inference", tmp / "inference", **env),
        asgi_server(tmp / "web", **env) as server,
    ):
        kinds = ("control", "gpu", "inference")
        yield Stack(server.url, [server.log, *(tmp / kind / f"{kind}.log" for kind in kinds)])


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (never a download)")
    for old in ARTIFACTS.glob("*.png"):  # this run's screenshots only
        old.unlink()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            # Nothing of the browser's own reaches out (updates, sync, safe browsing).
            args=["--no-sandbox", "--disable-background-networking", "--disable-sync"],
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def browse(browser: Browser, stack: Stack, request: pytest.FixtureRequest) -> Iterator[Browse]:
    """A fresh browser context (no cookies) whose requests outside 127.0.0.1 are aborted."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    session = Browse(page=context.new_page(), base_url=stack.url)

    def guard(route: Route) -> None:
        if loopback(route.request.url):
            route.continue_()
        else:
            session.outside.append(route.request.url)
            route.abort()

    context.route("**/*", guard)
    session.page.on("pageerror", lambda exc: session.errors.append(str(exc)))
    try:
        yield session
        if request.node.stash.get(FAILED, False):
            session.shot(f"FAILED-{request.node.name[:60]}")
    finally:
        context.close()
