"""Shared launcher plumbing: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

from maskray.errors import MaskrayError


def run_cli(main: Callable[[], int | None]) -> None:
    """Call ``main`` and exit with its code; a :class:`MaskrayError` prints one line ``<label>: ...`` (``error``
    for bad input, exit code 2; see :mod:`maskray.errors` for the others) and exits with its code."""
    try:
        code = main()
    except MaskrayError as err:
        print(f"{err.label}: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    sys.exit(code or 0)
