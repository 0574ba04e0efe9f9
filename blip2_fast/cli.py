"""How every command line of the project ends on an error.

A user's mistake (a config key or value, a path, a file, the data) and a run that stopped on its own
terms (non-finite losses, SIGTERM) end in one line naming what went wrong, not a traceback: the
messages already name the file, key or value. ``--debug`` (or ``BLIP2_FAST_DEBUG=1``) shows the
traceback. Anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any


class RunStopped(RuntimeError):
    """A run that stopped on its own terms (non-finite losses, SIGTERM), its message saying where it stands."""

    EXIT_STATUS = 1


USER_ERRORS = (ValueError, OSError, RunStopped)
USER_ERROR_STATUS = 1  # a stopped run exits with its own (SIGTERM: 143, as a shell reports a terminated process)


def run_main(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> None:
    """``main(argv)`` (default: ``sys.argv[1:]``, less ``--debug``) as a command: user errors in one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("BLIP2_FAST_DEBUG", "0") not in ("", "0")
    try:
        main([a for a in argv if a != "--debug"])
    except USER_ERRORS as err:
        stopped = isinstance(err, RunStopped)
        rank, world = os.environ.get("RANK", "0"), int(os.environ.get("WORLD_SIZE", "1"))
        if debug:
            traceback.print_exc()
        elif not stopped or rank == "0":  # a stopped run stops alike on every rank: rank 0 says so
            where = f"rank {rank}: " if world > 1 else ""
            said = f"stopped: {err}" if stopped else f"error: {err}  (--debug shows the traceback)"
            print(where + said, file=sys.stderr, flush=True)
        sys.exit(err.EXIT_STATUS if stopped else USER_ERROR_STATUS)
