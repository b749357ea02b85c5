"""Tying child processes to their parent's life (Linux ``PR_SET_PDEATHSIG``), so that no cell outlives its grid.

The grid starts each cell with `dies_with` as its ``preexec_fn``; a cell run under ``torchrun`` is one launcher
process with one worker per rank, and each worker calls `die_with_parent` so that it dies with the launcher, which
dies with the grid. Elsewhere (no prctl) both are no-ops and only the grid's own cleanup (Ctrl-C, SIGTERM, which
``torchrun`` passes on to its workers) stops a cell.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (AttributeError, OSError):
        return None


_PRCTL = _load_prctl()  # looked up here, not in the child between fork and exec
_PR_SET_PDEATHSIG = 1


def _ask_to_die_with(parent: int) -> None:
    _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def dies_with(parent: int):
    """A ``preexec_fn`` that makes the kernel SIGKILL the child when `parent` dies, even by SIGKILL (the signal
    follows the thread that started the child, so start children from a thread that lives as long as the parent).
    None where there is no prctl."""
    if _PRCTL is None:
        return None
    return lambda: _ask_to_die_with(parent)


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when the process that started it dies (a ``torchrun`` worker: when
    its launcher dies). A no-op where there is no prctl."""
    if _PRCTL is not None:
        _ask_to_die_with(os.getppid())
