"""The one error type users see: a message naming the file, tensor or field and what was expected."""


class DeltaMoEError(Exception):
    """A problem with the user's input or environment. The CLI prints its message alone, without a traceback."""
