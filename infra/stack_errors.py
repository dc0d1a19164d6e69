"""The local stack's one error type, below every stack module so each can raise it and the CLI catch it."""


class StackError(RuntimeError):
    """A service could not be prepared, started or stopped; the message says where to look."""
