"""The errors a user can cause: each message is one line naming the file, key or value and what is valid.

The command line prints them as `kdlab: error: ...` and exits 2; this module imports nothing heavy, so the
CLI can catch them before torch is loaded.
"""


class ConfigError(ValueError):
    """A user-caused configuration problem; the message is one line and names the key."""


class ExportError(Exception):
    """An export folder that is incomplete, altered or of an unknown recipe; the message is one line."""
