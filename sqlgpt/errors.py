"""The one exception type users see: every message is one complete line fit
for a CLI error."""


class SqlgptError(Exception):
    """A problem with the user's input, files or configuration."""

    def __init__(self, message):
        # messages may quote SQLite, which quotes multi-line schema text
        super().__init__(" ".join(str(message).split()))


class AlreadyTrained(Exception):
    """Resume found the model at the requested step already."""

    def __init__(self, step, train_loss):
        super().__init__(f"already trained to step {step}")
        self.step, self.train_loss = step, train_loss
