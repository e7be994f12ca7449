"""End-to-end tests: each starts the real server (gunicorn, ``support.GunicornServer``) or runs
the ``wsserver`` command in a subprocess. In-process tests of each module are in ``tests/``."""
