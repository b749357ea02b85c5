"""The README keeps its promises (its `>>>` examples run as doctests through pyproject's `--doctest-glob`)."""

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_states_the_two_setup_commands():
    text = README.read_text()
    assert 'pip install -c constraints/tested.txt -e ".[dev]" && python -m benchmarks.run --quick' in text
    assert "\npython -m pytest\n" in text


def test_ci_runs_the_readmes_install_and_test_commands():
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install -c constraints/tested.txt -e ".[dev]"' in ci
    assert "python -m pytest" in ci
    assert '"$rc" -eq 5' in ci  # pytest's "no tests collected" is a failure
