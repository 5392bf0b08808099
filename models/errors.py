"""The one base class for mistakes a user can fix: bad data, a missing or foreign file, an option that cannot work.

Command lines print such an error's message in one line and exit 2; anything else is a bug and keeps its
traceback. Each subclass also derives from the built-in error it refines (ValueError, FileExistsError, ...).
"""


class UserError(Exception):
    """Something the person running the command can fix; the message names the value and the fix."""


class ConfigError(UserError, ValueError):
    """An option or setting that cannot work (an unknown encoder, no CUDA for --device cuda, ...)."""
