"""``python -m pytest_microsandbox.guest``: start the guest runner (see :mod:`.runner`)."""

from __future__ import annotations

import sys

from .runner import cli

if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
