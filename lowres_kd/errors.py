"""The one exception type for a user's mistake (a recipe, a file, a folder, a run, a size).

The command line prints any ``UserError`` as one line, ``lowres-kd: error: <message>``, and
exits non-zero; anything else is a bug and keeps its traceback. Each floor's own errors
(``RecipeError``, ``BadCheckpoint``, ``NotEnoughImages``, ...) derive from it, so the command
line needs no list of them. A message says what is wrong, where, and what to do. This module
imports nothing: every floor may use it.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user, not a bug: reported in one line, without a traceback."""
