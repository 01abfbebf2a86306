"""Errors of a service's process, as opposed to a flow's records."""


class StartupError(RuntimeError):
    """The service cannot start here; the message says why, in one line."""


class ClusterPeerLostError(RuntimeError):
    """A process of a multi-process Bytewax cluster stopped or became unreachable.

    A Bytewax cluster cannot continue with fewer processes than it started
    with: every process stops (exit code 3 for a service) and the whole
    cluster must be restarted. Committed offsets only cover finished
    records, so the restart loses nothing.
    """
