"""One exception type for every mistake a user can make (bad file, field, request, limit).

CLIs catch it and print its one-line message without a traceback; anything else is a bug in Kiln.
"""


class KilnError(Exception):
    """A user-facing error: the message names the file, tensor, field or limit and what to do next."""
