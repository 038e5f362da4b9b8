"""session-worker: atomic backup-session coordination over Redis (queue, workers, HTTP shim)."""

__version__ = "0.1.0"
