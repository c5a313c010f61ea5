"""Errors an attempt reports as `failed` with a code the user can act on."""

from __future__ import annotations


class TrainingError(Exception):
    """A failure with a stable `code` and a message that says what to change.

    `retryable` tells the control plane whether another attempt could succeed
    unchanged (a storage outage) or not (a malformed training file).
    """

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


class StaleAttempt(Exception):
    """The control plane has moved on to another attempt: stop without a word."""
