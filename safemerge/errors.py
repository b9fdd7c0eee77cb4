"""The one error type the CLI turns into a one-line message (it names the input at fault and the fix)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and what to do about it."""
