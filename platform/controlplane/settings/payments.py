"""Payments: Stripe."""

from .env import env  # noqa: F401
