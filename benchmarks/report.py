"""What every benchmark's output carries: the commit it ran at, printed and optionally saved as JSON."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


def git_commit() -> str | None:
    """The short hash of HEAD, or None outside a git checkout."""
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or None


def report(results: dict, out: str | None) -> dict:
    """Print `results` as JSON and, when `out` is set, write them there too."""
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    return results
