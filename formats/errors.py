"""One exception type for every mistake a user can make (bad file, field, request, limit).

CLIs catch it and print its one-line message without a traceback; anything else is a bug in Kiln.
"""

import sys
from typing import Callable


class KilnError(Exception):
    """A user-facing error: the message names the file, tensor, field or limit and what to do next."""


def exit_on_error(main: Callable[[], object]) -> None:
    """Run a CLI's main: a KilnError prints `error: ...` (one line) and exits 1, Ctrl-C exits 130, neither
    with a traceback."""
    try:
        main()
    except KilnError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\n(interrupted)", file=sys.stderr)
        sys.exit(130)
