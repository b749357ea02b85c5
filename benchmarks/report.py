"""What every benchmark's output carries: the commit it ran at, printed and optionally saved as JSON."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from rlhf_env.files import atomic_write


def git_commit() -> str | None:
    """The short hash of HEAD, with "-dirty" when tracked files differ from it; None outside a git checkout."""
    here = Path(__file__).parent  # the code's checkout, wherever the command runs from
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here)
    commit = done.stdout.strip() or None
    if commit is not None:
        changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, cwd=here).stdout.strip()
        commit += "-dirty" if changes else ""
    return commit


def report(results: dict, out: str | None) -> dict:
    """Print `results` as JSON and, when `out` is set, write them there too (atomically: the old file or the new)."""
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        atomic_write(out, text + "\n")
    return results
