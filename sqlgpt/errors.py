"""The one exception type users see: every message is one complete line fit
for a CLI error."""


class SqlgptError(Exception):
    """A problem with the user's input, files or configuration."""

    def __init__(self, message):
        # messages may quote SQLite, which quotes multi-line schema text
        super().__init__(" ".join(str(message).split()))
