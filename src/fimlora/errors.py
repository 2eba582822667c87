"""The one exception type that the CLI turns into a single clear line and exit code 2."""


class FimloraError(Exception):
    """A problem with the user's input or environment (not a bug in fimlora).

    The message must be a complete sentence a user can act on; the CLI prints it alone, without a
    traceback.
    """
