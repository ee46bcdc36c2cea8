"""``python -m pytest_microsandbox.cli``: the ``microsandbox`` command."""

from __future__ import annotations

import sys

from . import main

sys.exit(main())
