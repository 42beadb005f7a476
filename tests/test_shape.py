"""The project's size budgets and its voice, held the way tinygrad holds its line count: each script stays within what
a reader takes in at one sitting, no Python line passes 120 characters, docs/ keeps at most 4 plots, and no file
speaks about the work that made the project instead of about the project."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINE_BUDGETS = {  # file (or folder of .py files, counted together) -> most lines
    "flow_sde_ppo.py": 750,
    "flow_noise_ppo.py": 750,
    "flow_grpo.py": 750,
    "sft_baseline.py": 650,
    "environments.py": 400,
    "vla": 600,
    "README.md": 300,
    "docs/results.md": 400,
}
MAX_LINE_CHARS = 120
MAX_PNGS_IN_DOCS = 4
WORD = "sess" + "ion"  # built, not written, so this file passes its own check


def line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def project_files() -> list[Path]:
    """The files git tracks, and the new ones it would track (not ignored); every file outside hidden and ignored
    folders where git is not available."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        skip = {"runs", "demos", "wandb", "__pycache__"}
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if not any(part.startswith(".") or part in skip for part in p.relative_to(ROOT).parts)]
    return sorted(ROOT / n for n in set(names) if (ROOT / n).is_file())


def text_of(path: Path) -> str | None:
    """The file's text, or None for a binary file."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


@pytest.mark.parametrize("name", LINE_BUDGETS)
def test_line_budget(name):
    path, budget = ROOT / name, LINE_BUDGETS[name]
    counts = {p: line_count(p) for p in sorted(path.glob("*.py"))} if path.is_dir() else {path: line_count(path)}
    total = sum(counts.values())
    assert total <= budget, (f"{name}: {total} lines, over its budget of {budget} by {total - budget}"
                             + ("" if not path.is_dir() else
                                " (" + ", ".join(f"{p.name} {n}" for p, n in counts.items()) + ")"))


def test_no_python_line_over_120_characters():
    long = [f"{p.relative_to(ROOT)}:{i}: {len(line)} characters"
            for p in project_files() if p.suffix == ".py"
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if len(line) > MAX_LINE_CHARS]
    assert not long, f"{len(long)} Python lines over {MAX_LINE_CHARS} characters:\n" + "\n".join(long)


def test_docs_hold_at_most_four_plots():
    pngs = sorted(p.name for p in (ROOT / "docs").glob("*.png"))
    assert len(pngs) <= MAX_PNGS_IN_DOCS, (f"docs/ holds {len(pngs)} PNGs, more than {MAX_PNGS_IN_DOCS}: "
                                           + ", ".join(pngs))


def test_no_file_speaks_of_the_work_that_made_it():
    pattern = re.compile(WORD, re.IGNORECASE)
    hits = []
    for p in project_files():
        text = text_of(p)
        if text is None:
            continue
        lines = [i for i, line in enumerate(text.splitlines(), 1) if pattern.search(line)]
        if lines:
            shown = ", ".join(map(str, lines[:10])) + (", ..." if len(lines) > 10 else "")
            hits.append(f"{p.relative_to(ROOT)}: {len(lines)} lines (line {shown})")
    assert not hits, f"the word {WORD!r} stands in {len(hits)} files:\n" + "\n".join(hits)


def test_the_budgets_see_what_they_measure():
    # the checks above pass trivially if they find nothing: the scripts, the README and this file must be among the
    # files they read, and a word built like WORD must be found in a text that holds it
    names = {str(p.relative_to(ROOT)) for p in project_files()}
    assert {"flow_sde_ppo.py", "README.md", "tests/test_shape.py"} <= names
    assert re.search(WORD, f"a {WORD.upper()} here", re.IGNORECASE)
