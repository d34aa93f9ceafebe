"""Errors a user can fix. The CLI prints them as one clear message, without a traceback."""


class UserError(Exception):
    """Bad input, bad config or an unusable output location: exit 2, message only."""


class RunStopped(Exception):
    """The run stopped for the infrastructure (an engine or API unavailable past the patience
    allowed): exit 3, message only. Committed work is kept; resubmitting resumes."""


class RunShort(Exception):
    """The run ended with fewer than N samples: exit 4, with why and what completes it. What it
    delivered is kept (dataset/, report.json's ``shortfall``); resubmitting after the change it
    names tops the run up to N."""
