"""The one exception type for mistakes a user can make: the CLI prints its message, no traceback."""


class UserError(Exception):
    """Bad input, flag or file: the message names it and says what to do."""
