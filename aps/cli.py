"""What the entry scripts share: turning ApsError into one line on stderr and a non-zero exit."""
from __future__ import annotations

import sys
from contextlib import contextmanager

from .errors import ApsError


@contextmanager
def one_line_errors(prog: str):
    """Run the body; a user error (ApsError, a missing file) becomes 'prog: error: ...' and exit 2."""
    try:
        yield
    except (ApsError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
