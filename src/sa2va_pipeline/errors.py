"""Errors the user can fix: raised with a message that says what is wrong and what to do.

Raise :class:`UserError` (or a subclass) for an anticipated problem with the user's data, settings or run
order: a missing or empty input folder, nothing trained yet, an unreadable checkpoint. The project's
``kedro run`` (``sa2va_pipeline.cli``) prints such an error as ONE short message and exits with status 2,
without a traceback; set ``SA2VA_DEBUG=1`` to see the traceback too. Anything else is a bug and keeps its
traceback.

    from sa2va_pipeline.errors import UserError
    raise UserError(f"{folder} holds no image files; put .png/.jpg files there or pass another folder.")
"""

from __future__ import annotations

import os

# Environment switch: show the full traceback of anticipated errors as well.
DEBUG_ENV = "SA2VA_DEBUG"
# Exit status of a run stopped by a UserError (1 stays for bugs, as in Kedro).
USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """An anticipated problem the user can fix; its message names the file or setting and the fix."""


def debug_enabled() -> bool:
    """True when ``SA2VA_DEBUG`` is set to a true value (1, true, yes, on)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class DamagedArtefactError(UserError):
    """A saved artefact differs from the completeness record its writer left (truncated or modified)."""
