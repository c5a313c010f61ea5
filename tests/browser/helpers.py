"""What the browser tests share: a browsing session on the stack, screenshots, polling."""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from playwright.sync_api import Page, expect

CHROMIUM = Path("/usr/bin/chromium")
#: Where the screenshots go (gitignored; the README names it).
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
T = TypeVar("T")
#: One numbering for the whole session: the files sort in the order the pages were seen.
_SHOT_NUMBERS = itertools.count(1)


def wait_for(check: Callable[[], T | None], what: str, timeout: float = 120) -> T:
    """The first truthy value of `check()`, polled until `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def loopback(url: str) -> bool:
    """Whether a request the browser makes stays on this machine (127.0.0.1)."""
    parts = urlsplit(url)
    if parts.scheme in ("data", "blob", "about"):
        return True  # no network at all
    return parts.hostname == "127.0.0.1"


@dataclass
class Stack:
    """The running processes: the web server's URL and every process's log."""

    url: str
    logs: list[Path]

    def tracebacks(self) -> dict[str, int]:
        """How many tracebacks each process logged (a handled refusal logs none)."""
        found = {log.stem: log.read_text(errors="replace").count("Traceback") for log in self.logs}
        return {name: n for name, n in found.items() if n}


@dataclass
class Browse:
    """One browser context on the stack: its page, what it tried outside, its screenshots."""

    page: Page
    base_url: str
    outside: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    shots: list[Path] = field(default_factory=list)

    def goto(self, path: str) -> None:
        response = self.page.goto(self.base_url + path)
        assert response is not None
        assert response.ok, (path, response.status, self.page.content()[:2000])

    def shot(self, name: str, page: Page | None = None) -> Path:
        """A full-page PNG of the page (by default the main one), numbered in the order taken."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{next(_SHOT_NUMBERS):02d}-{name}.png"
        (page or self.page).screenshot(path=str(path), full_page=True)
        self.shots.append(path)
        return path

    def login(self, email: str, password: str) -> None:
        self.goto("/admin/login/")
        self.page.fill("input[name=username]", email)
        self.page.fill("input[name=password]", password)
        self.shot("admin-login")
        self.page.click("input[type=submit]")
        expect(self.page).to_have_url(re.compile(r"/admin/$"))

    def success(self) -> str:
        """The text of the page's success message (Django `messages`)."""
        message = self.page.locator(".messagelist .success").first
        expect(message).to_be_visible()
        return message.inner_text()

    def error(self) -> str:
        """The text of the page's error message (Django `messages`)."""
        message = self.page.locator(".messagelist .error").first
        expect(message).to_be_visible()
        return message.inner_text()

    def assert_stayed_local(self) -> None:
        assert self.outside == [], f"requests outside 127.0.0.1: {self.outside}"
        assert self.errors == [], f"JavaScript errors on the pages: {self.errors}"
