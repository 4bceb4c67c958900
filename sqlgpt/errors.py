"""The one exception type users see: every message is a complete sentence fit
for a one-line CLI error."""


class SqlgptError(Exception):
    """A problem with the user's input, files or configuration."""
