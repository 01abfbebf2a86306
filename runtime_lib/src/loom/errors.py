"""Errors of a service's process, as opposed to a flow's records."""


class StartupError(RuntimeError):
    """The service cannot start here; the message says why, in one line."""
