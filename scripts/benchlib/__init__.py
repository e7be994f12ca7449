"""Helpers for ``scripts/bench``: the load generator (raw-socket WebSocket clients), the
notification poster, and gunicorn process management/measurement. Standard library only."""
