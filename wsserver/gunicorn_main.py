"""The program ``wsserver serve`` executes: gunicorn, with this copy of wsserver imported
before gunicorn touches ``sys.path``.

Why not ``python -m gunicorn``: that puts the current directory first on ``sys.path``, and
gunicorn adds its ``--chdir`` (the current directory) there too, so run from a folder holding
a ``wsserver/`` directory (a checkout's parent, a project named after it) gunicorn imported
*that* and failed with "Failed to find attribute 'create_app'". Run as a script, this file
puts the directory holding the package the ``wsserver`` command came from first, imports
``wsserver`` (cached from then on: ``wsserver.gunicorn_conf`` and ``wsserver:create_app()``
resolve to it whatever gunicorn adds to ``sys.path`` later), then runs gunicorn's own
command line. gunicorn's re-exec on USR2 runs this same file again.
"""

from __future__ import annotations

import os
import sys

__all__: list[str] = []

if __name__ == "__main__":
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from gunicorn.app.wsgiapp import run

    import wsserver  # noqa: F401 - imported first, from the directory above

    sys.exit(run())
