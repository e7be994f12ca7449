"""``python -m wsserver``: the ``wsserver`` command, for when the console script is not on
``PATH`` (a venv not activated, ``pipx run``, a container's ``python -m``)."""

from __future__ import annotations

import sys

from .cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
