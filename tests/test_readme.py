"""The README's test command is the one CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"^(pip install -e \"\.\[test\]\" && python -m pytest[^\n]*)$", readme, flags=re.M)
    assert commands, "README shows no test command"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[0] in ci.splitlines(), f"CI does not run the README's test command {commands[0]!r}"
