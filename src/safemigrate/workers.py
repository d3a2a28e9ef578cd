"""What every forked worker process does first.

A forked child inherits the parent's Python signal handlers. The CLI's SIGTERM/SIGINT handler
only sets a "stop after this batch" flag, so a pool worker that inherited it would ignore the
SIGTERM its pool sends on shutdown and the run would hang at the end of a phase. Workers take
the default SIGTERM (die) and ignore SIGINT: Ctrl-C is the parent's to handle, which stops the
pool itself.

Before a pool forks, the parent's objects are moved out of the collector's reach
(`gc.freeze`): a child's garbage collection would otherwise write to every inherited object's
header and copy the parent's heap page by page, so each worker would own a private copy of
what it only reads.
"""

from __future__ import annotations

import gc
import signal


def reset_signals() -> None:
    """Default SIGTERM, ignored SIGINT: the parent process owns stopping."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def freeze_before_fork() -> None:
    """Collect once, then freeze what survives, so forked workers share the parent's heap."""
    gc.collect()
    gc.freeze()
