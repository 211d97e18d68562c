"""The one exception type for bad user input: the CLI prints it as one line and exits 2."""


class UserError(ValueError):
    """Bad input from the user (paths, checkpoints, arguments). Message is one line."""
