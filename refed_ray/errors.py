"""Errors a user can fix. The CLI prints them as one clear message, without a traceback."""


class UserError(Exception):
    """Bad input, bad config or an unusable output location: exit 2, message only."""
