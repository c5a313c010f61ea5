"""Billing: metering, limits, budgets, plans."""

from .env import env  # noqa: F401
