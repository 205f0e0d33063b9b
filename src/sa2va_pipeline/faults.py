"""A test hook that kills the process at a named point, so crash tests do not depend on timing luck.

``SA2VA_FAULT=<point>`` (or ``<point>:<file name>`` to pick one artefact) makes :func:`fault_point` send
SIGKILL to the current process when the writer reaches that point. Points used by the project's writers:

- ``before_rename``: a versioned file (CSV, JSON, PNG) is complete in its temporary file, not yet renamed.
- ``before_publish``: a versioned folder (trained model, folders of files) is complete in its staging
  folder, not yet renamed into place.

Unset (the normal case) it costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "SA2VA_FAULT"


def fault_point(point: str, name: str = "") -> None:
    """SIGKILL this process if ``SA2VA_FAULT`` names ``point`` (and, when given there, ``name``)."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    where, _, which = wanted.partition(":")
    if where == point and (not which or which == name):
        os.kill(os.getpid(), signal.SIGKILL)
