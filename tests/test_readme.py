"""The README and docs keep their promises: the set-up commands CI runs, a front page, links that resolve (the
`>>>` examples run as doctests through pyproject's `--doctest-glob`)."""

import re
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


def test_readme_is_a_front_page():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= 200
    assert next(i for i, line in enumerate(lines) if "pip install -c constraints" in line) < 30  # set-up near the top
    tables = [i for i, line in enumerate(lines) if line.startswith("|---") or line.startswith("| ---")]
    assert len(tables) <= 2
    hashes = re.findall(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", text)
    assert not hashes, f"commit hashes belong in docs/, next to their numbers: {hashes}"


def test_every_relative_link_in_the_readme_and_docs_resolves():
    root = README.parent
    broken = []
    for page in [README, *sorted((root / "docs").rglob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(root)}: {target}")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
                broken.append(f"{page.relative_to(root)}: {target} (no such heading)")
    assert broken == []


def test_no_page_refers_to_files_outside_the_repository():
    root = README.parent
    pages = [README, *(root / "docs").rglob("*.md"), *root.glob("rlhf_env/**/*.py"), *root.glob("agents/*.py"),
             *root.glob("benchmarks/*.py")]
    assert [p.name for p in pages if re.search(r"\b(DESIGN|MEASUREMENTS|STYLE)\.md\b", p.read_text())] == []


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")
        anchors.add(slug)
    return anchors
