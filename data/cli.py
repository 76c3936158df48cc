"""The one error handler of every command-line entry point: bad input and failed file
operations become one `error: ...` line on stderr and exit status 2, never a traceback."""
from __future__ import annotations

import errno
import os
import sys
from typing import Callable

from models.errors import InputError

EXIT_INPUT = 2


def describe_os_error(e: OSError) -> str:
    """One line naming the path: a full disk, a permission, a missing file..."""
    if e.filename is None:
        return str(e)
    what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}.get(e.errno, e.strerror)
    target = f"{e.filename} -> {e.filename2}" if e.filename2 else str(e.filename)
    return f"{target}: {what or e}"


def run_cli(main: Callable[[], int | None], report: bool | None = None) -> int:
    """Run `main`; an `InputError` or `OSError` is reported as one `error:` line (by rank 0
    only under a launcher, unless `report` says otherwise) and returns EXIT_INPUT."""
    if report is None:
        report = os.environ.get("RANK", "0") == "0"
    try:
        return main() or 0
    except InputError as e:
        message = str(e)
    except OSError as e:
        message = describe_os_error(e)
    if report:
        print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_INPUT
