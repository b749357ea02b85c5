"""The default test command collects every doctest in the package (pytest skips folders named like `build` by
default, which once hid a whole package's doctests)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_module_with_a_doctest_is_collected():
    with_doctests = {path.relative_to(ROOT).as_posix() for package in ("rlhf_env", "agents", "benchmarks")
                     for path in (ROOT / package).rglob("*.py") if ">>> " in path.read_text()}
    assert with_doctests  # the package does have doctests
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    collected = {line.split("::")[0] for line in out.splitlines() if "::" in line}
    assert with_doctests <= collected, sorted(with_doctests - collected)
    folders = [path for package in ("rlhf_env", "agents", "benchmarks") for path in (ROOT / package).rglob("build")]
    assert not folders, f"pytest and .gitignore templates skip folders named build: {folders}"
